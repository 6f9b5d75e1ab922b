"""The MS-COCO side of FID: the captions index of a split, the seeded caption order, and the real images.

Real images go through the ingest's own `normalize_image` (center crop, resize), so the real and the ingested
sides are cropped and resized alike. `FIDError` lives here, the lowest of the FID modules (`wudao.eval.fid`
imports it from here), so that a dataset that cannot be read fails as every other FID misconfiguration does.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from wudao.data.formats import parse_coco_captions
from wudao.data.images import ImageRejected, normalize_image
from wudao.data.quarantine import Reason
from wudao.errors import WudaoError
from wudao.storage import ObjectStore, StorageError


class FIDError(WudaoError):
    """FID cannot run as configured; the message says what to set."""


@dataclass(frozen=True)
class CocoIndex:
    split: str
    files: dict[int, str]
    captions: dict[int, list[str]]
    present: frozenset[str]
    digest: str
    """sha256 of the captions file and of the split's listing (key, size, etag): the reference cache's key."""


def load_coco(store: ObjectStore, split: str | None = None) -> CocoIndex:
    if split is None:
        matches = (re.fullmatch(r"annotations/captions_(\w+)\.json", o.key) for o in store.list("annotations/"))
        found = sorted(m.group(1) for m in matches if m)
        vals = [s for s in found if s.startswith("val")]
        if len(found) != 1 and len(vals) != 1:
            raise FIDError(
                f"{store.uri}: expected one annotations/captions_<split>.json, found {found or 'none'}; "
                "set eval.fid_split (WUDAO_EVAL__FID_SPLIT)"
            )
        split = found[0] if len(found) == 1 else vals[0]
    key = f"annotations/captions_{split}.json"
    try:
        raw = store.get_bytes(key)
        parsed = parse_coco_captions(raw)
        files = {int(i): str(name) for i, name in parsed.files.items()}
        captions = {int(i): c for i, c in parsed.captions.items()}
    except StorageError as e:
        raise FIDError(
            f"no {store.url(key)}: give an MS-COCO root (annotations/captions_<split>.json + <split>/ images)"
        ) from e
    except (ValueError, KeyError, TypeError) as e:
        raise FIDError(f"{store.url(key)} is not an MS-COCO captions file: {e}") from e
    digest = hashlib.sha256(raw)
    listing = sorted(store.list(f"{split}/"), key=lambda o: o.key)
    for o in listing:
        digest.update(f"{o.key}\0{o.size}\0{o.etag}\n".encode())
    return CocoIndex(split, files, captions, frozenset(o.key for o in listing), digest.hexdigest())


def caption_order(index: CocoIndex, seed: int) -> list[tuple[int, str]]:
    """Every captioned image in a seeded order, each with one seeded choice among its captions."""
    ids = sorted(i for i in index.files if index.captions.get(i))
    random.Random(seed).shuffle(ids)
    return [(i, random.Random(f"{seed}:{i}").choice(index.captions[i])) for i in ids]


def read_real(
    store: ObjectStore, index: CocoIndex, image_ids: list[int], size: int, max_pixels: int
) -> list[np.ndarray | str]:
    """Each image center-cropped and resized (uint8 HWC), or the reason it was skipped."""

    def one(image_id: int) -> np.ndarray | str:
        key = f"{index.split}/{index.files[image_id]}"
        if key not in index.present:
            return Reason.MISSING_IMAGE
        try:
            # The ingest's own normalisation (PNG round trip is lossless), so both paths crop and resize alike.
            png = normalize_image(store.get_bytes(key), size, max_pixels)
        except ImageRejected as e:
            return e.reason
        except StorageError:
            return Reason.UNREADABLE
        with Image.open(io.BytesIO(png)) as img:
            return np.asarray(img.convert("RGB"))

    with ThreadPoolExecutor(max_workers=8) as pool:  # S3 reads are latency-bound
        return list(pool.map(one, image_ids))
