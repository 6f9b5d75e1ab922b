"""Process-group plumbing for `torchrun`: DDP over gloo (CPU) or NCCL (GPU); a single process needs none of it.

Only rank 0 writes checkpoints, the catalog and reports; every rank computes the same decisions (LR, skipping a
spiking step) from all-reduced values, so the ranks never diverge.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as torch_dist
from torch import nn


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group that `torchrun` describes in the environment (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch_dist.init_process_group(backend)


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class LossModule(nn.Module):
    """DDP synchronises gradients only for calls through its forward(): make the GLM loss that forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_inputs: dict[str, torch.Tensor]):
        return self.model.loss(**loss_inputs)


def wrap(model: nn.Module, parallel: str = "ddp", ignore: list[str] | None = None) -> nn.Module:
    """DDP or FSDP2 under torchrun; `ignore` names parameters DDP must neither broadcast nor reduce (experts
    sharded by expert parallelism, which reduces their gradients itself)."""
    if world_size() == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device().type, (world_size(),))
        root = LossModule(model)
        for block in model.blocks:  # one all-gather per block: only one block's full weights live at a time
            fully_shard(block, mesh=mesh)
        fully_shard(root, mesh=mesh)
        return root
    ids = [device().index] if device().type == "cuda" else None
    root = LossModule(model)
    if ignore:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            root, [f"model.{n}" for n in ignore]
        )
    # Dropless MoE may leave an expert without tokens in a micro-batch: its weights then get no gradient.
    return nn.parallel.DistributedDataParallel(root, device_ids=ids, find_unused_parameters=True)


def no_sync(module: nn.Module):
    return module.no_sync() if isinstance(module, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) result as a plain tensor; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts keyed by the model's own parameter names, whatever the wrapping
    (none, DDP or FSDP2). A collective: every rank calls it; with several processes only rank 0 gets the values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=world_size() > 1)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def mean(values: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return values
    out = values.clone()
    torch_dist.all_reduce(out)
    return out / world_size()


def barrier() -> None:
    if world_size() > 1:
        torch_dist.barrier()
