"""Does training learn facts? The same demo slice and token budget, side by side:

    glm     our GLM with the GLM objective (the platform's recipe)           -> cloze probe, [MASK] + [eop]
    causal  our GLM model as a plain left-to-right LM (sep = 0)               -> left-to-right probe
    gpt2    HF transformers GPT2LMHeadModel from a GPT2Config of the same     -> left-to-right probe
            width and depth (random init, nothing downloaded)

Every model is probed on the facts its slice taught, over each relation's closed answer space, and the report
puts P@1 next to chance (uniform) and majority (always the most common object), macro over relations.
The left-to-right probe scores candidate + the rest of the template sentence, so, like [eop] in the cloze,
ending the answer is part of the score.

    .venv/bin/python bench/learning.py [--steps 600] [--variants glm,causal,gpt2] [--json]

gpt2 needs `pip install '.[bench]'` (transformers); it is skipped with a note where transformers is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wudao.data.demo import write_demo  # noqa: E402
from wudao.data.glm import GLMObjective, SpecialIds, sentence_end_ids  # noqa: E402
from wudao.data.tokenizer import EOS, train_tokenizer  # noqa: E402
from wudao.model import GLMConfig, GLMModel  # noqa: E402
from wudao.train.data import MixtureLoader, SliceTokens  # noqa: E402


@dataclass
class Probe:
    """One (fact, template) cloze: text before and after the object, the candidates, and which one is gold."""

    relation: str
    before: str
    after: str
    lead: str
    space: list[str]
    gold: int


def load_demo(root: Path, slice_no: int) -> tuple[list[str], list[dict], dict]:
    texts = []
    for path in sorted((root / "corpus" / f"slice-{slice_no:02d}").glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    facts = [json.loads(line) for line in (root / "kg" / "facts.jsonl").read_text(encoding="utf-8").splitlines()]
    templates = defaultdict(list)
    for line in (root / "kg" / "templates.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        templates[(row["relation"], row["lang"])].append(row["template"])
    return texts, facts, templates


def build_probes(facts: list[dict], templates: dict, slice_name: str) -> list[Probe]:
    space = defaultdict(list)
    for f in facts:
        if f["object"] not in space[(f["relation"], f["lang"])]:
            space[(f["relation"], f["lang"])].append(f["object"])
    probes = []
    for f in facts:
        if f.get("first_slice") != slice_name:
            continue
        key = (f["relation"], f["lang"])
        for t in templates[key]:
            before, after = t.replace("[X]", f["subject"]).split("[Y]")
            lead = " " if before.endswith(" ") else ""
            probes.append(
                Probe(f["relation"], before.rstrip(" "), after, lead, space[key], space[key].index(f["object"]))
            )
    return probes


def baselines(facts: list[dict], probes: list[Probe]) -> tuple[float, float]:
    """(uniform chance, majority) macro over relations, as P@1 is."""
    counts = defaultdict(Counter)
    for f in facts:
        counts[(f["relation"], f["lang"])][f["object"]] += 1
    by_rel_u, by_rel_m = defaultdict(list), defaultdict(list)
    for p in probes:
        lang_counts = next(c for (r, _), c in counts.items() if r == p.relation and p.space[0] in c)
        by_rel_u[p.relation].append(1 / len(p.space))
        by_rel_m[p.relation].append(float(lang_counts.most_common(1)[0][0] == p.space[p.gold]))
    return (
        float(np.mean([np.mean(v) for v in by_rel_u.values()])),
        float(np.mean([np.mean(v) for v in by_rel_m.values()])),
    )


def macro_p_at_1(probes: list[Probe], correct: list[bool]) -> dict[str, float]:
    by_rel = defaultdict(list)
    for p, c in zip(probes, correct):
        by_rel[p.relation].append(c)
    out = {r: float(np.mean(v)) for r, v in sorted(by_rel.items())}
    out["macro"] = float(np.mean(list(out.values())))
    return out


# ---- scoring -------------------------------------------------------------------------------------------------


@torch.no_grad()
def _score_rows(
    logits_fn, rows: list[tuple[list[int], list[int], list[int], int]], pad: int, chunk: int = 256
) -> list[float]:
    """rows: (input ids, target ids, position ids, sep); the score is the sum of log p over non-pad targets."""
    out = []
    for c in range(0, len(rows), chunk):
        part = rows[c : c + chunk]
        T = max(len(r[0]) for r in part)
        inp = torch.full((len(part), T), pad)
        tgt = torch.full((len(part), T), -1)
        pos = torch.zeros((len(part), T), dtype=torch.long)
        blk = torch.zeros((len(part), T), dtype=torch.long)
        sep = torch.tensor([r[3] for r in part])
        for i, (x, y, p, s) in enumerate(part):
            inp[i, : len(x)] = torch.tensor(x)
            tgt[i, : len(y)] = torch.tensor(y)
            pos[i, : len(p)] = torch.tensor(p)
            if s:  # GLM Part B: block positions 1.. after Part A
                blk[i, s : len(x)] = torch.arange(1, len(x) - s + 1)
        keep = tgt >= 0
        hidden, project = logits_fn(inp, pos, blk, sep)
        logp_NV = project(hidden[keep]).float().log_softmax(-1)  # only the scored positions reach the vocabulary
        lp = torch.zeros(keep.shape)
        lp[keep] = logp_NV.gather(-1, tgt[keep][:, None]).squeeze(-1)
        out += lp.sum(1).tolist()
    return out


def glm_rows(tok, ids: SpecialIds, p: Probe) -> list[tuple]:
    a = tok.encode(p.before).ids + [ids.mask] + tok.encode(p.after).ids
    m = a.index(ids.mask)
    rows = []
    for obj in p.space:
        cand = tok.encode(p.lead + obj).ids
        x = a + [ids.sop] + cand
        y = [-1] * len(a) + cand + [ids.eop]  # [eop] ends the answer, as GLM scores every cloze
        rows.append((x, y, list(range(len(a))) + [m] * (len(cand) + 1), len(a)))
    return rows


def gmask_rows(tok, ids: SpecialIds, p: Probe) -> list[tuple]:
    """Left-to-right through GLM's own generation: Part A = the text before the object + [gMASK], Part B scores
    the object and the rest of the sentence (the document objective generates to the end of the document)."""
    a = tok.encode(p.before).ids + [ids.gmask]
    rows = []
    for obj in p.space:
        rest = tok.encode(p.lead + obj + p.after).ids
        rows.append(
            (a + [ids.sop] + rest[:-1], [-1] * len(a) + rest, list(range(len(a))) + [len(a) - 1] * len(rest), len(a))
        )
    return rows


def causal_rows(tok, p: Probe) -> list[tuple]:
    # [EOS] first: it separates documents in the training stream, so it is what a document starts after.
    prefix = [tok.token_to_id(EOS)] + tok.encode(p.before).ids
    rows = []
    for obj in p.space:
        rest = tok.encode(p.lead + obj + p.after).ids
        seq = prefix + rest
        y = [-1] * (len(prefix) - 1) + rest
        rows.append((seq[:-1], y, list(range(len(seq) - 1)), 0))
    return rows


def probe(logits_fn, tok, ids: SpecialIds, probes: list[Probe], style: str) -> list[bool]:
    rows, owners = [], []
    for i, p in enumerate(probes):
        r = {"glm": glm_rows, "gmask": gmask_rows}[style](tok, ids, p) if style != "causal" else causal_rows(tok, p)
        rows += r
        owners += [i] * len(r)
    scores = _score_rows(logits_fn, rows, ids.pad)
    per = defaultdict(list)
    for i, s in zip(owners, scores):
        per[i].append(s)
    return [int(np.argmax(per[i])) == p.gold for i, p in enumerate(probes)]


# ---- training ------------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def causal_batch(tokens: np.ndarray, step: int, batch: int, seq_len: int, pad: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng([7, step])
    starts = rng.integers(len(tokens), size=batch)
    rows = np.stack([tokens[(s + np.arange(seq_len + 1)) % len(tokens)] for s in starts]).astype(np.int64)
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    return {
        "input_ids_BT": x,
        "position_ids_BT": torch.arange(seq_len).expand(batch, -1),
        "block_position_ids_BT": torch.zeros_like(x),
        "sep_B": torch.zeros(batch, dtype=torch.long),
        "target_ids_BT": y,
        "loss_mask_BT": torch.ones_like(x, dtype=torch.bool),
    }


def train_variant(variant: str, tok, ids: SpecialIds, tokens: np.ndarray, args) -> tuple[object, float, float]:
    torch.manual_seed(args.seed)
    V = tok.get_vocab_size()
    if variant == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=V,
                n_embd=args.d_model,
                n_layer=args.layers,
                n_head=args.heads,
                n_positions=args.seq_len * 2,
                resid_pdrop=0,
                embd_pdrop=0,
                attn_pdrop=0,
            )
        )
    else:
        model = GLMModel(
            GLMConfig(
                vocab_size=V,
                d_model=args.d_model,
                n_layers=args.layers,
                n_heads=args.heads,
                max_seq_len=args.seq_len * 2,
                layer_order=args.layer_order,
                moe_every=args.moe_every,
                n_experts=4,
            )
        )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    loader = None
    if variant == "glm":
        loader = MixtureLoader(
            SliceTokens("s1", "v", tokens),
            [],
            ids=ids,
            sentence_ends=sentence_end_ids(tok),
            seq_len=args.seq_len,
            seed=args.seed,
            replay_fraction=0.0,
            slice_weights={},
            objective=GLMObjective(
                token_prob=args.token_prob, sentence_prob=args.sentence_prob, mask_ratio=args.mask_ratio
            ),
        )
    model.train()
    started, loss = time.perf_counter(), float("nan")
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, max(1, args.steps // 50))
        if variant == "glm":
            t = loader.batch(step, range(step * args.batch, (step + 1) * args.batch)).tensors()
            out = model.loss(**t).loss
        else:
            t = causal_batch(tokens, step, args.batch, args.seq_len, ids.pad)
            if variant == "gpt2":
                out = model(input_ids=t["input_ids_BT"], labels=None).logits
                out = F.cross_entropy(out.reshape(-1, V), t["target_ids_BT"].reshape(-1))
            else:
                out = model.loss(**t).loss
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = float(out.detach())
    model.eval()
    return model, loss, time.perf_counter() - started


def logits_fn_for(variant: str, model):
    """(inputs) -> (final hidden states, projection to the vocabulary)."""
    if variant == "gpt2":
        return lambda inp, pos, blk, sep: (
            model.transformer(input_ids=inp, position_ids=pos).last_hidden_state,
            model.lm_head,
        )
    return lambda inp, pos, blk, sep: (model.hidden(inp, pos, blk, sep)[0], model.project)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="glm,causal,gpt2")
    ap.add_argument("--slice", type=int, default=1, help="demo slice to learn and probe")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--layer-order", default="sandwich")
    ap.add_argument("--moe-every", type=int, default=0)
    ap.add_argument("--token-prob", type=float, default=0.5)
    ap.add_argument("--sentence-prob", type=float, default=0.3)
    ap.add_argument("--mask-ratio", type=float, default=0.15)
    ap.add_argument("--probe-limit", type=int, default=0, help="probe a seeded sample of N (fact, template) pairs")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--docs-per-fact-set", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(Path(tmp), slices=3, seed=0, docs_per_fact_set=args.docs_per_fact_set, images=0)
        texts, facts, templates = load_demo(Path(tmp), args.slice)
    tok = train_tokenizer(texts, args.vocab)
    ids = SpecialIds.from_tokenizer(tok)
    eos = tok.token_to_id(EOS)
    tokens = np.array([t for e in tok.encode_batch(texts) for t in [*e.ids, eos]], dtype=np.int64)
    probes = build_probes(facts, templates, f"slice-{args.slice:02d}")
    if args.probe_limit and args.probe_limit < len(probes):
        keep = np.random.default_rng(0).choice(len(probes), args.probe_limit, replace=False)
        probes = [probes[i] for i in sorted(keep)]
    chance, majority = baselines(facts, probes)
    result = {
        "slice_tokens": int(len(tokens)),
        "probes": len(probes),
        "chance": chance,
        "majority": majority,
        "steps": args.steps,
        "tokens_per_step": args.batch * args.seq_len,
    }
    for variant in args.variants.split(","):
        if variant == "gpt2":
            try:
                import transformers  # noqa: F401
            except ImportError:
                result["gpt2"] = {"skipped": "transformers is not installed (pip install '.[bench]')"}
                continue
        model, loss, seconds = train_variant(variant, tok, ids, tokens, args)
        correct = probe(logits_fn_for(variant, model), tok, ids, probes, "glm" if variant == "glm" else "causal")
        result[variant] = {"p_at_1": macro_p_at_1(probes, correct), "final_loss": loss, "train_s": seconds}
        if variant == "glm":  # the same model asked through [gMASK] (left to right) as well as [MASK]
            correct = probe(logits_fn_for(variant, model), tok, ids, probes, "gmask")
            result[variant]["p_at_1_gmask"] = macro_p_at_1(probes, correct)
        if not args.json:
            print(
                f"{variant:7s} P@1 {result[variant]['p_at_1']['macro']:.3f} (chance {chance:.3f}, majority {majority:.3f})"
                f"  loss {loss:.3f}  {seconds:.0f}s  {result[variant]['p_at_1']}"
                + (f"  [gMASK] P@1 {result[variant]['p_at_1_gmask']['macro']:.3f}" if variant == "glm" else ""),
                flush=True,
            )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
