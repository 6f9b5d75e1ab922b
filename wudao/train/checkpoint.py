"""Checkpoints in the object store: `checkpoints/<run_id>/step-<n>/`.

    model.safetensors   weights (safetensors: loading never unpickles)
    config.json         the model config
    optim.pt            optimizer state (torch.load(weights_only=True))
    rng.pt              torch RNG state (weights_only as well)
    train_state.json    step, LR schedule, loader state, spike-guard window, metrics so far
    manifest.json       written last: a checkpoint without it is incomplete and never loaded

Older complete checkpoints of a run are pruned down to `keep_last`, manifest first, so a half-pruned checkpoint
is never mistaken for a complete one.
"""

from __future__ import annotations

import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from wudao.errors import WudaoError
from wudao.model import GLMConfig, GLMModel
from wudao.storage import MANIFEST, LocalStore, ObjectStore, StorageError, join_key, key_in_store

_STEP_DIR = re.compile(r"^checkpoints/([^/]+)/step-(\d{8})/manifest\.json$")
_ANY_STEP = re.compile(r"^step-(\d{8})/")


class CheckpointError(WudaoError):
    pass


@dataclass
class LoadedCheckpoint:
    uri: str
    model: GLMModel
    manifest: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    rng_state: torch.Tensor | None = None
    train_state: dict[str, Any] | None = None


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"checkpoints/{run_id}/step-{step:08d}"


def save_checkpoint(
    store: ObjectStore,
    prefix: str,
    model: GLMModel,
    manifest: dict[str, Any],
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint; `model_state` / `optimizer_state` are full state dicts (see `dist.full_state`)."""
    weights_state = model_state if model_state is not None else model.state_dict()
    with tempfile.TemporaryDirectory(prefix="wudao-ckpt-") as tmp:
        weights = Path(tmp) / "model.safetensors"
        # Tied weights share storage and safetensors refuses shared tensors: save contiguous copies.
        save_file({k: v.detach().contiguous().clone() for k, v in weights_state.items()}, weights)
        store.put_file(join_key(prefix, "model.safetensors"), weights)
    store.put_json(join_key(prefix, "config.json"), model.cfg.to_dict())
    files = ["model.safetensors", "config.json"]
    if optimizer_state is not None:
        store.put_bytes(join_key(prefix, "optim.pt"), _torch_bytes(optimizer_state))
        store.put_bytes(join_key(prefix, "rng.pt"), _torch_bytes({"cpu": torch.get_rng_state()}))
        files += ["optim.pt", "rng.pt"]
    if train_state is not None:
        store.put_json(join_key(prefix, "train_state.json"), train_state)
        files.append("train_state.json")
    return store.commit(prefix, {**manifest, "model_config": model.cfg.to_dict(), "files": files})


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_manifest(store: ObjectStore, uri: str) -> dict[str, Any]:
    """The manifest of a complete checkpoint (run id, slices, tokenizer, step, parent, model config)."""
    prefix = key_in_store(store, uri)
    if prefix is None:
        raise CheckpointError(f"checkpoint {uri} is not in the platform's store {store.uri}")
    try:
        manifest = store.read_manifest(prefix)
    except StorageError as e:
        raise CheckpointError(f"cannot read checkpoint {uri}: {e}") from e
    if manifest is None:
        raise CheckpointError(f"checkpoint {uri} is incomplete (no manifest.json): it cannot be loaded")
    return manifest


def load_checkpoint(store: ObjectStore, uri: str, *, full: bool = False) -> LoadedCheckpoint:
    """Load a complete checkpoint; `full` also restores optimizer, RNG and training state (for resuming)."""
    manifest = read_manifest(store, uri)
    prefix = key_in_store(store, uri)
    model = GLMModel(GLMConfig(**manifest["model_config"]))
    with tempfile.TemporaryDirectory(prefix="wudao-ckpt-") as tmp:
        weights = store.get_file(join_key(prefix, "model.safetensors"), Path(tmp) / "model.safetensors")
        model.load_state_dict(load_file(weights))
    out = LoadedCheckpoint(uri=uri, model=model, manifest=manifest)
    if full and "optim.pt" in manifest.get("files", []):
        out.optimizer_state = torch.load(io.BytesIO(store.get_bytes(join_key(prefix, "optim.pt"))), weights_only=True)
        out.rng_state = torch.load(io.BytesIO(store.get_bytes(join_key(prefix, "rng.pt"))), weights_only=True)["cpu"]
        out.train_state = store.get_json(join_key(prefix, "train_state.json"))
    return out


def complete_steps(store: ObjectStore, run_id: str) -> list[int]:
    """Steps of the run's complete checkpoints (those with a manifest), oldest first."""
    steps = []
    for obj in store.list(f"checkpoints/{run_id}/"):
        m = _STEP_DIR.match(obj.key)
        if m and m.group(1) == run_id:
            steps.append(int(m.group(2)))
    return sorted(steps)


def prune(store: ObjectStore, run_id: str, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` complete checkpoints, and every incomplete one older than the newest
    complete (what a kill mid-save left: files without a manifest, never loaded). Returns the complete steps
    deleted."""
    steps = complete_steps(store, run_id)
    doomed = steps[:-keep_last] if keep_last else steps
    for step in doomed:
        prefix = checkpoint_prefix(run_id, step)
        store.delete(join_key(prefix, MANIFEST))  # first: from here on it no longer counts as complete
        store.delete_prefix(prefix + "/")
    if steps:
        run_prefix = f"checkpoints/{run_id}/"
        keys = [o.key for o in store.list(run_prefix)]
        if isinstance(store, LocalStore):  # a folder may also hold only the temporaries of a killed write
            keys += [o.key for o, _ in store.skipped(run_prefix)]
        present = {int(m.group(1)) for k in keys if (m := _ANY_STEP.match(k.removeprefix(run_prefix)))}
        for step in sorted(present - set(steps)):
            if step < steps[-1]:
                store.delete_prefix(checkpoint_prefix(run_id, step) + "/")
    return doomed
