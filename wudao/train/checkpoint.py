"""Checkpoints in the object store: `checkpoints/<run_id>/step-<n>/` with model.safetensors, optim.pt and
manifest.json. The manifest is written last, so a checkpoint without one is incomplete and never loaded."""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from wudao.model import TransformerConfig, TransformerLM
from wudao.storage import ObjectStore, StorageError, join_key, key_in_store


class CheckpointError(RuntimeError):
    pass


@dataclass
class LoadedCheckpoint:
    uri: str
    model: TransformerLM
    manifest: dict[str, Any]
    optimizer_state: dict[str, Any] | None


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"checkpoints/{run_id}/step-{step:08d}"


def save_checkpoint(
    store: ObjectStore,
    prefix: str,
    model: TransformerLM,
    optimizer: torch.optim.Optimizer | None,
    manifest: dict[str, Any],
) -> str:
    with tempfile.TemporaryDirectory(prefix="wudao-ckpt-") as tmp:
        weights = Path(tmp) / "model.safetensors"
        # Tied weights share storage; safetensors refuses shared tensors, so save contiguous copies.
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, weights)
        store.put_file(join_key(prefix, "model.safetensors"), weights)
        if optimizer is not None:
            buf = io.BytesIO()
            torch.save(optimizer.state_dict(), buf)
            store.put_bytes(join_key(prefix, "optim.pt"), buf.getvalue())
    full = {**manifest, "model_config": model.cfg.to_dict(), "files": ["model.safetensors"] + (["optim.pt"] if optimizer else [])}
    return store.commit(prefix, full)


def load_checkpoint(store: ObjectStore, uri: str, *, with_optimizer: bool = False) -> LoadedCheckpoint:
    prefix = key_in_store(store, uri)
    if prefix is None:
        raise CheckpointError(f"checkpoint {uri} is not in the platform's store {store.uri}")
    try:
        manifest = store.read_manifest(prefix)
    except StorageError as e:
        raise CheckpointError(f"cannot read checkpoint {uri}: {e}") from None
    if manifest is None:
        raise CheckpointError(f"checkpoint {uri} is incomplete (no manifest.json): it cannot be loaded")
    model = TransformerLM(TransformerConfig(**manifest["model_config"]))
    with tempfile.TemporaryDirectory(prefix="wudao-ckpt-") as tmp:
        weights = store.get_file(join_key(prefix, "model.safetensors"), Path(tmp) / "model.safetensors")
        model.load_state_dict(load_file(weights))
    optimizer_state = None
    if with_optimizer and "optim.pt" in manifest.get("files", []):
        optimizer_state = torch.load(io.BytesIO(store.get_bytes(join_key(prefix, "optim.pt"))), weights_only=True)
    return LoadedCheckpoint(uri=uri, model=model, manifest=manifest, optimizer_state=optimizer_state)
