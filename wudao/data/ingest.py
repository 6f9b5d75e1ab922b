"""Ingest: the new objects of a source -> cleaned, deduplicated, tokenized shards of one committed slice.

The work splits in two so it can scale out (see flows/ingest.py):
  * `read_batch(items)` (map, embarrassingly parallel): read, clean, language-tag, PII-scrub, hash and MinHash
    a batch of work items; returns documents, images and rejects. Memory is bounded by the batch.
  * `SliceBuilder` (reduce, in listing order): dedup against all history, hold out by hash, tokenize, stream
    into shards, and finally commit.
Crash-safe: shards are uploaded under `slices/<id>/` first, then `manifest.json` (the store's commit), then one
catalog transaction records the slice, shards, objects and quarantine. A crash before that leaves no visible
slice and the objects unseen; the rerun rebuilds the same slice id with the same content.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from wudao.catalog import Catalog, QuarantineRecord, SeenObject, Shard, Slice, Source, Tokenizer
from wudao.config import IngestSettings
from wudao.data.clean import Cleaner
from wudao.data.dedup import Candidate, DedupIndex, MinHasher, exact_hash
from wudao.data.formats import (ImageRecord, Rejected, TextRecord, WorkItem, encodable, plan, printable_key,
                                read_image_item, read_text_item)  # fmt: skip
from wudao.data.images import ImageRejected, normalize_image
from wudao.data.shards import token_dtype, write_shard
from wudao.data.tokenizer import EOS, load_tokenizer, tokenizer_key, tokenizer_version, train_tokenizer
from wudao.storage import LocalStore, ObjectInfo, ObjectStore, StorageError, join_key

SLICE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")
INGEST_LOCK = "ingest"
"""Catalog lock held from planning to commit: slice ids, sequence numbers, the first slice's tokenizer and the
dedup history are claimed by one ingest at a time (two at once overwrote each other's shards)."""


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
    documents_accepted: int = 0
    documents_heldout: int = 0
    duplicates_exact: int = 0
    duplicates_near: int = 0
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    low_quality_rules: dict[str, int] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    shards: int = 0
    images_accepted: int = 0
    captions: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Doc:
    key: str
    record: int | None
    text: str
    lang: str
    hash: str
    band_keys: list[int]


@dataclass
class Img:
    key: str
    png: bytes
    captions: list[str]
    hash: str


@dataclass
class BatchResult:
    docs: list[Doc] = field(default_factory=list)
    images: list[Img] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    low_quality_rules: Counter = field(default_factory=Counter)


def canonical_source(source: str) -> str:
    """`s3://…` without a trailing slash, or the absolute path of an existing folder (else IngestError)."""
    if source.startswith("s3://"):
        return source.rstrip("/")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise IngestError(f"source folder {source} does not exist or is not a folder")
    return str(path.resolve())


# ---------------------------------------------------------------- map: read and clean one batch of work items


def read_batch(items: list[WorkItem], source_store: ObjectStore, settings: IngestSettings, cleaner: Cleaner | None = None) -> BatchResult:
    """The whole result of one batch (what a flow task returns); batches are bounded by `batch_bytes`."""
    out = BatchResult()
    for part in read_batch_chunks(items, source_store, settings, cleaner):
        out.docs += part.docs
        out.images += part.images
        out.rejected += part.rejected
        out.low_quality_rules += part.low_quality_rules
    return out


def read_batch_chunks(items: list[WorkItem], source_store: ObjectStore, settings: IngestSettings,
                      cleaner: Cleaner | None = None, chunk_records: int = 1024) -> Iterator[BatchResult]:  # fmt: skip
    """Results of a batch in chunks of about `chunk_records` records, so a consumer that reduces as it goes
    holds one chunk at a time however large the objects are."""
    cleaner = cleaner or Cleaner.shared(settings.clean)
    hasher = MinHasher(settings.minhash_bands, settings.minhash_rows, settings.minhash_ngram_en, settings.minhash_ngram_zh)
    out = BatchResult()
    records: list[TextRecord] = []

    def clean_records() -> None:
        kept = []
        for rec, cleaned in zip(records, cleaner.clean_many([r.text for r in records])):
            if cleaned.rejected:
                reason = "empty" if cleaned.rejected == "empty" else "low_quality"
                out.rejected.append(Rejected(rec.key, rec.record, reason, cleaned.rejected))
                out.low_quality_rules[cleaned.rejected] += reason == "low_quality"
            else:
                kept.append((rec, cleaned))
        if kept:  # MinHash for the whole chunk at once
            keys = hasher.band_keys_many([(c.text, c.lang) for _, c in kept])
            out.docs += [Doc(r.key, r.record, c.text, c.lang, exact_hash(c.text), k) for (r, c), k in zip(kept, keys)]
        records.clear()

    for item in items:
        if item.kind == "text":
            for rec in read_text_item(source_store, item, settings.max_document_bytes):
                if isinstance(rec, Rejected):
                    out.rejected.append(rec)
                    continue
                records.append(rec)
                if len(records) >= chunk_records:  # batched language id; then hand the chunk over
                    clean_records()
                    yield out
                    out = BatchResult()
            clean_records()
        elif item.kind in ("pair", "coco"):
            rec = read_image_item(source_store, item, settings.max_document_bytes)
            if isinstance(rec, Rejected):
                out.rejected.append(rec)
                continue
            out_img = _clean_image(rec, settings, cleaner, out)
            if out_img is not None:
                out.images.append(out_img)
        if len(out.docs) + len(out.images) >= chunk_records:
            yield out
            out = BatchResult()
    yield out


def _clean_image(rec: ImageRecord, settings: IngestSettings, cleaner: Cleaner, out: BatchResult) -> Img | None:
    try:
        png = normalize_image(rec.data, settings.image_size, settings.image_max_pixels)
    except ImageRejected as e:
        out.rejected.append(Rejected(rec.key, None, e.reason, str(e)))
        return None
    captions = []
    for caption in rec.captions:
        cleaned = cleaner.normalize_caption(caption)
        if cleaned:
            captions.append(cleaned)
    if not captions:
        out.rejected.append(Rejected(rec.key, None, "missing_caption", "every caption was empty after cleaning"))
        return None
    return Img(rec.key, png, captions, hashlib.blake2b(rec.data, digest_size=16).hexdigest())


# ---------------------------------------------------------------- reduce: dedup, tokenize, shard, commit


class _TokenShards:
    """Streams token ids of one split into shard files, uploading each shard as soon as it is full."""

    def __init__(self, store: ObjectStore, prefix: str, split: str, dtype, max_tokens: int, tmp: Path):
        self.store, self.prefix, self.split, self.dtype, self.max_tokens, self.tmp = store, prefix, split, dtype, max_tokens, tmp
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
        self.written.append({"split": self.split, "name": name, "tokens": files.n_tokens, "documents": files.n_documents, "sha256": sha})
        files.bin_path.unlink()
        files.idx_path.unlink()
        self.pending, self.pending_tokens = [], 0


class _ImageShards:
    """WebDataset-style tars: `<n>.png` + `<n>.json` (captions, their token ids, source key) per image."""

    def __init__(self, store: ObjectStore, prefix: str, max_images: int, tmp: Path):
        self.store, self.prefix, self.max_images, self.tmp = store, prefix, max_images, tmp
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.written: list[dict] = []

    def add(self, img: Img, caption_ids: list[list[int]]) -> None:
        if self.tar is None:
            self.path = self.tmp / f"images-{len(self.written):05d}.tar"
            self.tar = tarfile.open(self.path, "w")
        n = f"{self.count:08d}"
        meta = json.dumps({"captions": img.captions, "caption_ids": caption_ids, "source": img.key}, ensure_ascii=False)
        for name, data in ((f"{n}.png", img.png), (f"{n}.json", meta.encode())):
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


class SliceBuilder:
    """The reduce side of one ingest; feed batches in listing order with `add`, then `commit`."""

    def __init__(self, *, store: ObjectStore, catalog: Catalog, settings: IngestSettings, source_id: int,
                 slice_id: str, seq: int, tokenizer_row: Tokenizer | None, report: IngestReport):  # fmt: skip
        self.store, self.catalog, self.settings = store, catalog, settings
        self.source_id, self.slice_id, self.seq = source_id, slice_id, seq
        self.prefix = f"slices/{slice_id}"
        self.report = report
        self.dedup = DedupIndex(catalog, slice_id)
        self._tmp = tempfile.TemporaryDirectory(prefix="wudao-ingest-")
        self.tmp = Path(self._tmp.name)
        self.rejected: list[Rejected] = []
        self.objects: list[ObjectInfo] = []
        self.new_tokenizer: Tokenizer | None = None
        self.tok = None
        if tokenizer_row is not None:
            self._use_tokenizer(load_tokenizer(store.get_bytes(tokenizer_key(tokenizer_row.version))), tokenizer_row.version)
        # Until the first slice's tokenizer is trained, kept documents wait here (bounded by the sample size).
        self._sample: list[tuple[str, bool]] = []
        self._sample_bytes = 0
        self._images_waiting: list[Img] = []

    def _use_tokenizer(self, tok, version: str) -> None:
        self.tok, self.report.tokenizer_version = tok, version
        self.eos = tok.token_to_id(EOS)
        dtype = token_dtype(tok.get_vocab_size())
        self.dtype = dtype
        self.train = _TokenShards(self.store, self.prefix, "train", dtype, self.settings.shard_tokens, self.tmp)
        self.heldout = _TokenShards(self.store, self.prefix, "heldout", dtype, self.settings.shard_tokens, self.tmp)
        self.images = _ImageShards(self.store, self.prefix, self.settings.shard_images, self.tmp)

    def add(self, objects: list[ObjectInfo], batch: BatchResult) -> None:
        self.objects.extend(objects)
        self.rejected.extend(batch.rejected)
        self.report.low_quality_rules = dict(Counter(self.report.low_quality_rules) + batch.low_quality_rules)
        verdicts = self.dedup.check_and_add([Candidate(d.hash, d.band_keys, d.lang) for d in batch.docs]
                                            + [Candidate(i.hash, [], "image") for i in batch.images])  # fmt: skip
        kept = []
        for doc, verdict in zip(batch.docs, verdicts[: len(batch.docs)]):
            if verdict == "exact":
                self.report.duplicates_exact += 1
            elif verdict == "near":
                self.report.duplicates_near += 1
            else:
                kept.append(doc)
        self._keep_texts(kept)
        for img, verdict in zip(batch.images, verdicts[len(batch.docs) :]):
            if verdict:
                self.report.duplicates_exact += 1
            else:
                self._keep_image(img)

    def _keep_texts(self, docs: list[Doc]) -> None:
        for doc in docs:
            self.report.documents_accepted += 1
            self.report.languages[doc.lang] = self.report.languages.get(doc.lang, 0) + 1
        pairs = [(d.text, _is_heldout(d.hash, self.settings.heldout_fraction)) for d in docs]
        self.report.documents_heldout += sum(h for _, h in pairs)
        if self.tok is None:
            self._sample.extend(pairs)
            self._sample_bytes += sum(len(t.encode()) for t, _ in pairs)
            if self._sample_bytes >= self.settings.tokenizer_sample_bytes:
                self._train_tokenizer()
            return
        self._write_texts(pairs)

    def _write_texts(self, pairs: list[tuple[str, bool]]) -> None:
        # encode_batch runs on the tokenizer's Rust thread pool; the order of documents is kept. The ids of the
        # whole chunk go into one array (2-4 bytes a token, not a Python int), each document followed by EOS.
        ids = [e.ids for e in self.tok.encode_batch([t for t, _ in pairs])]
        ends = np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1)
        tokens = np.full(int(ends[-1]) if len(ends) else 0, self.eos, dtype=self.dtype)
        body = np.ones(len(tokens), dtype=bool)
        body[ends - 1] = False
        tokens[body] = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=len(tokens) - len(ids))
        for (_, heldout), start, end in zip(pairs, [0, *ends[:-1].tolist()], ends.tolist()):
            # a copy: a view would keep the whole chunk's array alive while the (slow-filling) held-out shard waits
            (self.heldout if heldout else self.train).add(tokens[start:end].copy())
        self.report.tokens += len(tokens)

    def _keep_image(self, img: Img) -> None:
        if self.tok is None:
            self._images_waiting.append(img)
            return
        self.images.add(img, [e.ids for e in self.tok.encode_batch(img.captions)])
        self.report.images_accepted += 1
        self.report.captions += len(img.captions)

    def _train_tokenizer(self) -> None:
        texts = [t for t, _ in self._sample] + [c for img in self._images_waiting for c in img.captions]
        tok = train_tokenizer(texts, self.settings.vocab_size)
        version = tokenizer_version(tok)
        self.store.put_bytes(tokenizer_key(version), tok.to_str().encode())
        self.new_tokenizer = Tokenizer(version=version, uri=self.store.url(tokenizer_key(version)), vocab_size=tok.get_vocab_size())
        self._use_tokenizer(tok, version)
        waiting, self._sample = self._sample, []
        for i in range(0, len(waiting), 1024):
            self._write_texts(waiting[i : i + 1024])
        images, self._images_waiting = self._images_waiting, []
        for img in images:
            self._keep_image(img)

    def commit(self) -> IngestReport:
        """Flush shards, write the manifest (the store commit), then record everything in one transaction."""
        r = self.report
        self.dedup.flush()  # every kept key in the catalog before the manifest makes the slice visible
        r.quarantined = len(self.rejected)
        r.quarantine_reasons = dict(sorted(Counter(q.reason for q in self.rejected).items()))
        kept_anything = r.documents_accepted or self._images_waiting or r.images_accepted
        if self.tok is None and kept_anything:
            self._train_tokenizer()
        if self.tok is not None and kept_anything:
            for writer in (self.train, self.heldout, self.images):
                writer.flush()
            shards = self.train.written + self.heldout.written + self.images.written
            r.shards = len(shards)
            manifest = {
                "slice_id": self.slice_id,
                "source": r.source,
                "tokenizer_version": r.tokenizer_version,
                "dtype": self.dtype.name,
                "shards": shards,
                "documents": r.documents_accepted,
                "heldout_documents": r.documents_heldout,
                "tokens": r.tokens,
                "images": r.images_accepted,
                "languages": dict(sorted(r.languages.items())),
            }
            self.store.put_json(join_key(self.prefix, "quarantine.json"), [asdict(q) for q in self.rejected])
            r.manifest_uri = self.store.commit(self.prefix, manifest)
            r.slice_id = self.slice_id
        self._record(shards if r.slice_id else [])
        self._tmp.cleanup()
        return r

    def _record(self, shards: list[dict]) -> None:
        r = self.report
        slice_id = r.slice_id
        whole_object = {q.key for q in self.rejected if q.record is None}
        with self.catalog.session() as s:
            if self.new_tokenizer is not None:
                s.add(self.new_tokenizer)
                s.flush()  # the slice row references it
            if slice_id:
                s.add(Slice(id=slice_id, seq=self.seq, source_id=self.source_id, tokenizer_version=r.tokenizer_version,
                            manifest_uri=r.manifest_uri, n_documents=r.documents_accepted,
                            n_heldout_documents=r.documents_heldout, n_tokens=r.tokens, n_images=r.images_accepted,
                            languages=json.dumps(r.languages, sort_keys=True)))  # fmt: skip
                s.flush()
                for sh in shards:
                    ext = ".tar" if sh["split"] == "images" else ".bin"
                    s.add(Shard(slice_id=slice_id, split=sh["split"], key=join_key(self.prefix, sh["name"] + ext),
                                n_tokens=sh.get("tokens", 0), n_documents=sh.get("documents", sh.get("images", 0)), sha256=sh["sha256"]))  # fmt: skip
            for obj in self.objects:
                status = "quarantined" if obj.key in whole_object else "ingested"
                s.add(SeenObject(source_id=self.source_id, key=obj.key, size=obj.size, etag=obj.etag, slice_id=slice_id, status=status))
            for q in self.rejected:
                s.add(QuarantineRecord(source_id=self.source_id, slice_id=slice_id, object_key=q.key, record=q.record,
                                       reason=q.reason, detail=q.detail))  # fmt: skip


def _is_heldout(doc_hash: str, fraction: float) -> bool:
    """Stable split by content hash: the same document is held out in every run and on every machine."""
    return int(doc_hash[:12], 16) % 1_000_000 < fraction * 1_000_000


# ---------------------------------------------------------------- the whole ingest, in one process


@dataclass
class IngestPlan:
    source_uri: str
    source_id: int
    slice_id: str
    seq: int
    tokenizer_row: Tokenizer | None
    items: list[WorkItem]
    planning_rejects: list[Rejected]
    """Rejections found while planning (missing captions, unsupported types, broken COCO indexes)."""
    report: IngestReport


def prepare(source: str, *, source_store: ObjectStore, catalog: Catalog, slice_name: str | None = None) -> IngestPlan:
    """Register the source, list it, and plan the work items of new or changed objects."""
    source_uri = canonical_source(source)
    if slice_name is not None and not SLICE_NAME.match(slice_name):
        raise IngestError(f"invalid slice name {slice_name!r}: use 1-48 of a-z 0-9 . _ - (starting with a letter or digit)")
    try:  # first: a source that cannot be listed leaves no trace in the catalog
        listing = sorted(source_store.list(), key=lambda o: o.key)
    except StorageError as e:
        raise IngestError(f"cannot list source {source_uri}: {e}") from None
    with catalog.session() as s:
        if slice_name and s.get(Slice, slice_name) is not None:
            raise IngestError(f"slice {slice_name} already exists: choose another --slice name")
        src = s.scalar(select(Source).where(Source.uri == source_uri))
        if src is None:
            src = Source(uri=source_uri)
            s.add(src)
            s.flush()
        source_id = src.id
        seen = {(k, e) for k, e in s.execute(select(SeenObject.key, SeenObject.etag).where(SeenObject.source_id == source_id))}
        tokenizer_row = s.scalars(select(Tokenizer).order_by(Tokenizer.created_at)).first()
        seq = (s.scalar(select(func.max(Slice.seq))) or 0) + 1
    skipped = list(source_store.skipped()) if isinstance(source_store, LocalStore) else []
    report = IngestReport(source=source_uri, objects_seen=len(listing) + len(skipped))
    rejected: list[Rejected] = []
    # A file name that is not UTF-8 cannot be a key anywhere (catalog, S3, JSON): name it and never read it.
    # It is not recorded as seen (its name cannot be stored), so every ingest counts it again.
    for o in (o for o in listing if not encodable(o.key)):
        rejected.append(Rejected(printable_key(o.key), None, "invalid_name", "the file name is not valid UTF-8"))
    listing = [o for o in listing if encodable(o.key)]
    is_new = lambda o: (o.key, o.etag) not in seen  # noqa: E731
    items = plan(listing, is_new, source_store, rejected)
    for obj, reason in skipped:  # dot-files and links: recorded as seen with their reason, like unsupported types
        if encodable(obj.key) and is_new(obj):
            rejected.append(Rejected(obj.key, None, reason, "links are never followed" if reason == "skipped_link" else "a dot-file"))
            items.append(WorkItem("unsupported", obj.key, [obj]))
    report.objects_new = len({o.key for item in items for o in item.objects if is_new(o)})
    report.quarantined = len(rejected)
    report.quarantine_reasons = dict(sorted(Counter(q.reason for q in rejected).items()))
    return IngestPlan(source_uri, source_id, slice_name or f"slice-{seq:05d}", seq, tokenizer_row, items, rejected, report)


def batches(items: list[WorkItem], max_objects: int, max_bytes: int) -> list[list[WorkItem]]:
    """Consecutive work items, at most `max_objects` and about `max_bytes` of input per batch."""
    out: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    size = 0
    for item in items:
        item_bytes = sum(o.size for o in item.objects)
        if current and (len(current) >= max_objects or size + item_bytes > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(item)
        size += item_bytes
    if current:
        out.append(current)
    return out


def builder_for(p: IngestPlan, *, store: ObjectStore, catalog: Catalog, settings: IngestSettings) -> SliceBuilder:
    """The reduce side for plan `p`; call under the ingest lock. Whatever a dead ingest left under the slice's
    prefix (no manifest, so never visible) is removed first, so the new slice holds only its own shards."""
    if store.read_manifest(f"slices/{p.slice_id}") is None:
        store.delete_prefix(f"slices/{p.slice_id}/")
    builder = SliceBuilder(store=store, catalog=catalog, settings=settings, source_id=p.source_id, slice_id=p.slice_id,
                           seq=p.seq, tokenizer_row=p.tokenizer_row, report=p.report)  # fmt: skip
    builder.rejected.extend(p.planning_rejects)
    return builder


def ingest(
    source: str,
    *,
    source_store: ObjectStore,
    store: ObjectStore,
    catalog: Catalog,
    settings: IngestSettings,
    slice_name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> IngestReport:
    """Ingest the new objects of `source` (read through `source_store`) into a new slice in `store`; one ingest
    at a time per catalog (`on_wait` is called once if another one holds the lock)."""
    with catalog.exclusive(INGEST_LOCK, on_wait):
        p = prepare(source, source_store=source_store, catalog=catalog, slice_name=slice_name)
        if not p.items:
            return p.report
        builder = builder_for(p, store=store, catalog=catalog, settings=settings)
        work = batches(p.items, settings.batch_objects, settings.batch_bytes)
        for n, (batch, parts) in enumerate(_read_batches(work, source_store, settings), start=1):
            objects = [o for item in batch for o in item.objects]
            for part in parts:
                builder.add(objects, part)
                objects = []  # each object is recorded once, with the first part of its batch
            if progress:
                progress(n, len(work))
        return builder.commit()


def _read_batches(work: list[list[WorkItem]], source_store: ObjectStore, settings: IngestSettings):
    """Yield (batch, its results) in order. In one process a batch streams in chunks (memory bounded by a chunk);
    with worker processes, a bounded window of whole batches is read ahead in parallel."""
    if settings.workers <= 1:
        for batch in work:
            yield batch, read_batch_chunks(batch, source_store, settings)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold threads (tokenizers, lingua) that a forked child would inherit broken.
    with ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        for batch in work:
            pending.append((batch, pool.submit(_read_batch_parts, batch, source_store, settings)))
            if len(pending) > 2 * settings.workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _read_batch_parts(items: list[WorkItem], source_store: ObjectStore, settings: IngestSettings) -> list[BatchResult]:
    """A batch read in a worker process, in the same chunks as in-process reading: the reduce side then sees
    the same sequence of parts (and so trains the same tokenizer and writes the same shards) whatever the
    number of workers."""
    return list(read_batch_chunks(items, source_store, settings))


def slice_manifest(store: ObjectStore, slice_id: str) -> dict:
    manifest = store.read_manifest(f"slices/{slice_id}")
    if manifest is None:
        raise IngestError(f"slice {slice_id} has no committed manifest in {store.uri}")
    return manifest
