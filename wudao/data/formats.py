"""Streaming readers for every input format, and the plan that groups a listing into work items.

Text: `*.txt` (one document), `*.jsonl` / `*.jsonl.gz` (field `text`), `*.parquet` (column `text`).
Images: MS-COCO layout (`annotations/captions_<split>.json` + `<split>/` images) and `name.jpg|png` +
`name.txt` pairs. Readers yield records or `Rejected` items with a named reason; they never raise for bad input,
and they never hold more than one record (or one parquet row group) in memory.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from wudao.data.quarantine import Reason, Rejected
from wudao.storage import ObjectInfo, ObjectStore, StorageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
COCO_CAPTIONS = re.compile(r"(?:^|/)annotations/captions_([A-Za-z0-9_-]+)\.json$")


@dataclass
class TextRecord:
    key: str
    record: int | None
    text: str


@dataclass
class ImageRecord:
    key: str
    """The image's object key."""
    captions: list[str]
    data: bytes


def encodable(text: str) -> bool:
    """False for a string that no UTF-8 consumer accepts: a lone surrogate, from a JSON `"\\ud800"` escape or
    from a file name that is not UTF-8 (Python keeps its bytes as surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable_key(key: str) -> str:
    """A key that can be stored and shown even when the file name is not UTF-8 (bad bytes as `\\udcff`)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class WorkItem:
    """One unit of reading: a text object, an image with its caption file, or one COCO image with its captions."""

    kind: str
    """`text`, `pair`, `coco` or `unsupported`."""
    key: str
    objects: list[ObjectInfo] = field(default_factory=list)
    """Every object whose bytes this item reads (recorded as seen when the slice commits)."""
    captions: list[str] = field(default_factory=list)


def plan(listing: list[ObjectInfo], is_new, store: ObjectStore, rejected: list[Rejected]) -> list[WorkItem]:
    """Group a listing into work items, keeping only items that involve at least one new object.

    `is_new(obj)` says whether an object version was not ingested before. COCO annotation files are read here
    (they are small indexes); a new or changed annotation file re-reads its images.
    """
    by_key = {o.key: o for o in listing}
    items: list[WorkItem] = []
    claimed: set[str] = set()
    for ann in (o for o in listing if COCO_CAPTIONS.search(o.key)):
        claimed.add(ann.key)
        items.extend(_coco_items(ann, by_key, is_new, store, rejected, claimed))
    stems = {}
    for o in listing:
        stem, ext = posixpath.splitext(o.key)
        if ext.lower() in IMAGE_SUFFIXES:
            stems[stem] = o
    for o in listing:
        if o.key in claimed:
            continue
        stem, ext = posixpath.splitext(o.key)
        if ext.lower() in IMAGE_SUFFIXES:
            caption = by_key.get(stem + ".txt")
            if caption is None:
                if is_new(o):
                    rejected.append(Rejected(o.key, None, Reason.MISSING_CAPTION, "no .txt beside the image"))
                    items.append(WorkItem("unsupported", o.key, [o]))  # recorded as seen, with its reason
                continue
            claimed.add(caption.key)
            if is_new(o) or is_new(caption):
                items.append(WorkItem("pair", o.key, [o, caption]))
        elif o.key.endswith(".txt") and stem in stems:
            continue  # a caption, handled with its image
        elif o.key.endswith(tuple(TEXT_READERS)):
            if is_new(o):
                items.append(WorkItem("text", o.key, [o]))
        elif is_new(o):
            rejected.append(Rejected(o.key, None, Reason.UNSUPPORTED_TYPE, ext or "no extension"))
            items.append(WorkItem("unsupported", o.key, [o]))
    return items


def _coco_items(ann, by_key, is_new, store, rejected, claimed) -> list[WorkItem]:
    split = COCO_CAPTIONS.search(ann.key).group(1)
    root = ann.key[: COCO_CAPTIONS.search(ann.key).start()].rstrip("/")
    ann_new = is_new(ann)
    try:
        index = parse_coco_captions(store.get_bytes(ann.key))
    except (ValueError, StorageError) as e:
        if ann_new:
            rejected.append(Rejected(ann.key, None, Reason.MALFORMED_JSON, f"not a COCO captions file: {e}"[:200]))
            return [WorkItem("unsupported", ann.key, [ann])]
        return []
    images, captions = index.files, index.captions
    if ann_new:
        rejected += [
            Rejected(
                ann.key,
                _record(image_id),
                Reason.INVALID_UNICODE,
                f"caption of image {image_id!r} holds a lone surrogate escape"[:200],
            )
            for image_id in index.unencodable
        ]
    items = []
    # Ids of mixed types (1 and "1") cannot be compared: order by type name, then value, which is stable.
    for image_id, file_name in sorted(images.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0]))):
        if not isinstance(file_name, str) or not encodable(file_name):
            if ann_new:
                rejected.append(
                    Rejected(
                        ann.key,
                        _record(image_id),
                        Reason.MALFORMED_JSON,
                        f"image {image_id!r}: file_name {file_name!r} is not a string"[:200],
                    )
                )
            continue
        key = posixpath.join(root, split, file_name) if root else posixpath.join(split, file_name)
        claimed.add(key)
        obj = by_key.get(key)
        if obj is None:
            if ann_new:
                rejected.append(Rejected(ann.key, _record(image_id), Reason.MISSING_IMAGE, key))
            continue
        if not captions.get(image_id):
            if ann_new or is_new(obj):
                rejected.append(Rejected(key, None, Reason.MISSING_CAPTION, "no annotation for this image"))
            continue
        if ann_new or is_new(obj):
            items.append(WorkItem("coco", key, [obj], captions[image_id]))
    if ann_new:
        items.append(WorkItem("unsupported", ann.key, [ann]))  # the index itself: only recorded as seen
    return items


@dataclass
class CocoCaptions:
    """An MS-COCO captions file (`annotations/captions_<split>.json`) as found: ids are kept as they are."""

    files: dict
    """Image id -> `file_name` (not checked: a reader decides what to do with a name that is not a string)."""
    captions: dict
    """Image id -> its captions (those that are valid Unicode)."""
    unencodable: list
    """Image ids of captions dropped for holding a lone surrogate escape (one entry per such caption)."""


def parse_coco_captions(raw: bytes) -> CocoCaptions:
    """The one parser of COCO captions files (ingest and FID); ValueError when `raw` is not one."""
    try:
        index = json.loads(raw)
        files = {img["id"]: img["file_name"] for img in index["images"]}
        captions: dict = {}
        unencodable = []
        for a in index["annotations"]:
            caption = str(a["caption"])
            if encodable(caption):
                captions.setdefault(a["image_id"], []).append(caption)
            else:
                unencodable.append(a["image_id"])
    except RecursionError as e:
        raise ValueError("nested too deeply") from e
    except (KeyError, TypeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from e
    return CocoCaptions(files, captions, unencodable)


def _record(image_id) -> int | None:
    """A COCO image id as a quarantine record number (ids that are not integers are named in the detail)."""
    return image_id if isinstance(image_id, int) and not isinstance(image_id, bool) and abs(image_id) < 2**62 else None


def read_text_item(store: ObjectStore, item: WorkItem, max_document_bytes: int) -> Iterator[TextRecord | Rejected]:
    """The records of one text object, by the reader its suffix names in `TEXT_READERS`."""
    obj = item.objects[0]
    reader = next(read for suffix, read in TEXT_READERS.items() if item.key.endswith(suffix))
    try:
        yield from reader(store, item.key, obj, max_document_bytes)
    except StorageError as e:
        yield Rejected(item.key, None, Reason.UNREADABLE, str(e)[:200])


def _txt(store: ObjectStore, key: str, obj: ObjectInfo, max_document_bytes: int) -> Iterator[TextRecord | Rejected]:
    if obj.size > max_document_bytes:
        yield Rejected(key, None, Reason.TOO_LARGE, f"{obj.size} bytes")
        return
    with store.open_read(key) as f:
        data = f.read()
    try:
        yield TextRecord(key, None, data.decode("utf-8"))
    except UnicodeDecodeError as e:
        yield Rejected(key, None, Reason.INVALID_UTF8, str(e)[:200])


def _jsonl(store: ObjectStore, key: str, obj: ObjectInfo, max_document_bytes: int) -> Iterator[TextRecord | Rejected]:
    with store.open_read(key) as raw:
        stream = gzip.open(raw) if key.endswith(".gz") else raw
        lineno = 0
        try:
            while True:
                line = stream.readline(max_document_bytes + 1)
                if not line:
                    break
                lineno += 1
                if len(line) > max_document_bytes and not line.endswith(b"\n"):
                    yield Rejected(key, lineno, Reason.TOO_LARGE, f"line over {max_document_bytes} bytes")
                    while line and not line.endswith(b"\n"):  # skip the rest of the oversized line
                        line = stream.readline(1024 * 1024)
                    continue
                yield from _json_line(key, lineno, line)
        except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream
            yield Rejected(key, lineno + 1, Reason.CORRUPT_ARCHIVE, str(e)[:200])


def _json_line(key: str, lineno: int, line: bytes) -> Iterator[TextRecord | Rejected]:
    if not line.strip():
        return
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Rejected(key, lineno, Reason.INVALID_UTF8, str(e)[:200])
        return
    try:
        row = json.loads(decoded)
    except json.JSONDecodeError as e:
        yield Rejected(key, lineno, Reason.MALFORMED_JSON, str(e)[:200])
        return
    except RecursionError:
        yield Rejected(key, lineno, Reason.MALFORMED_JSON, "nested too deeply")
        return
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        yield Rejected(key, lineno, Reason.MISSING_TEXT, "no string field 'text'")
        return
    if not encodable(text):
        yield Rejected(key, lineno, Reason.INVALID_UNICODE, "'text' holds a lone surrogate escape (not valid Unicode)")
        return
    yield TextRecord(key, lineno, text)


def _parquet(store: ObjectStore, key: str, obj: ObjectInfo, max_document_bytes: int) -> Iterator[TextRecord | Rejected]:
    import tempfile
    from pathlib import Path

    # Parquet needs random access: read a local file in place, spool a remote one to a temporary file
    # (never into memory), then stream it one row group batch at a time.
    with tempfile.TemporaryDirectory(prefix="wudao-parquet-") as tmp:
        local = store.local_path(key) if hasattr(store, "local_path") else None
        if local is None:
            local = store.get_file(key, Path(tmp) / "data.parquet")
        yield from _parquet_rows(key, local)


def _parquet_rows(key: str, path) -> Iterator[TextRecord | Rejected]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield Rejected(key, None, Reason.CORRUPT_ARCHIVE, str(e)[:200])
        return
    if "text" not in pf.schema_arrow.names:
        yield Rejected(key, None, Reason.MISSING_TEXT, "no column 'text'")
        return
    row = 0
    try:
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, str):
                    yield TextRecord(key, row, value)
                else:
                    yield Rejected(key, row, Reason.MISSING_TEXT, "null or non-string 'text'")
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a string column holding invalid UTF-8
        yield Rejected(key, row + 1, Reason.CORRUPT_ARCHIVE, str(e)[:200])


TEXT_READERS: dict[str, Callable[[ObjectStore, str, ObjectInfo, int], Iterator[TextRecord | Rejected]]] = {
    ".txt": _txt,
    ".jsonl": _jsonl,
    ".jsonl.gz": _jsonl,
    ".parquet": _parquet,
}
"""Text formats by suffix: a reader streams (store, key, object, max document bytes) -> records or `Rejected`
with a named reason, holding one record (or one parquet row group) at a time. A new format is one reader and
one row here (and one line of the README's input table)."""


def read_image_item(store: ObjectStore, item: WorkItem, max_document_bytes: int) -> ImageRecord | Rejected:
    image = item.objects[0]
    try:
        if item.kind == "pair":
            caption_bytes = store.get_bytes(item.objects[1].key)
            try:
                captions = [caption_bytes.decode("utf-8").strip()]
            except UnicodeDecodeError as e:
                return Rejected(item.objects[1].key, None, Reason.INVALID_UTF8, str(e)[:200])
            if not captions[0]:
                return Rejected(item.objects[1].key, None, Reason.MISSING_CAPTION, "empty caption file")
        else:
            captions = item.captions
        if image.size > max_document_bytes:
            return Rejected(image.key, None, Reason.IMAGE_TOO_LARGE, f"{image.size} bytes")
        return ImageRecord(image.key, captions, store.get_bytes(image.key))
    except StorageError as e:
        return Rejected(image.key, None, Reason.UNREADABLE, str(e)[:200])
