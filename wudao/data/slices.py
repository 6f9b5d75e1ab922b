"""Reading committed slices: a slice exists for readers only once its `manifest.json` is written (the commit), and
every shard is fetched into a local cache, verified against the store's checksum, before it is read."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wudao.data.shards import read_tokens
from wudao.errors import WudaoError
from wudao.storage import ObjectStore, join_key


class SliceError(WudaoError):
    """A slice that was never committed (or not in this store)."""


def slice_manifest(store: ObjectStore, slice_id: str) -> dict:
    manifest = store.read_manifest(f"slices/{slice_id}")
    if manifest is None:
        raise SliceError(f"slice {slice_id} has no committed manifest in {store.uri}")
    return manifest


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


def load_slice_images(store: ObjectStore, slice_id: str, cache_dir: Path) -> list[tuple[bytes, list[list[int]]]]:
    """(PNG bytes, caption token ids) of every image in a slice's image shards."""
    out = []
    for shard in slice_manifest(store, slice_id)["shards"]:
        if shard["split"] != "images":
            continue
        key = join_key("slices", slice_id, f"{shard['name']}.tar")
        local = cache_dir / key
        if not local.exists():
            store.get_file(key, local)
        with tarfile.open(local) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                meta = json.loads(tar.extractfile(members[name[:-4] + ".json"]).read())
                out.append((tar.extractfile(members[name]).read(), meta["caption_ids"]))
    return out
