"""Mixture-of-Experts FFN: fp32 top-k router, load-balancing + z-loss, capacity or dropless, grouped GEMMs.

Shape suffixes: N tokens (batch flattened), D model width, H expert hidden width, E experts, K router
choices per token (top-k), M = N·K token-expert assignments, A kept assignments (A = M when dropless).

Dispatch follows FastMoE / MegaBlocks: sort assignments by expert (permute), run each expert on its
contiguous slice with one grouped matmul, then scatter the results back weighted by the gate (unpermute).
No Python loop over tokens or experts on the hot path. With expert parallelism (FastMoE's all-to-all) a layer
holds only its rank's experts and an `ExpertExchange` moves the sorted rows to their experts' ranks and back;
the exchange is plugged in by the training code (`wudao.train.expert_parallel`), so this file stays free of
process groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoEStats:
    """What one MoE layer reports besides its output (losses are unweighted; the model applies weights)."""

    load_balance_loss: torch.Tensor
    """E · Σ_e f_e · P_e: f_e = share of the N·K assignments routed to e (before dropping), P_e = mean router
    probability of e. Equals 1 for perfectly uniform routing."""
    z_loss: torch.Tensor
    """mean over tokens of logsumexp(router logits)² (ST-MoE): keeps router logits small, bf16-friendly."""
    tokens_per_expert_E: torch.Tensor
    """Assignments each expert actually processed (after capacity dropping), int64 (E,). Real tokens only."""
    dropped: torch.Tensor
    """Assignments dropped because their expert was full (always 0 when dropless), int64 scalar."""
    routed_tokens: torch.Tensor
    """Tokens that went through the router: the real ones (padding never does), int64 scalar."""


@dataclass
class Dispatch:
    """The permutation that groups assignments by expert: row a of the expert input is token `token_A[a]`."""

    token_A: torch.Tensor
    gate_A: torch.Tensor
    counts_E: torch.Tensor
    dropped: torch.Tensor


class ExpertExchange(Protocol):
    """Moves expert rows between the ranks of an expert-parallel group (each rank holds a contiguous block of
    `n_experts / size` experts). Both calls are collectives: every rank of the group makes them, in step."""

    size: int
    """Ranks in the expert-parallel group."""
    rank: int
    """This rank's place in the group: it holds experts [rank·E/size, (rank+1)·E/size)."""

    def send(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Rows sorted by (global) expert, `counts_E` each -> (rows for this rank's experts, sorted by local
        expert; their counts (E/size,); a handle for `receive`)."""
        ...

    def receive(self, y_LD: torch.Tensor, handle: Any) -> torch.Tensor:
        """The experts' outputs for `send`'s rows, back on their own ranks in the original order (A, D)."""
        ...


def capacity_for(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """GShard: each expert takes at most ⌈factor · N · K / E⌉ assignments."""
    return max(1, math.ceil(factor * n_tokens * top_k / n_experts))


def make_dispatch(expert_NK: torch.Tensor, gate_NK: torch.Tensor, n_experts: int, capacity: int | None) -> Dispatch:
    """Sort assignments by expert; with a capacity, keep the first `capacity` of each expert.

    Assignments are taken slot-major (every token's first choice before any second choice) and the sort is
    stable, so when an expert overflows it drops second choices first, then later tokens (GShard priority).
    """
    N, K = expert_NK.shape
    expert_M = expert_NK.t().reshape(-1)
    token_M = torch.arange(N, device=expert_NK.device).repeat(K)
    gate_M = gate_NK.t().reshape(-1)
    order_M = torch.argsort(expert_M, stable=True)
    counts_E = torch.bincount(expert_M, minlength=n_experts)
    dropped = counts_E.new_zeros(())
    if capacity is not None:
        start_E = torch.cumsum(counts_E, 0) - counts_E
        rank_M = torch.arange(N * K, device=expert_NK.device) - start_E[expert_M[order_M]]
        order_M = order_M[rank_M < capacity]
        dropped = counts_E.sum() - counts_E.clamp(max=capacity).sum()
        counts_E = counts_E.clamp(max=capacity)
    return Dispatch(token_M[order_M], gate_M[order_M], counts_E, dropped)


def grouped_mm_supported(x_AD: torch.Tensor, w_EDH: torch.Tensor) -> bool:
    """`torch._grouped_mm` needs 16-byte aligned row strides; on CUDA it wants bf16 on sm90+ (else we fall back)."""
    if not hasattr(torch, "_grouped_mm") or x_AD.dtype not in (torch.float32, torch.bfloat16):
        return False
    elem = x_AD.element_size()
    if (w_EDH.size(1) * elem) % 16 or (w_EDH.size(2) * elem) % 16:
        return False
    if x_AD.is_cuda:
        return x_AD.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_AD.device) >= (9, 0)
    return x_AD.device.type == "cpu"


def choose_backend(x_AD: torch.Tensor, w_EDH: torch.Tensor, counts_E: torch.Tensor, max_count: int) -> str:
    """ "grouped" or "bmm" for backend="auto".

    On GPU one grouped GEMM kernel is the right tool. On CPU `_grouped_mm` runs one mm per group, each its own
    parallel region: with several threads that costs dearly for many small groups (and stalls when cores are
    shared), while one `bmm` over padded groups is a single parallel region. So with threads, use bmm unless
    padding would add over 25 % FLOPs; single-threaded, grouped (no padding) is the faster one (bench/moe.py).
    """
    if not grouped_mm_supported(x_AD, w_EDH):
        return "bmm"
    if x_AD.is_cuda or torch.get_num_threads() == 1:
        return "grouped"
    return "bmm" if counts_E.numel() * max_count <= 1.25 * x_AD.size(0) else "grouped"


def grouped_ffn(
    x_AD: torch.Tensor, w_in_EDH: torch.Tensor, w_out_EHD: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """GELU FFN of expert e applied to its contiguous rows of x_AD (rows sorted by expert, `counts_E` each).

    backend: "grouped" (torch._grouped_mm), "bmm" (groups padded to the largest, one batched matmul) or "auto".
    """
    w_in_EDH, w_out_EHD = w_in_EDH.to(x_AD.dtype), w_out_EHD.to(x_AD.dtype)
    max_count = int(counts_E.max())  # one host sync: the padded shape, and the CPU backend choice, need it
    if backend == "auto":
        backend = choose_backend(x_AD, w_in_EDH, counts_E, max_count)
    if backend == "grouped":
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)  # end row of each expert's group
        h_AH = F.gelu(torch._grouped_mm(x_AD, w_in_EDH, offs=offs_E))
        return torch._grouped_mm(h_AH, w_out_EHD, offs=offs_E)
    E, A = counts_E.numel(), x_AD.size(0)
    expert_A = torch.repeat_interleave(torch.arange(E, device=x_AD.device), counts_E, output_size=A)
    slot_A = torch.arange(A, device=x_AD.device) - (torch.cumsum(counts_E, 0) - counts_E)[expert_A]
    x_ECD = x_AD.new_zeros(E, max_count, x_AD.size(1)).index_put((expert_A, slot_A), x_AD)
    y_ECD = torch.bmm(F.gelu(torch.bmm(x_ECD, w_in_EDH)), w_out_EHD)
    return y_ECD[expert_A, slot_A]


class MoE(nn.Module):
    """Top-k routed experts with stacked weights w_in (E, D, H) and w_out (E, H, D).

    Expert parameters are the ones named `w_in_EDH` / `w_out_EHD`: with expert parallelism they are sharded
    over the expert-parallel group and must be left out of the data-parallel gradient all-reduce.
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        n_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        router_jitter: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if top_k not in (1, 2) or top_k > n_experts:
            raise ValueError(f"top_k must be 1 or 2 and at most n_experts, got {top_k} with {n_experts} experts")
        if not 0.0 <= router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {router_jitter}")
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor if eval_capacity_factor is not None else capacity_factor
        self.router_jitter = router_jitter
        self.backend = backend
        self.exchange: ExpertExchange | None = None  # set by expert parallelism; the weights are then local
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in_EDH = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_out_EHD = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        nn.init.normal_(self.w_in_EDH, std=0.02)
        nn.init.normal_(self.w_out_EHD, std=0.02)

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router in fp32: logits, probs, gates, experts. bf16 logits make the top-k choices and the softmax
        noisy, and autocast would recast an fp32 matmul to bf16, so autocast is switched off here."""
        with torch.autocast(x_ND.device.type, enabled=False):
            x_ND = x_ND.float()
            if self.training and self.router_jitter > 0:
                # Switch Transformer: multiplicative input noise in training only, so the router explores.
                x_ND = x_ND * torch.empty_like(x_ND).uniform_(1 - self.router_jitter, 1 + self.router_jitter)
            logits_NE = F.linear(x_ND, self.router.weight.float())
            probs_NE = logits_NE.softmax(-1)
            gate_NK, expert_NK = probs_NE.topk(self.top_k, dim=-1)
            if self.top_k > 1:
                # GShard renormalises the top-2 weights; Switch (top-1) keeps the raw probability, which is the
                # router's only gradient path from the output.
                gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True)
        return logits_NE, probs_NE, gate_NK, expert_NK

    def forward(self, x_BTD: torch.Tensor, real_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x_BTD -> (y_BTD, stats). `real_BT` (bool) marks real tokens; padding is not routed at all: it takes no
        expert slot or capacity, adds nothing to f, P or the z-loss, and its output is 0 (the residual passes)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        real_N = None if real_BT is None else real_BT.reshape(-1).bool()
        if real_N is not None and not bool(real_N.all()):
            token_R = real_N.nonzero().squeeze(-1)
            y_RD, stats = self._routed(x_ND[token_R])
            y_ND = x_ND.new_zeros(x_ND.shape, dtype=y_RD.dtype).index_copy_(0, token_R, y_RD)
        else:
            y_ND, stats = self._routed(x_ND)
        return y_ND.view(B, T, D), stats

    def _routed(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """The MoE over N real tokens (N may be 0: then every statistic is 0)."""
        N, E = x_ND.size(0), self.n_experts
        logits_NE, probs_NE, gate_NK, expert_NK = self.route(x_ND)
        # f_e counts all N·K assignments (Switch, torchtitan); GShard counts first choices only, which for top-2
        # under-weights the second expert's load. Both are 1 at uniform routing.
        f_E = torch.bincount(expert_NK.reshape(-1), minlength=E).float() / max(1, N * self.top_k)
        load_balance = E * (f_E * probs_NE.sum(0) / max(1, N)).sum()
        z_loss = torch.logsumexp(logits_NE, -1).square().sum() / max(1, N)

        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = None if factor is None else capacity_for(N, self.top_k, E, factor)
        dispatch = make_dispatch(expert_NK, gate_NK, E, capacity)

        # 1. permute: rows grouped by expert.
        x_AD = x_ND[dispatch.token_A]
        if self.exchange is None:
            # 2. expert compute.
            y_AD = grouped_ffn(x_AD, self.w_in_EDH, self.w_out_EHD, dispatch.counts_E, self.backend)
        else:
            # 2. expert parallelism: an all-to-all sends each expert's rows to the rank that holds it, the
            #    local experts run, and a second all-to-all brings the results back in this order.
            x_LD, counts_local, handle = self.exchange.send(x_AD, dispatch.counts_E)
            y_LD = grouped_ffn(x_LD, self.w_in_EDH, self.w_out_EHD, counts_local, self.backend)
            y_AD = self.exchange.receive(y_LD, handle)
        # 3. unpermute: weighted sum over each token's kept experts; dropped assignments add nothing, so a
        #    fully dropped token passes through the residual connection unchanged.
        weighted_AD = y_AD * dispatch.gate_A.unsqueeze(1).to(y_AD.dtype)
        # In the experts' dtype: under autocast that is bf16 while x_ND may be fp32 (index_add_ needs one dtype).
        y_ND = x_ND.new_zeros(x_ND.shape, dtype=weighted_AD.dtype).index_add_(0, dispatch.token_A, weighted_AD)
        stats = MoEStats(load_balance, z_loss, dispatch.counts_E, dispatch.dropped, torch.tensor(N))
        return y_ND, stats
