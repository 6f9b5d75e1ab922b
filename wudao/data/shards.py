"""Shards of a slice. Token shards: `<name>.bin` holds the token ids of many documents back to back (each ending in
EOS) and `<name>.idx` the int64 document offsets (n_documents + 1 entries), so a reader can memory-map either.
Image shards: WebDataset-style tars of PNGs and their captions."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wudao.storage import ObjectStore, join_key


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


class TokenShardWriter:
    """Streams the token ids of one split (`train`, `heldout`) into shard files under `prefix`, uploading each
    shard as soon as it holds `max_tokens`; `written` describes the uploaded shards for the slice manifest."""

    def __init__(self, store: ObjectStore, prefix: str, split: str, dtype: np.dtype, max_tokens: int, tmp: Path):
        self.store, self.prefix, self.split, self.dtype, self.max_tokens, self.tmp = (
            store,
            prefix,
            split,
            dtype,
            max_tokens,
            tmp,
        )
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.written: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        if self.pending and self.pending_tokens + len(ids) > self.max_tokens:
            self.flush()
        self.pending.append(ids)
        self.pending_tokens += len(ids)

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.split}-{len(self.written):05d}"
        files = write_shard(self.pending, self.tmp / name, self.dtype)
        for path in (files.bin_path, files.idx_path):
            self.store.put_file(join_key(self.prefix, path.name), path)
        sha = hashlib.sha256(files.bin_path.read_bytes()).hexdigest()
        self.written.append(
            {"split": self.split, "name": name, "tokens": files.n_tokens, "documents": files.n_documents, "sha256": sha}
        )
        files.bin_path.unlink()
        files.idx_path.unlink()
        self.pending, self.pending_tokens = [], 0


class ImageShardWriter:
    """WebDataset-style tars under `prefix`: `<n>.png` + `<n>.json` (captions, their token ids, source key)."""

    def __init__(self, store: ObjectStore, prefix: str, max_images: int, tmp: Path):
        self.store, self.prefix, self.max_images, self.tmp = store, prefix, max_images, tmp
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.written: list[dict] = []

    def add(self, png: bytes, captions: list[str], caption_ids: list[list[int]], source_key: str) -> None:
        if self.tar is None:
            self.path = self.tmp / f"images-{len(self.written):05d}.tar"
            self.tar = tarfile.open(self.path, "w")
        n = f"{self.count:08d}"
        meta = json.dumps({"captions": captions, "caption_ids": caption_ids, "source": source_key}, ensure_ascii=False)
        for name, data in ((f"{n}.png", png), (f"{n}.json", meta.encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0  # mtime 0: the same input gives byte-identical shards
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        if self.count >= self.max_images:
            self.flush()

    def flush(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.store.put_file(join_key(self.prefix, self.path.name), self.path)
        sha = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.written.append({"split": "images", "name": self.path.stem, "images": self.count, "sha256": sha})
        self.path.unlink()
        self.tar, self.count = None, 0
