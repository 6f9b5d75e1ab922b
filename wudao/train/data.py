"""Training windows drawn from slice shards: the new slice mixed with replay of earlier slices.

Sampling is a pure function of (seed, step), so the same run draws the same batches on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wudao.data.ingest import slice_manifest
from wudao.data.shards import read_tokens
from wudao.storage import ObjectStore, join_key


@dataclass
class SliceTokens:
    slice_id: str
    tokenizer_version: str
    tokens: np.ndarray


def load_slice_tokens(store: ObjectStore, slice_id: str, split: str, cache_dir: Path) -> SliceTokens:
    """All tokens of one split of a slice, from a local cache filled from (and verified against) the store."""
    manifest = slice_manifest(store, slice_id)
    parts = []
    for shard in manifest["shards"]:
        if shard["split"] != split:
            continue
        key = join_key("slices", slice_id, f"{shard['name']}.bin")
        local = cache_dir / key
        if not local.exists():
            store.get_file(key, local)
        parts.append(np.asarray(read_tokens(local, manifest["dtype"])))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.dtype(manifest["dtype"]))
    return SliceTokens(slice_id, manifest["tokenizer_version"], tokens)


class MixtureSampler:
    """Batches of `seq_len + 1` token windows: from `new` with probability 1 - replay, else from `old`."""

    def __init__(self, new: SliceTokens, old: list[SliceTokens], *, seq_len: int, replay_fraction: float, seed: int):
        self.sources = [s for s in [new, *old] if len(s.tokens) > 0]
        if not self.sources or len(new.tokens) == 0:
            raise ValueError(f"slice {new.slice_id} has no training tokens")
        self.new, self.old = new, [s for s in old if len(s.tokens) > 0]
        self.seq_len, self.replay, self.seed = seq_len, replay_fraction if self.old else 0.0, seed

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        rows = []
        for _ in range(batch_size):
            src = self.old[rng.integers(len(self.old))] if rng.random() < self.replay else self.new
            rows.append(_window(src.tokens, int(rng.integers(len(src.tokens))), self.seq_len + 1))
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def _window(tokens: np.ndarray, start: int, length: int) -> np.ndarray:
    """`length` tokens from `start`, wrapping around the end (short slices still give full windows)."""
    idx = (start + np.arange(length)) % len(tokens)
    return tokens[idx]


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows covering the start of `tokens` (deterministic; at least one window)."""
    n = max(1, min(max_windows, (len(tokens) - 1) // seq_len))
    rows = [_window(tokens, i * seq_len, seq_len + 1) for i in range(n)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))
