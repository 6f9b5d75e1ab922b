"""GLM model: the blank-infilling mask by perturbation, PB-relax, KV-cache generation, cloze scoring, and a
tiny model that learns to fill in 50 real country -> capital facts."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_model_vq import one_thread
from wudao.data.glm import SpecialIds, glm_sample, stack_rows
from wudao.model.attention import LayerNorm, glm_attention_mask, pb_relax_attention
from wudao.model.cloze import cloze_scores, rerank
from wudao.model.generation import Sampling, continue_text, fill_blank
from wudao.model.glm import GLMConfig, GLMModel

IDS = SpecialIds(pad=0, eos=1, cls=2, mask=3, smask=4, gmask=5, sop=6, eop=7, boi=8, eoi=9, roi=10, base=11)
V = 40


def memorise(
    model: GLMModel, batch: dict[str, torch.Tensor], max_steps: int = 400, until: float = 0.01
) -> tuple[int, float]:
    """Full-batch AdamW (lr 3e-3) on one fixed batch until the LM loss is below `until`: (steps, final LM loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(1, max_steps + 1):  # noqa: B007 (returned after the loop)
        out = model.loss(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if out.lm_loss.item() < until:
            break
    return step, out.lm_loss.item()


def tiny(**kw) -> GLMModel:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, moe_every=0, n_experts=8)
    return GLMModel(GLMConfig(**{**cfg, **kw})).eval()


MODELS = {
    "pre": {},
    "sandwich+pb": {"layer_order": "sandwich", "pb_relax": True},
    "moe": {"moe_every": 1, "n_experts": 4, "top_k": 2},
}


def sample_row(seq_len: int = 24):
    """Part A of 10 tokens with two blanks, Part B of 2 spans, padded: one GLM row as tensors."""
    tokens = np.arange(12, 24)
    row = glm_sample(tokens, [(2, 4), (7, 8)], IDS.mask, IDS, seq_len, np.random.default_rng(0))
    return stack_rows([row], "token").tensors()


def logits_of(model, t, input_ids):
    return model(input_ids, t["position_ids_BT"], t["block_position_ids_BT"], t["sep_B"]).logits_BTV[0]


@pytest.mark.parametrize("name", MODELS)
def test_part_b_is_causal_and_part_a_bidirectional(name):
    model = tiny(**MODELS[name])
    t = sample_row()
    ids, sep = t["input_ids_BT"], int(t["sep_B"][0])
    n = sep + int(t["loss_mask_BT"].sum())
    base = logits_of(model, t, ids)
    for j in range(sep + 1, n):  # change a Part B token: nothing before it moves
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 5) % V
        out = logits_of(model, t, changed)
        torch.testing.assert_close(out[:j], base[:j], atol=1e-5, rtol=0)
        assert (out[j] - base[j]).abs().max() > 1e-4
    for j in range(sep):  # change a Part A token: every Part A output moves, earlier ones included
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 5) % V
        moved = (logits_of(model, t, changed)[:n] - base[:n]).abs().amax(-1)
        assert (moved > 1e-6).all(), f"Part A token {j} must be seen from every position"


def test_pb_relax_attention_equals_plain_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) * 4 for _ in range(3))
    mask = glm_attention_mask(torch.tensor([3, 0]), 0, 7, 7)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(pb_relax_attention(q, k, v, mask, alpha=32.0), ref, atol=1e-5, rtol=1e-5)


def test_pb_relax_layernorm_equals_plain_layernorm():
    torch.manual_seed(0)
    # Scale invariance holds up to eps: inputs much smaller than sqrt(eps) would differ (eps dominates plain LN).
    x = torch.randn(4, 5, 32) * torch.tensor([0.5, 1.0, 50.0, 1e3])[:, None, None]
    plain, relaxed = LayerNorm(32), LayerNorm(32, pb_relax=True)
    torch.testing.assert_close(relaxed(x), plain(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(relaxed(x.bfloat16()).float(), plain(x), atol=0.05, rtol=0.05)  # bf16 stays sane


def test_pb_relax_model_equals_plain_model_with_the_same_weights():
    # Tiny eps: at init the sandwich output-LNs see very small activations, where eps would break scale invariance.
    plain = tiny(layer_order="sandwich", norm_eps=1e-12)
    relaxed = tiny(layer_order="sandwich", pb_relax=True, norm_eps=1e-12)
    relaxed.load_state_dict(plain.state_dict())
    t = sample_row()
    torch.testing.assert_close(
        logits_of(relaxed, t, t["input_ids_BT"]), logits_of(plain, t, t["input_ids_BT"]), atol=1e-4, rtol=1e-4
    )


def test_loss_is_cross_entropy_on_part_b_only():
    model = tiny(moe_every=2, n_experts=4)
    t = sample_row()
    out = model.loss(**t)
    logits = logits_of(model, t, t["input_ids_BT"])
    keep = t["loss_mask_BT"][0]
    ref = F.cross_entropy(logits[keep], t["target_ids_BT"][0][keep])
    torch.testing.assert_close(out.lm_loss, ref, atol=1e-5, rtol=1e-5)
    assert out.n_tokens == 5 and out.aux.tokens_per_expert_LE.shape == (1, 4)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux.aux_loss)


@pytest.mark.parametrize("name", MODELS)
def test_kv_cache_generation_equals_uncached(name):
    model = tiny(**MODELS[name])
    part_a = [12, 13, IDS.mask, 20, 21, 22]
    greedy = [fill_blank(model, part_a, IDS, max_new_tokens=30, stop_at_eop=False, use_cache=c) for c in (True, False)]
    assert greedy[0] == greedy[1] and len(greedy[0][0]) == 30
    sampling = Sampling(temperature=1.0, top_k=10, top_p=0.9)
    sampled = [
        fill_blank(
            model,
            part_a,
            IDS,
            max_new_tokens=20,
            sampling=sampling,
            num_samples=3,
            stop_at_eop=False,
            use_cache=c,
            generator=torch.Generator().manual_seed(1),
        )
        for c in (True, False)
    ]
    assert sampled[0] == sampled[1] and len({tuple(r) for r in sampled[0]}) > 1


def test_generation_stops_at_eop_and_respects_vocab_range():
    model = tiny()
    with torch.no_grad():
        # Constant final hidden state h = 1, and the (tied) output row of [eop] aligned with it: [eop] always wins.
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.tok_emb.weight[IDS.eop] = 1.0
    assert fill_blank(model, [12, IDS.gmask], IDS, max_new_tokens=10) == [[]]
    codes = fill_blank(
        model,
        [12, IDS.gmask],
        IDS,
        max_new_tokens=10,
        stop_at_eop=False,
        vocab_range=(30, 40),
        sampling=Sampling(temperature=1.0),
    )[0]
    assert len(codes) == 10 and all(30 <= c < 40 for c in codes)
    assert continue_text(model, [12, 13], IDS, max_new_tokens=5) == []


def test_cloze_scores_with_eop_equal_full_forward():
    model = tiny(moe_every=1, n_experts=4)
    part_a = [12, 13, IDS.mask, 20, 21]
    candidates = [[30], [31, 32, 33], [34, 35]]
    scores = cloze_scores(model, part_a, IDS, candidates)
    for cand, score in zip(candidates, scores):
        # GLM scores answer + [eop]: input [sop] + answer, target answer + [eop].
        target = cand + [IDS.eop]
        inp = torch.tensor([part_a + [IDS.sop] + cand])
        pos = torch.tensor([list(range(5)) + [2] * len(target)])
        blk = torch.tensor([[0] * 5 + list(range(1, len(target) + 1))])
        with torch.no_grad():
            logp = model(inp, pos, blk, torch.tensor([5])).logits_BTV[0, 5:].log_softmax(-1)
        ref = float(logp[torch.arange(len(target)), torch.tensor(target)].sum())
        assert score.sum == pytest.approx(ref, abs=1e-4) and score.mean == pytest.approx(ref / len(target), abs=1e-4)
    best, all_scores = rerank(model, [[14, 15, IDS.gmask], part_a], candidates[1], IDS)
    assert all_scores[1] == pytest.approx(scores[1].sum, abs=1e-5) and best == int(np.argmax(all_scores))
    assert all_scores[0] == pytest.approx(
        cloze_scores(model, [14, 15, IDS.gmask], IDS, [candidates[1]])[0].sum, abs=1e-5
    )


def test_block_position_zero_adds_nothing_and_learns_nothing():
    """Part A (and any causal pass) has block position 0 everywhere. A learned row 0 would be one vector added to
    nearly every token, growing with the whole batch's gradient until it drowns the token identity (the cause
    of facts not being learned, bench/learning.py)."""
    model = tiny().train()
    assert torch.count_nonzero(model.block_pos_emb.weight[0]) == 0
    assert torch.count_nonzero(model.block_pos_emb.weight[1]) > 0, "Part B block positions are learned"
    x = torch.randint(12, V, (2, 10))
    out = model.loss(
        x,
        torch.arange(10).expand(2, 10),
        torch.zeros_like(x),
        torch.zeros(2, dtype=torch.long),
        x,
        torch.ones_like(x, dtype=torch.bool),
    )
    out.loss.backward()
    assert torch.count_nonzero(model.block_pos_emb.weight.grad[0]) == 0


def test_bf16_forward_is_finite():
    model = tiny(**MODELS["moe"], layer_order="sandwich", pb_relax=True).to(torch.bfloat16)
    t = sample_row()
    out = model.loss(**t)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


# --- learning: a tiny GLM learns 50 real facts ----------------------------------------------------------------


def capital_facts(n: int = 50) -> list[tuple[str, str]]:
    from wudao.data.demo import country_facts

    facts = [(v["en"]["name"], v["en"]["capital"]) for _, v in sorted(country_facts().items()) if "capital" in v["en"]]
    return facts[:n]


def test_tiny_glm_learns_to_fill_in_fifty_capitals():
    from wudao.data.tokenizer import train_tokenizer

    facts = capital_facts()
    tok = train_tokenizer([f"The capital of {c} is {k}." for c, k in facts], vocab_size=600)
    ids = SpecialIds.from_tokenizer(tok)
    rows, prompts, answers = [], [], []
    rng = np.random.default_rng(0)
    for country, capital in facts:
        head, obj, tail = (tok.encode(s).ids for s in (f"The capital of {country} is", f" {capital}", "."))
        tokens = np.array(head + obj + tail)
        rows.append(glm_sample(tokens, [(len(head), len(head) + len(obj))], ids.mask, ids, 40, rng))
        prompts.append(head + [ids.mask] + tail)
        answers.append(obj)
    batch = stack_rows(rows, "token").tensors()

    torch.manual_seed(0)
    cfg = GLMConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=96,
        n_layers=2,
        n_heads=4,
        max_seq_len=40,
        moe_every=2,
        n_experts=4,
        top_k=2,
    )
    model = GLMModel(cfg)
    start = time.perf_counter()
    with one_thread():
        steps, loss = memorise(model, batch)
        model.eval()
        got = [fill_blank(model, p, ids, max_new_tokens=12)[0] for p in prompts]
    exact = sum(g == a for g, a in zip(got, answers)) / len(answers)
    print(f"steps={steps} loss={loss:.4f} exact={exact:.2f} in {time.perf_counter() - start:.1f}s")
    assert tok.decode(answers[0]).strip() == facts[0][1], "the blank is exactly the capital's tokens"
    assert exact >= 0.9


def test_moe_loss_does_not_depend_on_padding():
    """The same row padded to 24 or to 60 tokens: with a capacity-limited MoE the loss, the expert load and the
    dropped count are the same, because padding is not routed (GLMBatch.real_BT)."""
    model = tiny(moe_every=1, n_experts=4, top_k=2, capacity_factor=1.0).train()
    short, long = sample_row(24), sample_row(60)
    out_short, out_long = model.loss(**short), model.loss(**long)
    torch.testing.assert_close(out_long.lm_loss, out_short.lm_loss, atol=1e-6, rtol=0)
    assert torch.equal(out_long.aux.tokens_per_expert_LE, out_short.aux.tokens_per_expert_LE)
    real = int(short["real_BT"].sum())
    assert int(out_long.aux.tokens_per_expert_LE.sum() + out_long.aux.dropped) == 2 * 2 * real  # layers x top-2
    assert int(out_short.aux.dropped) > 0, "the example must exercise the capacity"
    # Routing the padding (no mask) changes what real tokens get: capacity slots go to pads.
    unmasked = model.loss(**{k: v for k, v in long.items() if k != "real_BT"})
    assert int(unmasked.aux.tokens_per_expert_LE.sum() + unmasked.aux.dropped) == 2 * 2 * 60


def test_aux_loss_is_summed_over_moe_layers():
    model = tiny(moe_every=1, n_experts=4, top_k=2, aux_loss_weight=0.01, z_loss_weight=1e-3)
    stats = []
    hooks = [b.ffn.register_forward_hook(lambda m, i, o: stats.append(o[1])) for b in model.blocks]
    out = model.loss(**sample_row())
    for h in hooks:
        h.remove()
    assert len(stats) == 2
    expected = sum(0.01 * s.load_balance_loss + 1e-3 * s.z_loss for s in stats)
    torch.testing.assert_close(out.aux.aux_loss, expected)
    torch.testing.assert_close(out.aux.load_balance_loss, (stats[0].load_balance_loss + stats[1].load_balance_loss) / 2)
