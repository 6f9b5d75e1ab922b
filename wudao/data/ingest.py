"""Ingest: the new objects of a source -> cleaned, deduplicated, tokenized shards of one committed slice.

Map and reduce, so it scales with cores and machines:
  * plan (here): list the source, keep the new or changed objects, group them into batches of work items;
  * map (`wudao.data.read`): each batch is read, cleaned, language-tagged, hashed, MinHashed and tokenized where it
    is sent: in this process, in `ingest.workers` worker processes, or as Prefect tasks on any task runner;
  * reduce (`wudao.data.slice_builder`): in listing order, dedup against all history, hold out by hash, write
    shards, commit. Every way of mapping feeds the same reduce the same parts, so the slice is the same.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import func, select

from wudao.catalog import Catalog, SeenObject, Slice, Source, Tokenizer
from wudao.config import IngestSettings
from wudao.data.formats import WorkItem, encodable, plan, printable_key
from wudao.data.quarantine import Reason, Rejected
from wudao.data.read import Part, read_batch, read_parts
from wudao.data.slice_builder import SliceBuilder
from wudao.errors import WudaoError
from wudao.results import IngestResult
from wudao.storage import LocalStore, ObjectStore, StorageError

SLICE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")
INGEST_LOCK = "ingest"
"""Catalog lock held from planning to commit: slice ids, sequence numbers, the first slice's tokenizer and the
dedup history are claimed by one ingest at a time (two at once overwrote each other's shards)."""

WORKER_MEMORY_BYTES = 1_000_000_000
"""What one worker process may need: lingua's preloaded models (~0.5 GB) plus a batch in flight."""


class IngestError(WudaoError):
    """The source as a whole cannot be ingested (missing, unreachable); the message names it and the fix."""


def canonical_source(source: str) -> str:
    """`s3://…` without a trailing slash, or the absolute path of an existing folder (else IngestError)."""
    if source.startswith("s3://"):
        return source.rstrip("/")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise IngestError(f"source folder {source} does not exist or is not a folder")
    return str(path.resolve())


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
    report: IngestResult


def prepare(source: str, *, source_store: ObjectStore, catalog: Catalog, slice_name: str | None = None) -> IngestPlan:
    """Register the source, list it, and plan the work items of new or changed objects."""
    source_uri = canonical_source(source)
    if slice_name is not None and not SLICE_NAME.match(slice_name):
        raise IngestError(
            f"invalid slice name {slice_name!r}: use 1-48 of a-z 0-9 . _ - (starting with a letter or digit)"
        )
    try:  # first: a source that cannot be listed leaves no trace in the catalog
        listing = sorted(source_store.list(), key=lambda o: o.key)
    except StorageError as e:
        raise IngestError(f"cannot list source {source_uri}: {e}") from e
    with catalog.session() as s:
        if slice_name and s.get(Slice, slice_name) is not None:
            raise IngestError(f"slice {slice_name} already exists: choose another --slice name")
        src = s.scalar(select(Source).where(Source.uri == source_uri))
        if src is None:
            src = Source(uri=source_uri)
            s.add(src)
            s.flush()
        source_id = src.id
        seen = {
            (k, e)
            for k, e in s.execute(select(SeenObject.key, SeenObject.etag).where(SeenObject.source_id == source_id))
        }
        tokenizer_row = s.scalars(select(Tokenizer).order_by(Tokenizer.created_at)).first()
        seq = (s.scalar(select(func.max(Slice.seq))) or 0) + 1
    skipped = list(source_store.skipped()) if isinstance(source_store, LocalStore) else []
    report = IngestResult(source=source_uri, objects_seen=len(listing) + len(skipped))
    rejected: list[Rejected] = []
    # A file name that is not UTF-8 cannot be a key anywhere (catalog, S3, JSON): name it and never read it.
    # It is not recorded as seen (its name cannot be stored), so every ingest counts it again.
    for o in (o for o in listing if not encodable(o.key)):
        rejected.append(Rejected(printable_key(o.key), None, Reason.INVALID_NAME, "the file name is not valid UTF-8"))
    listing = [o for o in listing if encodable(o.key)]
    is_new = lambda o: (o.key, o.etag) not in seen  # noqa: E731
    items = plan(listing, is_new, source_store, rejected)
    for obj, reason in skipped:  # dot-files and links: recorded as seen with their reason, like unsupported types
        if encodable(obj.key) and is_new(obj):
            reason = Reason(reason)  # the store names why it skipped it with a reason's value
            rejected.append(
                Rejected(
                    obj.key, None, reason, "links are never followed" if reason == Reason.SKIPPED_LINK else "a dot-file"
                )
            )
            items.append(WorkItem("unsupported", obj.key, [obj]))
    report.objects_new = len({o.key for item in items for o in item.objects if is_new(o)})
    report.quarantined = len(rejected)
    report.quarantine_reasons = dict(sorted(Counter(q.reason for q in rejected).items()))
    return IngestPlan(
        source_uri, source_id, slice_name or f"slice-{seq:05d}", seq, tokenizer_row, items, rejected, report
    )


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
    builder = SliceBuilder(
        store=store,
        catalog=catalog,
        settings=settings,
        source_id=p.source_id,
        slice_id=p.slice_id,
        seq=p.seq,
        tokenizer_row=p.tokenizer_row,
        report=p.report,
    )
    builder.rejected.extend(p.planning_rejects)
    return builder


class PartsFuture(Protocol):
    def result(self) -> Iterable[Part]: ...


@dataclass
class Readers:
    """Where batches are read. `submit(batch, tokenizer_json)` starts reading one batch (with the slice's tokenizer
    once it exists) and returns a future whose `result()` is the batch's parts; at most `window` are in flight."""

    submit: Callable[[list[WorkItem], str | None], PartsFuture]
    window: int


def effective_workers(settings: IngestSettings) -> int:
    """`ingest.workers`, or by default one per core this process may use, as many as memory holds."""
    if settings.workers is not None:
        return settings.workers
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, psutil.virtual_memory().available // WORKER_MEMORY_BYTES))


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
    readers: Readers | None = None,
) -> IngestResult:
    """Ingest the new objects of `source` (read through `source_store`) into a new slice in `store`; one ingest
    at a time per catalog (`on_wait` is called once if another one holds the lock). Batches are read by `readers`
    (default: this process, or `ingest.workers` worker processes when there is more than one batch)."""
    with catalog.exclusive(INGEST_LOCK, on_wait):
        p = prepare(source, source_store=source_store, catalog=catalog, slice_name=slice_name)
        if not p.items:
            return p.report
        builder = builder_for(p, store=store, catalog=catalog, settings=settings)
        work = batches(p.items, settings.batch_objects, settings.batch_bytes)
        with _default_readers(source_store, settings, len(work)) if readers is None else nullcontext(readers) as chosen:
            reduce_in_order(work, builder, chosen, progress)
        return builder.commit()


def reduce_in_order(
    work: list[list[WorkItem]],
    builder: SliceBuilder,
    readers: Readers,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """The one reduce of every ingest: batches go out ahead in a bounded window (memory does not grow with the
    source) and their parts are added in listing order. A batch is submitted with the tokenizer known at that
    moment; before the first slice has one, its documents come back as text and are tokenized here instead."""
    pending: deque = deque()
    reduced = 0

    def reduce_oldest() -> None:
        nonlocal reduced
        batch, future = pending.popleft()
        objects = [o for item in batch for o in item.objects]
        if not getattr(future, "done", lambda: True)():
            builder.dedup.flush()  # while the readers work: otherwise every key is written after the last batch
        for part in future.result():
            builder.add(objects, part)
            objects = []  # each object is recorded once, with the first part of its batch
        reduced += 1
        if progress:
            progress(reduced, len(work))

    try:
        for batch in work:
            pending.append((batch, readers.submit(batch, builder.tokenizer_json)))
            if len(pending) >= readers.window:
                reduce_oldest()
        while pending:
            reduce_oldest()
    except BrokenProcessPool as e:
        raise IngestError(
            "an ingest worker process died: out of memory (lower ingest.workers or ingest.batch_bytes), or a "
            "Python script started the ingest outside `if __name__ == '__main__':` (or set ingest.workers=1)"
        ) from e


class _Lazy:
    """In-process 'future': the batch is read while the reduce consumes it, one part at a time."""

    def __init__(self, parts: Iterable[Part]):
        self.parts = parts

    def result(self) -> Iterable[Part]:
        return self.parts


@contextmanager
def _default_readers(source_store: ObjectStore, settings: IngestSettings, n_batches: int):
    workers = min(effective_workers(settings), n_batches)
    if workers <= 1:
        yield Readers(lambda batch, tok: _Lazy(read_parts(batch, source_store, settings, tok)), window=1)
        return
    # spawn, not fork: the parent may hold threads (tokenizers, lingua) that a forked child would inherit broken.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_core_each)
    try:
        yield Readers(
            lambda batch, tok: pool.submit(read_batch, batch, source_store, settings, tok), window=2 * workers
        )
    finally:
        # Every result is in (or the ingest failed): the workers' exit (freeing their language models takes a second
        # or two) need not hold up the commit; the interpreter still joins them before it exits.
        pool.shutdown(wait=False, cancel_futures=True)


def _one_core_each() -> None:
    """A worker process is one core's worth of work: its Rust thread pools (tokenizers, lingua) stay single-threaded
    instead of each starting one thread per core and fighting the other workers for them."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
