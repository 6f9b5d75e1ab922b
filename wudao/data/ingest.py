"""Ingest: new raw objects -> normalised documents -> token shards of one committed slice.

Incremental: every object version (key + etag) that a committed ingest read is recorded in the catalog, and a
rerun reads only new or changed objects. Crash-safe: shards are uploaded under `slices/<id>/` first, then the
manifest is written (the object-store commit), then one catalog transaction records the slice, its shards, the
objects and the quarantine. A crash before that transaction leaves no committed slice and the objects unseen,
so a rerun does the same work again under the same slice id.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from wudao.catalog import Catalog, QuarantineRecord, SeenObject, Shard, Slice, Source, Tokenizer
from wudao.config import IngestSettings
from wudao.data.shards import token_dtype, write_shard
from wudao.data.tokenizer import EOS, load_tokenizer, tokenizer_key, tokenizer_version, train_tokenizer
from wudao.storage import ObjectInfo, ObjectStore, StorageError, join_key

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


class IngestError(RuntimeError):
    """The source as a whole cannot be ingested (missing, unreachable); the message names it and the fix."""


@dataclass
class IngestReport:
    source: str
    slice_id: str | None = None
    manifest_uri: str | None = None
    tokenizer_version: str | None = None
    objects_seen: int = 0
    objects_new: int = 0
    objects_skipped_unsupported: int = 0
    documents_accepted: int = 0
    documents_heldout: int = 0
    duplicates_exact: int = 0
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    shards: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Quarantined:
    key: str
    record: int | None
    reason: str
    detail: str = ""


def normalize(text: str) -> str:
    """NFKC, no control characters except newlines/tabs, trimmed."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return text.strip()


def _is_heldout(text: str, fraction: float) -> bool:
    """Stable split by content hash: the same document is held out in every run and on every machine."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return (h % 1_000_000) < fraction * 1_000_000


def _records(store: ObjectStore, obj: ObjectInfo, quarantine: list[_Quarantined]) -> Iterator[str]:
    """Texts of one object; bad records go to `quarantine` with a named reason and do not stop the rest."""
    key = obj.key
    with store.open_read(key) as raw:
        if key.endswith(".txt"):
            try:
                yield raw.read().decode("utf-8")
            except UnicodeDecodeError as e:
                quarantine.append(_Quarantined(key, None, "not_utf8", str(e)[:200]))
            return
        stream = gzip.open(raw) if key.endswith(".gz") else raw
        try:
            for lineno, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8", errors="strict"), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    quarantine.append(_Quarantined(key, lineno, "malformed_json", str(e)[:200]))
                    continue
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str):
                    quarantine.append(_Quarantined(key, lineno, "missing_text", "no string field 'text'"))
                    continue
                yield text
        except UnicodeDecodeError as e:
            quarantine.append(_Quarantined(key, None, "not_utf8", str(e)[:200]))
        except (OSError, EOFError) as e:  # truncated or corrupt gzip
            quarantine.append(_Quarantined(key, None, "corrupt_gzip", str(e)[:200]))


def canonical_source(source: str) -> str:
    """`s3://…` without a trailing slash, or the absolute path of an existing folder (else IngestError)."""
    if source.startswith("s3://"):
        return source.rstrip("/")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise IngestError(f"source folder {source} does not exist or is not a folder")
    return str(path.resolve())


def ingest(
    source: str,
    *,
    source_store: ObjectStore,
    store: ObjectStore,
    catalog: Catalog,
    settings: IngestSettings,
) -> IngestReport:
    """Ingest the new objects of `source` (read through `source_store`) into a new slice in `store`."""
    source_uri = canonical_source(source)
    report = IngestReport(source=source_uri)
    with catalog.session() as s:
        src = s.scalar(select(Source).where(Source.uri == source_uri))
        if src is None:
            src = Source(uri=source_uri)
            s.add(src)
            s.flush()
        source_id = src.id
        seen = {(k, e) for k, e in s.execute(select(SeenObject.key, SeenObject.etag).where(SeenObject.source_id == source_id))}
        tokenizer_row = s.scalars(select(Tokenizer).order_by(Tokenizer.created_at)).first()
        next_seq = (s.scalar(select(func.max(Slice.seq))) or 0) + 1

    try:
        listing = list(source_store.list())
    except StorageError as e:
        raise IngestError(f"cannot list source {source_uri}: {e}") from None
    report.objects_seen = len(listing)
    new_objects = [o for o in listing if (o.key, o.etag) not in seen]
    supported = [o for o in new_objects if o.key.endswith(TEXT_SUFFIXES)]
    report.objects_skipped_unsupported = len(new_objects) - len(supported)
    report.objects_new = len(supported)
    if not supported:
        return report

    quarantine: list[_Quarantined] = []
    train_docs: list[str] = []
    heldout_docs: list[str] = []
    hashes: set[str] = set()
    read_objects: list[ObjectInfo] = []
    for obj in supported:
        if obj.size > settings.max_record_bytes and not obj.key.endswith((".jsonl", ".jsonl.gz")):
            quarantine.append(_Quarantined(obj.key, None, "too_large", f"{obj.size} bytes"))
            read_objects.append(obj)
            continue
        try:
            texts = list(_records(source_store, obj, quarantine))
        except StorageError as e:
            quarantine.append(_Quarantined(obj.key, None, "unreadable", str(e)[:200]))
            read_objects.append(obj)
            continue
        read_objects.append(obj)
        for text in texts:
            text = normalize(text)
            if not text:
                quarantine.append(_Quarantined(obj.key, None, "empty_text"))
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in hashes:
                report.duplicates_exact += 1
                continue
            hashes.add(digest)
            (heldout_docs if _is_heldout(text, settings.heldout_fraction) else train_docs).append(text)

    report.quarantined = len(quarantine)
    report.quarantine_reasons = dict(Counter(q.reason for q in quarantine))
    report.documents_accepted = len(train_docs) + len(heldout_docs)
    report.documents_heldout = len(heldout_docs)

    # The tokenizer is trained on the first slice and then frozen: every later slice uses the same version.
    if tokenizer_row is None:
        if not train_docs:
            return _record_without_slice(catalog, source_id, read_objects, quarantine, report)
        tok = train_tokenizer(train_docs + heldout_docs, settings.vocab_size)
        version = tokenizer_version(tok)
        store.put_bytes(tokenizer_key(version), tok.to_str().encode())
        new_tokenizer = Tokenizer(version=version, uri=store.url(tokenizer_key(version)), vocab_size=tok.get_vocab_size())
    else:
        tok = load_tokenizer(store.get_bytes(tokenizer_key(tokenizer_row.version)))
        version, new_tokenizer = tokenizer_row.version, None
    report.tokenizer_version = version
    if not train_docs:
        return _record_without_slice(catalog, source_id, read_objects, quarantine, report, new_tokenizer)

    slice_id = f"slice-{next_seq:05d}"
    prefix = f"slices/{slice_id}"
    eos = tok.token_to_id(EOS)
    dtype = token_dtype(tok.get_vocab_size())
    shard_rows: list[Shard] = []
    manifest_shards = []
    with tempfile.TemporaryDirectory(prefix="wudao-ingest-") as tmp:
        for split, docs in (("train", train_docs), ("heldout", heldout_docs)):
            if not docs:
                continue
            encoded = [e.ids + [eos] for e in tok.encode_batch(docs)]
            for n, chunk in enumerate(_chunks(encoded, settings.shard_tokens)):
                name = f"{split}-{n:05d}"
                files = write_shard(chunk, Path(tmp) / name, dtype)
                for path in (files.bin_path, files.idx_path):
                    store.put_file(join_key(prefix, path.name), path)
                sha = hashlib.sha256(files.bin_path.read_bytes()).hexdigest()
                shard_rows.append(
                    Shard(split=split, key=join_key(prefix, f"{name}.bin"), n_tokens=files.n_tokens, n_documents=files.n_documents, sha256=sha)
                )
                manifest_shards.append({"split": split, "name": name, "tokens": files.n_tokens, "documents": files.n_documents, "sha256": sha})
                report.tokens += files.n_tokens
    report.shards = len(shard_rows)
    manifest = {
        "slice_id": slice_id,
        "source": source_uri,
        "tokenizer_version": version,
        "dtype": dtype.name,
        "shards": manifest_shards,
        "documents": report.documents_accepted,
        "heldout_documents": report.documents_heldout,
        "tokens": report.tokens,
    }
    report.manifest_uri = store.commit(prefix, manifest)
    report.slice_id = slice_id

    with catalog.session() as s:
        if new_tokenizer is not None:
            s.add(new_tokenizer)
            s.flush()  # the slice row references it
        s.add(
            Slice(id=slice_id, seq=next_seq, source_id=source_id, tokenizer_version=version, manifest_uri=report.manifest_uri,
                  n_documents=report.documents_accepted, n_heldout_documents=report.documents_heldout, n_tokens=report.tokens)
        )  # fmt: skip
        s.flush()
        for row in shard_rows:
            row.slice_id = slice_id
            s.add(row)
        _record_objects(s, source_id, slice_id, read_objects, quarantine)
    return report


def _chunks(docs: list[list[int]], max_tokens: int) -> Iterator[list[list[int]]]:
    chunk: list[list[int]] = []
    size = 0
    for d in docs:
        if chunk and size + len(d) > max_tokens:
            yield chunk
            chunk, size = [], 0
        chunk.append(d)
        size += len(d)
    if chunk:
        yield chunk


def _record_objects(s, source_id: int, slice_id: str | None, objects: list[ObjectInfo], quarantine: list[_Quarantined]) -> None:
    whole_object_failures = {q.key for q in quarantine if q.record is None and q.reason != "empty_text"}
    for obj in objects:
        status = "quarantined" if obj.key in whole_object_failures else "ingested"
        s.add(SeenObject(source_id=source_id, key=obj.key, size=obj.size, etag=obj.etag, slice_id=slice_id, status=status))
    for q in quarantine:
        s.add(QuarantineRecord(source_id=source_id, slice_id=slice_id, object_key=q.key, record=q.record, reason=q.reason, detail=q.detail))


def _record_without_slice(catalog, source_id, objects, quarantine, report, new_tokenizer=None) -> IngestReport:
    """Nothing trainable arrived: remember what was read (and why it was rejected) so it is not re-read."""
    with catalog.session() as s:
        if new_tokenizer is not None:
            s.add(new_tokenizer)
        _record_objects(s, source_id, None, objects, quarantine)
    return report


def slice_manifest(store: ObjectStore, slice_id: str) -> dict:
    manifest = store.read_manifest(f"slices/{slice_id}")
    if manifest is None:
        raise IngestError(f"slice {slice_id} has no committed manifest in {store.uri}")
    return manifest
