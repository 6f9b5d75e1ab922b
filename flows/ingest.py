"""The `ingest` flow: the source listing split into batches, each read, cleaned, MinHashed and tokenized by a Prefect
task (retried on transient I/O errors), reduced in listing order into one committed slice by the same code as
`wudao ingest` (`wudao.data.ingest.reduce_in_order`), so both give the same slice.

The flow runs on Prefect's default thread-pool task runner; for scale-out, run it unchanged on a Dask cluster:
    from prefect_dask import DaskTaskRunner
    ingest_flow.with_options(task_runner=DaskTaskRunner(address="tcp://scheduler:8786"))(source="s3://…")
(or a Ray cluster with prefect-ray's RayTaskRunner). Tasks return compact parts (token ids, hashes, band keys).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import settings_from, transient
from flows.results import PERSIST
from wudao.data.formats import WorkItem
from wudao.data.ingest import Readers
from wudao.data.read import Part, read_batch
from wudao.results import IngestResult
from wudao.stages import run_ingest, source_store_for


@task(name="read-batch", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient, cache_policy=NO_CACHE)
def read_batch_task(
    items: list[WorkItem], source: str, tokenizer_json: str | None, overrides: dict[str, Any] | None = None
) -> list[Part]:
    settings = settings_from(overrides)
    return read_batch(items, source_store_for(settings, source), settings.ingest, tokenizer_json)


@flow(name="ingest", **PERSIST)
def ingest_flow(
    source: str, slice_name: str | None = None, overrides: dict[str, Any] | None = None, max_in_flight: int = 4
) -> IngestResult:
    """Ingest the new objects of `source` into one slice; returns the ingest report. At most `max_in_flight`
    batches are read at once (memory does not grow with the source)."""
    logger = get_run_logger()
    readers = Readers(lambda batch, tok: read_batch_task.submit(batch, source, tok, overrides), window=max_in_flight)
    report = run_ingest(
        settings_from(overrides),
        source,
        slice_name,
        readers=readers,
        progress=lambda done, total: logger.info("batch %d/%d reduced", done, total),
        on_wait=lambda: logger.info("waiting for another ingest to finish (catalog lock)"),
    )
    if report.slice_id:
        logger.info(
            "slice %s: %d documents, %d images, %d quarantined",
            report.slice_id,
            report.documents_accepted,
            report.images_accepted,
            report.quarantined,
        )
    else:
        logger.info("no new slice from %s (%d new objects)", report.source, report.objects_new)
    return report
