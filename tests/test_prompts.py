"""Continuous prompts in the GLM (wudao/model/prompts.py): a P-tuning v2 prefix keeps the GLM mask (Part A
bidirectional, Part B causal) and is never routed by MoE; v1 prompts replace the placeholders' embeddings; cached
generation and the batched trie scorer give the same numbers with prompts as the plain forwards; only the prompts
receive gradients. Tiny models, no training: a few seconds."""

from __future__ import annotations

import pytest
import torch

from tests.test_model_glm import IDS, MODELS, V, logits_of, sample_row, tiny
from wudao.model.cloze import cloze_score_matrix, cloze_scores_many
from wudao.model.generation import fill_blank
from wudao.model.prompts import InputPromptEncoder, PrefixEncoder, Prompts


def prefix_for(model, prompt_len: int = 3, seed: int = 1) -> Prompts:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.n_layers, cfg.n_heads, prompt_len, cfg.d_model // cfg.n_heads)
    return PrefixEncoder(
        shape[0],
        shape[1],
        shape[3],
        prompt_len,
        init_LHPK=(torch.randn(shape, generator=g), torch.randn(shape, generator=g)),
    )()


def v1_for(model, prompt_len: int = 2, seed: int = 1) -> Prompts:
    g = torch.Generator().manual_seed(seed)
    return InputPromptEncoder(
        model.cfg.d_model, prompt_len, init_PD=torch.randn(prompt_len, model.cfg.d_model, generator=g)
    )()


def forward(model, t, input_ids, prompts):
    return model(input_ids, t["position_ids_BT"], t["block_position_ids_BT"], t["sep_B"], prompts=prompts).logits_BTV[0]


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_prefix_keeps_part_b_causal_and_part_a_bidirectional(name):
    model = tiny(**MODELS[name])
    prompts = prefix_for(model)
    t = sample_row()
    ids, sep = t["input_ids_BT"], int(t["sep_B"][0])
    n = sep + int(t["loss_mask_BT"].sum())
    base = forward(model, t, ids, prompts)
    assert (base[:n] - logits_of(model, t, ids)[:n]).abs().amax(-1).min() > 1e-4, "every query sees the prefix"
    for j in range(sep + 1, n):  # change a Part B token: nothing before it moves
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 5) % V
        out = forward(model, t, changed, prompts)
        torch.testing.assert_close(out[:j], base[:j], atol=1e-5, rtol=0)
        assert (out[j] - base[j]).abs().max() > 1e-4
    changed = ids.clone()
    changed[0, sep - 1] = (changed[0, sep - 1] + 5) % V  # the last Part A token: every Part A position moves
    out = forward(model, t, changed, prompts)
    assert (out[: sep - 1] - base[: sep - 1]).abs().amax(-1).min() > 1e-5


@torch.no_grad()
def test_prefix_is_never_routed_and_never_cached():
    model = tiny(moe_every=1, n_experts=4, top_k=2)
    t = sample_row()
    real = t["real_BT"]
    plain = model.hidden(t["input_ids_BT"], t["position_ids_BT"], t["block_position_ids_BT"], t["sep_B"], real_BT=real)[
        1
    ]
    cache = model.new_kv_cache(1, 64)
    a = t["input_ids_BT"][:, : int(t["sep_B"][0])]
    _, aux = model.hidden(a, sep_B=t["sep_B"], kv_cache=cache, prompts=prefix_for(model, prompt_len=5))
    assert cache.length == a.size(1), "the cache holds tokens only"
    assert int(aux.tokens_per_expert_LE.sum(-1)[0]) == 2 * a.size(1), "only tokens are routed (top-2)"
    with_prefix = model.hidden(
        t["input_ids_BT"],
        t["position_ids_BT"],
        t["block_position_ids_BT"],
        t["sep_B"],
        real_BT=real,
        prompts=prefix_for(model, prompt_len=5),
    )[1]
    assert with_prefix.tokens_per_expert_LE.sum(-1).tolist() == plain.tokens_per_expert_LE.sum(-1).tolist()
    assert int(plain.tokens_per_expert_LE.sum(-1)[0]) == 2 * int(real.sum())


@torch.no_grad()
def test_v1_prompts_replace_the_placeholder_embeddings():
    model = tiny()
    prompts = v1_for(model, prompt_len=2)
    t = sample_row()
    ids = t["input_ids_BT"]
    base = forward(model, t, ids, prompts)
    other = ids.clone()
    other[0, :2] = torch.tensor([30, 31])  # other placeholder ids: the prompt's embeddings are used either way
    torch.testing.assert_close(forward(model, t, other, prompts), base)
    assert (forward(model, t, ids, v1_for(model, prompt_len=2, seed=2)) - base).abs().max() > 1e-4
    cache = model.new_kv_cache(1, 64)
    model.hidden(ids[:, :4], kv_cache=cache)  # prompt positions 0..7 would straddle this pass and the next
    with pytest.raises(ValueError, match="first pass"):
        model.hidden(ids[:, 4:5], kv_cache=cache, prompts=v1_for(model, 8))
    with pytest.raises(ValueError, match="cannot hold"):
        model.hidden(ids[:, :4], prompts=v1_for(model, 8))


@pytest.mark.parametrize("kind", ["v1", "v2"])
@pytest.mark.parametrize("name", ["pre", "moe"])
@torch.no_grad()
def test_cached_generation_and_trie_scoring_equal_plain_forwards_with_prompts(kind, name):
    model = tiny(**MODELS[name])
    prompts = v1_for(model) if kind == "v1" else prefix_for(model)
    part_a = [2, 2, 14, 15, IDS.mask, 16, 17] if kind == "v1" else [14, 15, IDS.mask, 16, 17]
    cached = fill_blank(model, part_a, IDS, max_new_tokens=6, stop_at_eop=False, prompts=prompts)
    plain = fill_blank(model, part_a, IDS, max_new_tokens=6, stop_at_eop=False, prompts=prompts, use_cache=False)
    assert cached == plain
    candidates = [[20], [20, 21], [22, 23, 24]]
    m = part_a.index(IDS.mask)
    naive = []
    for cand in candidates:  # one full GLM forward per candidate, as GLM's ClozeModel does
        inp, target = part_a + [IDS.sop] + cand, cand + [IDS.eop]
        n_a, n_b = len(part_a), len(target)
        logits = model(
            torch.tensor([inp]),
            torch.tensor([list(range(n_a)) + [m] * n_b]),
            torch.tensor([[0] * n_a + list(range(1, n_b + 1))]),
            torch.tensor([n_a]),
            prompts=prompts,
        ).logits_BTV[0]
        naive.append(float(logits[n_a:].log_softmax(-1).gather(-1, torch.tensor(target)[:, None]).sum()))
    batched = [s.sum for s in cloze_scores_many(model, [part_a], IDS, [candidates], prompts=prompts)[0]]
    assert batched == pytest.approx(naive, abs=1e-4)
    unprompted = [s.sum for s in cloze_scores_many(model, [part_a], IDS, [candidates])[0]]
    assert max(abs(a - b) for a, b in zip(batched, unprompted)) > 1e-3, "the prompts matter"
    matrix = cloze_score_matrix(model, [part_a, part_a], IDS, [candidates, candidates[:2]], prompts=prompts)
    assert matrix[0].tolist() == pytest.approx(naive, abs=1e-4)
    assert matrix[1, :2].tolist() == pytest.approx(naive[:2], abs=1e-4) and matrix[1, 2] == float("-inf")


def test_only_the_prompts_learn_and_a_reparameterised_encoder_starts_at_its_init():
    model = tiny(moe_every=2, n_experts=4)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.cfg
    shape = (cfg.n_layers, cfg.n_heads, 4, cfg.d_model // cfg.n_heads)
    init = (torch.randn(shape), torch.randn(shape))
    L, H, P, K = shape
    direct, reparam = PrefixEncoder(L, H, K, P, init_LHPK=init), PrefixEncoder(L, H, K, P, hidden=16, init_LHPK=init)
    torch.testing.assert_close(reparam().key_LHPK, direct().key_LHPK)
    torch.testing.assert_close(reparam().value_LHPK, direct().value_LHPK)
    scores = cloze_score_matrix(model, [[14, 15, IDS.mask, 16]], IDS, [[[20], [21, 22]]], prompts=reparam())
    torch.nn.functional.cross_entropy(scores, torch.tensor([1])).backward()
    assert all(p.grad is None for p in model.parameters())
    # The MLP's output layer starts at zero, so its input layer gets no gradient on the first step; the rest does.
    for p in (reparam.key_LHPK, reparam.value_LHPK, reparam.reparam.f[2].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@torch.no_grad()
def test_prefix_runs_under_bf16_autocast():
    model = tiny(moe_every=2, n_experts=4)
    t = sample_row()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(model, t, t["input_ids_BT"], prefix_for(model))
    assert torch.isfinite(out.float()).all()
