"""The `ingest` flow: the source listing split into batches, each read and cleaned by a Prefect task (retried on
transient I/O errors), reduced in listing order into one committed slice.

The flow runs on Prefect's default thread-pool task runner; for scale-out, run it unchanged on a Dask cluster:
    from prefect_dask import DaskTaskRunner
    ingest_flow.with_options(task_runner=DaskTaskRunner(address="tcp://scheduler:8786"))(source="s3://…")
"""

from __future__ import annotations

from collections import deque
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import settings_from, transient
from flows.results import PERSIST
from wudao.data.formats import WorkItem
from wudao.data.ingest import INGEST_LOCK, BatchResult, batches, builder_for, prepare, read_batch
from wudao.stages import catalog, platform_store, source_store_for


@task(name="read-batch", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient, cache_policy=NO_CACHE)
def read_batch_task(items: list[WorkItem], source: str, overrides: dict[str, Any] | None = None) -> BatchResult:
    settings = settings_from(overrides)
    return read_batch(items, source_store_for(settings, source), settings.ingest)


@flow(name="ingest", **PERSIST)
def ingest_flow(source: str, slice_name: str | None = None, overrides: dict[str, Any] | None = None,
                max_in_flight: int = 4) -> dict[str, Any]:  # fmt: skip
    """Ingest the new objects of `source` into one slice; returns the ingest report."""
    logger = get_run_logger()
    settings = settings_from(overrides)
    cat = catalog(settings)
    try:
        with cat.exclusive(INGEST_LOCK, lambda: logger.info("waiting for another ingest to finish (catalog lock)")):
            plan = prepare(source, source_store=source_store_for(settings, source), catalog=cat, slice_name=slice_name)
            if not plan.items:
                logger.info("no new objects in %s", plan.source_uri)
                return plan.report.to_dict()
            builder = builder_for(plan, store=platform_store(settings), catalog=cat, settings=settings.ingest)
            work = batches(plan.items, settings.ingest.batch_objects, settings.ingest.batch_bytes)
            logger.info("%d new object(s) in %d batch(es) -> %s", plan.report.objects_new, len(work), plan.slice_id)
            # A bounded window of batches in flight: parallel reading, but memory does not grow with the source.
            pending: deque = deque()
            for batch in work:
                pending.append((batch, read_batch_task.submit(batch, source, overrides)))
                if len(pending) >= max_in_flight:
                    done_batch, future = pending.popleft()
                    builder.add([o for item in done_batch for o in item.objects], future.result())
            while pending:
                done_batch, future = pending.popleft()
                builder.add([o for item in done_batch for o in item.objects], future.result())
            report = builder.commit().to_dict()
            logger.info("slice %s: %d documents, %d images, %d quarantined", report["slice_id"], report["documents_accepted"],
                        report["images_accepted"], report["quarantined"])  # fmt: skip
            return report
    finally:
        cat.close()
