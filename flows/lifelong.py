"""The `lifelong-cycle` flow: ingest (a subflow) -> train -> evaluate -> register, each stage a Prefect task.

Tasks exchange only small JSON-able dicts (URIs, ids, metrics). Settings are read inside each task from the
environment plus explicit `overrides`, so a task runs the same on a worker as in-process.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.common import settings_from as _settings
from flows.common import transient as _transient
from flows.ingest import ingest_flow
from wudao import registry, stages

# Storage and MLflow calls are I/O: retry with backoff. Training is not retried blindly (it is expensive).
@task(name="resolve-champion", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient, cache_policy=NO_CACHE)
def champion_task(overrides: dict[str, Any] | None = None) -> str | None:
    return stages.resolve_start(_settings(overrides), "champion")


@task(name="begin-mlflow-run", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient, cache_policy=NO_CACHE)
def begin_task(slice_id: str, overrides: dict[str, Any] | None = None) -> str:
    return registry.begin_cycle(_settings(overrides), f"cycle-{slice_id}")


@task(name="train", cache_policy=NO_CACHE)
def train_task(slice_id: str, start: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return stages.run_train(_settings(overrides), slice_id, start or "scratch")


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(checkpoint_uri: str, parent_uri: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return stages.run_evaluate(_settings(overrides), checkpoint_uri, parent_uri)


@task(name="register", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient, cache_policy=NO_CACHE)
def register_task(
    ingest_report: dict[str, Any],
    train_result: dict[str, Any],
    evaluation: dict[str, Any],
    flow_run_id: str | None,
    mlflow_run_id: str | None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return stages.run_register(_settings(overrides), ingest_report, train_result, evaluation, flow_run_id, mlflow_run_id)


@flow(name="lifelong-cycle", log_prints=True)
def lifelong_cycle(source: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One lifelong cycle over the new objects of `source`; a no-op (no training) when nothing new arrived."""
    logger = get_run_logger()
    report = ingest_flow(source, overrides=overrides)  # a subflow: its batches show up as tasks
    result: dict[str, Any] = {"flow_run_id": str(flow_run.id) if flow_run.id else None, "ingest": report}
    if not report["slice_id"]:
        logger.info("no new data in %s: nothing to train", source)
        result["status"] = "no-new-data"
        return result
    start = champion_task(overrides)
    mlflow_run_id = begin_task(report["slice_id"], overrides)
    with registry.system_metrics(_settings(overrides), mlflow_run_id):  # CPU/GPU/memory while training runs
        trained = train_task(report["slice_id"], start, overrides)
    evaluation = evaluate_task(trained["checkpoint_uri"], start, overrides)
    registration = register_task(report, trained, evaluation, result["flow_run_id"], mlflow_run_id, overrides)
    logger.info("registered version %s (%s)", registration["model_version"], registration["gate"])
    trained.pop("history", None)
    result.update(status="registered", train=trained, evaluation=evaluation, registration=registration)
    return result
