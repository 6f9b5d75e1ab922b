"""The `lifelong-cycle` flow: ingest -> train -> evaluate -> register, each stage its own (sub)flow.

The cycle owns one MLflow parent run (params = the resolved config, no secrets); each stage logs into a run
nested under it, so the UI shows one row per cycle that unfolds into its stages. A cycle whose source brought
no new objects is a logged no-op: no run, no training -- unless the newest slice was never learned (an earlier
cycle died after its ingest): then the cycle resumes that slice, and its training resumes from the newest
checkpoint the dead one left. Runs of cycles whose process died are marked failed first.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows.common import io, settings_from
from flows.ingest import ingest_flow
from flows.stages import (
    IO,
    PERSIST,
    begin_cycle_task,
    begin_stage_task,
    end_run_task,
    evaluate_flow,
    fail_dead_runs_task,
    register_flow,
    train_flow,
)
from wudao import stages, tracking
from wudao.results import IngestResult


@task(name="unlearned-slice", **IO)
def unlearned_slice_task(overrides: dict[str, Any] | None = None) -> str | None:
    return stages.unlearned_slice(settings_from(overrides))


@task(name="log-ingest", **IO)
def log_ingest_task(run_id: str, report: IngestResult, overrides: dict[str, Any] | None = None) -> None:
    settings = settings_from(overrides)
    tracking.log_ingest(settings, run_id, stages.platform_store(settings), report)


@flow(name="lifelong-cycle", log_prints=True, **PERSIST)
def lifelong_cycle(source: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One lifelong cycle over the new objects of `source`; a no-op (no training) when nothing new arrived."""
    logger = get_run_logger()
    settings = settings_from(overrides)
    for dead in io(fail_dead_runs_task, settings)(overrides):
        logger.warning("MLflow run %s of an earlier cycle: its process died; marked FAILED", dead["run_id"])
    report = IngestResult.model_validate(
        ingest_flow(source, overrides=overrides)
    )  # a subflow: its batches show up as tasks
    result: dict[str, Any] = {"flow_run_id": str(flow_run.id) if flow_run.id else None, "ingest": report.to_dict()}
    slice_id = report.slice_id
    if not slice_id:
        slice_id = io(unlearned_slice_task, settings)(overrides)
        if slice_id is None:
            logger.info("no new objects in %s: nothing to learn, no training this cycle", source)
            return {**result, "status": "no-new-data"}
        logger.info(
            "no new objects in %s, but slice %s was never learned (an earlier cycle stopped): resuming it",
            source,
            slice_id,
        )
        result["resumed_slice"] = slice_id

    cycle_run_id = io(begin_cycle_task, settings)(f"cycle-{slice_id}", overrides)
    ok = False
    try:
        if report.slice_id:
            ingest_run_id = io(begin_stage_task, settings)(cycle_run_id, "ingest", overrides)
            io(log_ingest_task, settings)(ingest_run_id, report, overrides)
            io(end_run_task, settings)(ingest_run_id, True, overrides)
        trained = train_flow(slice_id, "champion", mlflow_parent_run_id=cycle_run_id, overrides=overrides)
        parent_uri = stages.baseline_checkpoint(settings, trained.resumed_from)
        evaluation = evaluate_flow(
            trained.checkpoint_uri, parent_uri, mlflow_parent_run_id=cycle_run_id, overrides=overrides
        )
        registration = register_flow(
            trained.checkpoint_uri, evaluation, mlflow_parent_run_id=cycle_run_id, overrides=overrides
        )
        ok = True
    finally:
        io(end_run_task, settings)(cycle_run_id, ok, overrides)
    logger.info("registered version %s (%s)", registration.model_version, registration.gate)
    return {
        **result,
        "status": "registered",
        "train": trained.to_dict(),
        "evaluation": evaluation.to_dict(),
        "registration": registration.to_dict(),
    }
