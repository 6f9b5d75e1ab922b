"""MoE layer: equal to a naive per-token, per-expert reference; aux losses by their formulas; counts; bf16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wudao.model.moe import MoE, capacity_for, grouped_ffn


def naive_moe(moe: MoE, x_ND: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, list[int]]:
    """Token by token: route, respect capacity in GShard priority (all first choices first), sum the experts."""
    probs_NE = (x_ND @ moe.router.weight.T).softmax(-1)
    gate_NK, expert_NK = probs_NE.topk(moe.top_k, dim=-1)
    if moe.top_k > 1:
        gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True)
    y_ND = torch.zeros_like(x_ND)
    fill = [0] * moe.n_experts
    for slot in range(moe.top_k):
        for n in range(x_ND.size(0)):
            e = int(expert_NK[n, slot])
            if capacity is not None and fill[e] >= capacity:
                continue
            fill[e] += 1
            h = F.gelu(x_ND[n] @ moe.w_in_EDH[e]) @ moe.w_out_EHD[e]
            y_ND[n] += gate_NK[n, slot] * h
    return y_ND, fill


@pytest.mark.parametrize("backend", ["grouped", "bmm"])
@pytest.mark.parametrize("top_k,factor", [(1, None), (2, None), (1, 0.6), (2, 0.5), (2, 1.25)])
def test_moe_equals_naive_reference(backend, top_k, factor):
    torch.manual_seed(0)
    moe = MoE(d_model=16, hidden=32, n_experts=4, top_k=top_k, capacity_factor=factor, backend=backend)
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)  # decisive, uneven routing so capacity really drops tokens
    x_BTD = torch.randn(2, 12, 16)
    y_BTD, stats = moe(x_BTD)
    capacity = None if factor is None else capacity_for(24, top_k, 4, factor)
    ref_ND, fill = naive_moe(moe, x_BTD.reshape(-1, 16), capacity)
    torch.testing.assert_close(y_BTD.reshape(-1, 16), ref_ND, atol=1e-5, rtol=1e-5)
    assert stats.tokens_per_expert_E.tolist() == fill
    assert int(stats.dropped) == 24 * top_k - sum(fill)
    if factor is not None and factor < 1:
        assert int(stats.dropped) > 0, "the example must exercise dropping"


def test_grouped_and_bmm_backends_agree_in_backward():
    torch.manual_seed(1)
    x_AD = torch.randn(30, 16, requires_grad=True)
    w_in = torch.randn(5, 16, 32, requires_grad=True)
    w_out = torch.randn(5, 32, 16, requires_grad=True)
    counts_E = torch.tensor([7, 0, 12, 1, 10])
    grads = []
    for backend in ("grouped", "bmm"):
        y = grouped_ffn(x_AD, w_in, w_out, counts_E, backend)
        grads.append((y, *torch.autograd.grad(y.square().sum(), (x_AD, w_in, w_out))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_aux_losses_equal_their_formulas_on_a_hand_example():
    moe = MoE(d_model=2, hidden=4, n_experts=2, top_k=1)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))  # logits = x
    x_ND = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.5]])
    with torch.no_grad():
        _, stats = moe(x_ND[None])
    # Router probabilities of expert 0, by hand: softmax([a, b])_0 = 1 / (1 + e^(b - a)).
    p0 = [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(0.5))]
    P = [sum(p0) / 4, sum(1 - p for p in p0) / 4]
    f = [2 / 4, 2 / 4]  # top-1 choices: tokens 0 and 2 -> expert 0; tokens 1 and 3 -> expert 1
    assert float(stats.load_balance_loss) == pytest.approx(2 * (f[0] * P[0] + f[1] * P[1]), rel=1e-6)
    lse = [math.log(math.exp(a) + math.exp(b)) for a, b in x_ND.tolist()]
    assert float(stats.z_loss) == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)
    assert stats.tokens_per_expert_E.tolist() == [2, 2]


def test_gradients_reach_router_experts_and_inputs():
    torch.manual_seed(2)
    for top_k in (1, 2):
        moe = MoE(d_model=16, hidden=32, n_experts=4, top_k=top_k)
        x = torch.randn(1, 8, 16, requires_grad=True)
        y, stats = moe(x)
        (y.square().sum() + stats.load_balance_loss + stats.z_loss).backward()
        for p in (x, moe.router.weight, moe.w_in_EDH, moe.w_out_EHD):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_bf16_forward_backward_is_finite():
    torch.manual_seed(3)
    moe = MoE(d_model=16, hidden=32, n_experts=4, top_k=2, capacity_factor=1.25).to(torch.bfloat16)
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    y, stats = moe(x)
    assert y.dtype == torch.bfloat16 and stats.load_balance_loss.dtype == torch.float32  # router in fp32
    (y.float().square().sum() + stats.z_loss).backward()
    assert torch.isfinite(x.grad).all()


def test_padding_is_not_routed_and_real_tokens_see_no_difference():
    """Pads take no expert slot: with a capacity, the real tokens' output and statistics equal a run on the
    real tokens alone; pads get 0 (the residual passes) and are in no count."""
    torch.manual_seed(4)
    moe = MoE(d_model=16, hidden=32, n_experts=4, top_k=2, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)
    x_BTD = torch.randn(2, 12, 16)
    real_BT = torch.arange(12).expand(2, 12) < torch.tensor([[9], [5]])  # 14 real tokens, 10 pads
    y_BTD, stats = moe(x_BTD, real_BT)
    y_alone, alone = moe(x_BTD[real_BT][None])
    torch.testing.assert_close(y_BTD[real_BT], y_alone[0], atol=1e-6, rtol=0)
    assert (y_BTD[~real_BT] == 0).all()
    assert stats.tokens_per_expert_E.tolist() == alone.tokens_per_expert_E.tolist()
    assert int(stats.tokens_per_expert_E.sum() + stats.dropped) == 2 * 14 and int(stats.routed_tokens) == 14
    for name in ("load_balance_loss", "z_loss", "dropped"):
        assert getattr(stats, name).item() == pytest.approx(getattr(alone, name).item(), rel=1e-6)
    # Without the mask the same pads are routed and change what the real tokens get: the mask matters here.
    y_unmasked, unmasked = moe(x_BTD)
    assert int(unmasked.tokens_per_expert_E.sum() + unmasked.dropped) == 2 * 24
    assert not torch.allclose(y_unmasked[real_BT], y_BTD[real_BT])


def test_a_batch_of_padding_only_routes_nothing():
    moe = MoE(d_model=8, hidden=16, n_experts=4, top_k=2)
    x = torch.randn(1, 5, 8, requires_grad=True)
    y, stats = moe(x, torch.zeros(1, 5, dtype=torch.bool))
    assert (y == 0).all() and int(stats.tokens_per_expert_E.sum()) == 0 and int(stats.routed_tokens) == 0
    assert float(stats.load_balance_loss) == 0 and float(stats.z_loss) == 0
    (y.sum() + stats.load_balance_loss).backward()  # no NaN from empty means
    assert torch.isfinite(x.grad).all()


def test_router_is_fp32_under_cpu_bf16_autocast():
    torch.manual_seed(5)
    moe = MoE(d_model=16, hidden=32, n_experts=4, top_k=2)
    x_ND = torch.randn(64, 16)
    reference_NE = x_ND.double() @ moe.router.weight.double().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_NE, probs_NE, gate_NK, _ = moe.route(x_ND)
        assert F.linear(x_ND, moe.router.weight).dtype == torch.bfloat16, "autocast is on: a plain linear is bf16"
        y, stats = moe(x_ND[None])
    assert logits_NE.dtype == probs_NE.dtype == gate_NK.dtype == torch.float32
    torch.testing.assert_close(logits_NE.double(), reference_NE, atol=1e-5, rtol=1e-5)
    assert stats.load_balance_loss.dtype == stats.z_loss.dtype == torch.float32


def test_router_jitter_only_in_training():
    torch.manual_seed(6)
    x_ND = torch.randn(32, 16)
    moe = MoE(d_model=16, hidden=32, n_experts=4, top_k=2, router_jitter=0.1)
    a, b = moe.route(x_ND)[0], moe.route(x_ND)[0]
    assert not torch.equal(a, b), "training: each call draws new noise"
    moe.eval()
    torch.testing.assert_close(moe.route(x_ND)[0], x_ND @ moe.router.weight.T, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="router_jitter"):
        MoE(d_model=16, hidden=32, n_experts=4, router_jitter=1.5)


def test_eval_capacity_factor_applies_in_eval_mode_only():
    torch.manual_seed(7)
    moe = MoE(d_model=16, hidden=32, n_experts=4, top_k=2, capacity_factor=0.5, eval_capacity_factor=4.0)
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)
    x = torch.randn(1, 24, 16)
    assert int(moe(x)[1].dropped) > 0
    assert int(moe.eval()(x)[1].dropped) == 0
