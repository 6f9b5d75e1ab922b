"""Token shards: `<name>.bin` holds the token ids of many documents back to back (each ending in EOS) and
`<name>.idx` the int64 document offsets (n_documents + 1 entries), so a reader can memory-map either."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


@dataclass
class ShardFiles:
    bin_path: Path
    idx_path: Path
    n_tokens: int
    n_documents: int


def write_shard(docs: list[np.ndarray] | list[list[int]], stem: Path, dtype: np.dtype) -> ShardFiles:
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([np.asarray(d, dtype=dtype) for d in docs]) if docs else np.zeros(0, dtype=dtype)
    bin_path, idx_path = stem.with_suffix(".bin"), stem.with_suffix(".idx")
    tokens.tofile(bin_path)
    offsets.tofile(idx_path)
    return ShardFiles(bin_path, idx_path, int(offsets[-1]), len(docs))


def read_tokens(bin_path: Path, dtype: str) -> np.ndarray:
    return np.memmap(bin_path, dtype=np.dtype(dtype), mode="r")
