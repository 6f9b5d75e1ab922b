"""KG cloze probing on the demo KG (1435 facts x 3 templates, closed answer spaces of up to ~220 objects), random
d=64 / 2-layer model, one run, side by side:

  new    `cloze_scores_many`: every (fact, template) prompt in a few batched forwards, each answer space as a trie
         (tree attention), no KV cache copies -- what `evaluate_kg` uses;
  old    the scorer this replaced: one call per fact x template, Part A encoded once into a KV cache that is
         copied to every candidate, then one forward of all candidates (re-implemented here, with [eop] so the
         numbers are the same); too slow for every fact, so it runs on a seeded sample and its rate is compared;
  naive  one full forward per candidate (`wudao.eval.kg.naive_cloze_sums`), on one fact per answer space.

Each reference and the new scorer run on the same facts, alternating, and the largest score difference is printed. Also timed: the whole
`evaluate_kg` on every fact (bootstrap and claim checks included), and the claim checks alone. Target: all facts
well under a minute.

    .venv/bin/python bench/kg.py [--old-facts 60] [--old-all] [--repeat 3] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wudao.data.demo import write_demo  # noqa: E402
from wudao.data.glm import SpecialIds  # noqa: E402
from wudao.data.tokenizer import train_tokenizer  # noqa: E402
from wudao.eval.kg import (  # noqa: E402
    KG_FACTS,
    KG_TEMPLATES,
    _cloze_inputs,
    answer_spaces,
    check_claims,
    evaluate_kg,
    naive_cloze_sums,
    parse_kg,
)
from wudao.model import GLMConfig, GLMModel  # noqa: E402
from wudao.model.cloze import cloze_scores_many  # noqa: E402
from wudao.model.generation import _encode_part_a, _part_b  # noqa: E402


@torch.no_grad()
def old_cloze_sums(model: GLMModel, part_a: list[int], ids: SpecialIds, candidates: list[list[int]]) -> list[float]:
    """The per-prompt scorer before batching: Part A cached once, the cache repeated for every candidate."""
    mask_pos = part_a.index(ids.mask)
    B, M = len(candidates), max(len(c) for c in candidates) + 1  # + [eop]
    a_1A = torch.tensor([part_a])
    cache = _encode_part_a(model, a_1A, M).repeat(B)
    target_BT = torch.full((B, M), ids.eop)
    valid_BT = torch.zeros(B, M, dtype=torch.bool)
    for b, c in enumerate(candidates):
        target_BT[b, : len(c)] = torch.tensor(c)
        valid_BT[b, : len(c) + 1] = True
    input_BT = torch.cat([torch.full((B, 1), ids.sop), target_BT[:, :-1]], 1)
    pos_BT, block_BT = _part_b(input_BT, mask_pos, 1)
    logits_BTV = model(input_BT, pos_BT, block_BT, torch.full((B,), a_1A.size(1)), cache).logits_BTV
    return (logits_BTV.float().log_softmax(-1).gather(-1, target_BT[..., None]).squeeze(-1) * valid_BT).sum(1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-facts", type=int, default=60, help="seeded sample of facts (x all their templates) for old")
    ap.add_argument("--old-all", action="store_true", help="run the old scorer on every fact too (minutes)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating repeats of each sample comparison (min taken)")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary (the ingest default)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0 = torch's default); on a shared box 1 can be much faster than oversubscribed cores",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(Path(tmp), slices=3, seed=0, images=0)
        texts = [json.loads(line)["text"] for f in sorted(Path(tmp).glob("corpus/*/*.jsonl")) for line in f.open()]
        kg = parse_kg((Path(tmp) / "kg" / KG_FACTS).read_text(), (Path(tmp) / "kg" / KG_TEMPLATES).read_text())
    tok = train_tokenizer(texts, args.vocab)
    ids = SpecialIds.from_tokenizer(tok)
    torch.manual_seed(0)
    model = GLMModel(GLMConfig(vocab_size=tok.get_vocab_size(), d_model=64, n_layers=2, moe_every=0)).eval()

    spaces, encoded, probes = answer_spaces(kg), {}, []  # probes: (fact index, Part A, candidates)
    for k, fact in enumerate(kg.facts):
        for template in kg.templates[(fact.relation, fact.lang)]:
            part_a, lead = _cloze_inputs(template, fact.subject, tok, ids)
            key = (fact.relation, fact.lang, lead)
            if key not in encoded:
                encoded[key] = [tok.encode(lead + o).ids for o in spaces[key[:2]]]
            probes.append((k, part_a, encoded[key]))
    rng = np.random.default_rng(0)
    old_sample = set(rng.choice(len(kg.facts), args.old_facts, replace=False).tolist())
    by_space: dict[tuple[str, str], list[int]] = {}
    for k, f in enumerate(kg.facts):
        by_space.setdefault((f.relation, f.lang), []).append(k)
    naive_sample = {int(rng.choice(v)) for v in by_space.values()}  # one fact per answer space: every size counts

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    def new(ps):
        return [[s.sum for s in r] for r in cloze_scores_many(model, [p[1] for p in ps], ids, [p[2] for p in ps])]

    def side_by_side(sample: set[int], reference) -> dict:
        """The reference and the new scorer on the same facts, alternating; the fastest of each."""
        ps = [p for p in probes if p[0] in sample]
        new_s, ref_s = [], []
        for _ in range(args.repeat):
            new_out, t = timed(lambda: new(ps))
            new_s.append(t)
            ref_out, t = timed(lambda: [reference(model, a, ids, c) for _, a, c in ps])
            ref_s.append(t)
        diff = max(float(np.abs(np.subtract(n, r)).max()) for n, r in zip(new_out, ref_out))
        return {
            "facts": len(sample),
            "new_s": min(new_s),
            "ref_s": min(ref_s),
            "ratio": min(ref_s) / min(new_s),
            "max_abs_diff": diff,
        }

    with torch.no_grad():
        new_all, new_all_s = timed(lambda: new(probes))
        old = side_by_side(old_sample, old_cloze_sums)
        naive = side_by_side(naive_sample, naive_cloze_sums)
        old_all_s = None
        if args.old_all:
            old_all, old_all_s = timed(lambda: [old_cloze_sums(model, a, ids, c) for _, a, c in probes])
            old["max_abs_diff_all"] = max(float(np.abs(np.subtract(n, o)).max()) for n, o in zip(new_all, old_all))
    report, eval_s = timed(lambda: evaluate_kg(model, tok, kg))
    _, claims_s = timed(lambda: check_claims(model, tok, kg, ids, np.random.default_rng(0), 20, 24))
    old_all_est = old["ref_s"] / old["facts"] * len(kg.facts)
    result = {
        "facts": len(kg.facts),
        "probes": len(probes),
        "rows": sum(len(p[2]) for p in probes),
        "threads": torch.get_num_threads(),
        "new_all_facts_s": new_all_s,
        "old_all_facts_s": old_all_s,
        "old_all_facts_s_estimated": old_all_est,
        "new_over_old_all_facts": (old_all_s or old_all_est) / new_all_s,
        "old": old,
        "naive": naive,
        "evaluate_kg_all_facts_s": eval_s,
        "claims_20_subjects_s": claims_s,
        "p_at_1": report.p_at_1,
        "chance": report.chance,
        "majority": report.majority,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"demo KG: {result['facts']} facts, {result['probes']} fact x template prompts, {result['rows']} candidate rows; "
        f"d_model 64, 2 layers, vocab {tok.get_vocab_size()}, {result['threads']} thread(s)"
    )
    print(f"{'reference':10s} {'facts':>6s} {'ref s':>8s} {'new s':>8s} {'new/ref':>8s} {'max |diff|':>10s}")
    for name, r in (("old", old), ("naive", naive)):
        print(
            f"{name:10s} {r['facts']:6d} {r['ref_s']:8.2f} {r['new_s']:8.2f} {r['ratio']:7.1f}x {r['max_abs_diff']:10.1e}"
        )
    old_line = f"{old_all_s:.1f} s measured" if old_all_s else f"~{old_all_est:.0f} s estimated from its sample"
    print(
        f"all {result['facts']} facts: new {new_all_s:.1f} s, old {old_line} -> {result['new_over_old_all_facts']:.1f}x"
    )
    print(
        f"evaluate_kg on all facts (bootstrap + claims included): {eval_s:.1f} s; claim checks alone (20 subjects x 24 "
        f"tokens): {claims_s:.2f} s; P@1 {report.p_at_1:.3f} (chance {report.chance:.3f}, majority {report.majority:.3f})"
    )


if __name__ == "__main__":
    main()
