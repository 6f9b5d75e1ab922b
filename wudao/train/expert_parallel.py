"""Expert parallelism (FastMoE / GShard): each rank holds `n_experts / P` experts of every MoE layer.

With W ranks and `train.expert_parallel` = P, ranks form W/P expert-parallel groups of P consecutive ranks
({0..P-1}, {P..2P-1}, ...). Inside a group the experts are split, and an all-to-all sends every token's rows to
the rank that holds its expert and back (variable split sizes: routing decides them each step). Ranks at the
same place in different groups hold the same experts: they form the expert-data-parallel group, over which
the expert gradients are summed. Everything else (attention, router, embeddings) is replicated and reduced by
DDP as usual; the expert weights are hidden from DDP.

Gradient scale: every rank's loss is its own mean, and DDP averages the dense gradients over the W ranks. The
all-to-all's backward already sums, into each expert, the gradients of all P losses of its group; adding the
replicas' sums and dividing by W gives the same gradient as one process on the global batch.

Checkpoints stay full state dicts: `gather_full` concatenates the experts (weights and AdamW moments) of the
group before rank 0 saves, and `local_optimizer_state` / `shard_experts` cut a full state to this rank's block,
so a run saved at any P resumes at any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from wudao.model.moe import MoE

EXPERT_PARAMS = ("w_in_EDH", "w_out_EHD")
"""Names of the stacked expert weights in an MoE layer (experts along dim 0)."""


def is_expert_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in EXPERT_PARAMS


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with split sizes; its backward is the reverse exchange (gradients go home)."""

    @staticmethod
    def forward(ctx, x_AD: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_AD.new_empty((sum(out_splits), *x_AD.shape[1:]))
        torch_dist.all_to_all_single(out, x_AD.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        torch_dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


@dataclass
class AllToAllExchange:
    """The `ExpertExchange` of `wudao.model.moe` over one expert-parallel process group."""

    size: int
    rank: int
    group: Any

    def send(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        P = self.size
        send_counts_PL = counts_E.reshape(P, -1)  # rows for rank p's local experts
        recv_counts_PL = torch.empty_like(send_counts_PL)  # rows from rank p for each of my experts
        torch_dist.all_to_all_single(recv_counts_PL, send_counts_PL.contiguous(), group=self.group)
        in_splits, out_splits = send_counts_PL.sum(1).tolist(), recv_counts_PL.sum(1).tolist()
        x_RD = _AllToAll.apply(x_AD, out_splits, in_splits, self.group)  # source-major, then local expert
        L = recv_counts_PL.size(1)
        expert_R = torch.repeat_interleave(
            torch.arange(L, device=x_AD.device).repeat(P), recv_counts_PL.reshape(-1), output_size=x_RD.size(0)
        )
        order_R = torch.argsort(expert_R, stable=True)  # local-expert-major, sources in rank order inside
        return x_RD[order_R], recv_counts_PL.sum(0), (order_R, in_splits, out_splits)

    def receive(self, y_LD: torch.Tensor, handle: Any) -> torch.Tensor:
        order_R, in_splits, out_splits = handle
        y_RD = torch.empty_like(y_LD).index_copy(0, order_R, y_LD)  # back to source-major order
        return _AllToAll.apply(y_RD, in_splits, out_splits, self.group)


@dataclass
class ExpertGroups:
    """This rank's expert-parallel group (split experts) and expert-data-parallel group (same experts)."""

    size: int
    rank: int
    world: int
    group: Any
    replica_group: Any | None
    """Ranks holding the same experts as this one; None when there is a single expert-parallel group."""

    def block(self, n_experts: int) -> slice:
        local = n_experts // self.size
        return slice(self.rank * local, (self.rank + 1) * local)


def make_groups(expert_parallel: int) -> ExpertGroups:
    """Create the groups (a collective: every rank calls it with the same value)."""
    world, me = torch_dist.get_world_size(), torch_dist.get_rank()
    P = expert_parallel
    group = replica_group = None
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    for start in range(0, world, P):
        g = torch_dist.new_group(list(range(start, start + P)))
        if start <= me < start + P:
            group = g
    if world > P:
        for offset in range(P):
            g = torch_dist.new_group(list(range(offset, world, P)))
            if me % P == offset:
                replica_group = g
    return ExpertGroups(P, me % P, world, group, replica_group)


def check(expert_parallel: int, world: int, n_experts: int, moe_layers: int, parallel: str) -> str | None:
    """Why this expert-parallel setting cannot run, or None."""
    if expert_parallel == 1:
        return None
    if moe_layers == 0:
        return f"train.expert_parallel={expert_parallel} needs MoE layers (model.moe_every > 0)"
    if world % expert_parallel:
        return f"train.expert_parallel={expert_parallel} must divide the {world} processes (torchrun --nproc-per-node)"
    if n_experts % expert_parallel:
        return f"train.expert_parallel={expert_parallel} must divide model.n_experts={n_experts}"
    if parallel != "ddp":
        return f"train.expert_parallel={expert_parallel} works with train.parallel=ddp, not {parallel!r}"
    return None


def shard_experts(model: nn.Module, groups: ExpertGroups) -> list[str]:
    """Keep this rank's block of experts in every MoE layer and plug in the all-to-all; returns the names of
    the (now local) expert parameters, to be hidden from DDP."""
    names = []
    exchange = AllToAllExchange(groups.size, groups.rank, groups.group)
    for module_name, module in model.named_modules():
        if isinstance(module, MoE):
            block = groups.block(module.n_experts)
            for p in EXPERT_PARAMS:
                setattr(module, p, nn.Parameter(getattr(module, p).detach()[block].clone()))
                names.append(f"{module_name}.{p}")
            module.exchange = exchange
    return names


def reduce_expert_grads(model: nn.Module, groups: ExpertGroups) -> None:
    """Expert gradients as one process on the global batch would have them (see the module docstring)."""
    for name, p in model.named_parameters():
        if is_expert_param(name) and p.grad is not None:
            if groups.replica_group is not None:
                torch_dist.all_reduce(p.grad, group=groups.replica_group)
            p.grad.div_(groups.world)


def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ExpertGroups) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole model, experts of every rank included: the replicated
    parameters count once, each expert once (their squares summed over the expert-parallel group)."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    device = named[0][1].device
    dense_sq, expert_sq = torch.zeros((), device=device), torch.zeros((), device=device)
    for name, g in named:
        sq = torch.linalg.vector_norm(g.float(), 2).square()
        if is_expert_param(name):
            expert_sq += sq
        else:
            dense_sq += sq
    torch_dist.all_reduce(expert_sq, group=groups.group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for _, g in named:
        g.mul_(coef.to(g.dtype))
    return total


def gather_full(state: dict[str, torch.Tensor], model: nn.Module, groups: ExpertGroups) -> dict[str, torch.Tensor]:
    """Full expert tensors (experts of the whole group, in order, on the CPU) in a state dict keyed like the
    model's parameters; other entries pass through. A collective over the expert-parallel group."""
    out = dict(state)
    for name, p in model.named_parameters():
        if is_expert_param(name):
            out[name] = _gather(p.detach(), groups)
    return out


def gather_full_optimizer(
    state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, groups: ExpertGroups
) -> dict:
    """The same for a full optimizer state dict (`{"state": {param name: {"exp_avg": ...}}, ...}`). The moments
    come from `optimizer` itself, so every rank gathers the same tensors in the same order even where the
    state dict is empty (ranks other than 0)."""
    per_param = dict(state.get("state", {}))
    for name, p in model.named_parameters():
        if is_expert_param(name) and optimizer.state.get(p):
            full = {k: _gather(v, groups) for k, v in sorted(optimizer.state[p].items()) if _is_moment(v)}
            if name in per_param:
                per_param[name] = {**per_param[name], **full}
    return {**state, "state": per_param}


def local_optimizer_state(state: dict, model: nn.Module, groups: ExpertGroups) -> dict:
    """A full optimizer state cut to this rank's experts (the inverse of `gather_full_optimizer`)."""
    per_param = dict(state.get("state", {}))
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            block = groups.block(module.n_experts)
            for p in EXPERT_PARAMS:
                key = f"{name}.{p}"
                if key in per_param:
                    per_param[key] = {k: v[block].clone() if _is_moment(v) else v for k, v in per_param[key].items()}
    return {**state, "state": per_param}


def _is_moment(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim == 3  # exp_avg / exp_avg_sq of (E, ., .) weights, not `step`


def _gather(t: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(groups.size)]
    torch_dist.all_gather(parts, t.contiguous(), group=groups.group)
    return torch.cat(parts, 0).cpu()
