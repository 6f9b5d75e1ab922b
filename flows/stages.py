"""The stage flows `train`, `evaluate` and `register`.

Each runs alone (its own deployment, `wudao trigger train`) or as a subflow of `lifelong-cycle`; each logs into
its own MLflow run, nested under the cycle's run when it has one. Flows only orchestrate: the work is in
`wudao.stages` and `wudao.tracking`, called from tasks that exchange URIs, ids and the typed stage results of
`wudao.results`. Results are persisted (JSON) to the platform object store. I/O tasks retry transient failures with backoff; training is not
retried blindly (a rerun resumes from its newest checkpoint instead).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.common import IO_RETRIES, IO_RETRY_DELAYS_S, io, mark_crashed, settings_from, training_slot, transient
from flows.results import PERSIST
from wudao import stages, tracking
from wudao.results import Evaluation, Registration, Trained, TrainResult

IO: dict[str, Any] = {
    "retries": IO_RETRIES,
    "retry_delay_seconds": IO_RETRY_DELAYS_S,
    "retry_condition_fn": transient,
    "cache_policy": NO_CACHE,
}


def with_steps(overrides: dict[str, Any] | None, steps: int | None) -> dict[str, Any] | None:
    if not steps:
        return overrides
    merged = dict(overrides or {})
    merged["train"] = {**merged.get("train", {}), "steps": steps}
    return merged


# ---- I/O tasks (MLflow, object store): retried with backoff ----


def _flow_run_id() -> str | None:
    return str(flow_run.id) if flow_run.id else None


@task(name="begin-cycle-run", **IO)
def begin_cycle_task(name: str, overrides: dict[str, Any] | None = None) -> str:
    return tracking.begin_cycle(settings_from(overrides), name, prefect_flow_run_id=_flow_run_id())


@task(name="begin-stage-run", **IO)
def begin_stage_task(parent_run_id: str | None, stage: str, overrides: dict[str, Any] | None = None) -> str:
    return tracking.begin_stage(settings_from(overrides), parent_run_id, stage, prefect_flow_run_id=_flow_run_id())


@task(name="fail-dead-runs", **IO)
def fail_dead_runs_task(overrides: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Runs of earlier cycles whose process died: MLflow runs FAILED, their Prefect flow runs CRASHED."""
    dead = tracking.fail_dead_runs(settings_from(overrides))
    mark_crashed(
        [d["prefect_flow_run_id"] for d in dead if d["prefect_flow_run_id"]],
        "its process died (found by a later cycle)",
    )
    return dead


@task(name="end-run", **IO)
def end_run_task(run_id: str, ok: bool, overrides: dict[str, Any] | None = None) -> None:
    tracking.client(settings_from(overrides)).set_terminated(run_id, "FINISHED" if ok else "FAILED")


@task(name="resolve-checkpoint", **IO)
def resolve_task(ref: str | None, overrides: dict[str, Any] | None = None) -> str | None:
    return stages.resolve_checkpoint(settings_from(overrides), ref)


@task(name="log-train", **IO)
def log_train_task(run_id: str, result: TrainResult, overrides: dict[str, Any] | None = None) -> None:
    settings = settings_from(overrides)
    tracking.log_train(settings, run_id, stages.platform_store(settings), result)


@task(name="log-evaluation", **IO)
def log_evaluation_task(run_ids: list[str], evaluation: Evaluation, overrides: dict[str, Any] | None = None) -> None:
    for run_id in run_ids:
        tracking.log_evaluation(settings_from(overrides), run_id, evaluation)


@task(name="read-training", **IO, **PERSIST)
def train_result_task(checkpoint_uri: str, overrides: dict[str, Any] | None = None) -> Trained:
    return stages.train_result_of(settings_from(overrides), checkpoint_uri)


@task(name="register-version", **IO, **PERSIST)
def register_task(
    trained: Trained,
    evaluation: Evaluation,
    cycle_run_id: str,
    stage_run_id: str | None,
    flow_run_id: str | None,
    overrides: dict[str, Any] | None = None,
) -> Registration:
    return stages.run_register(settings_from(overrides), trained, evaluation, cycle_run_id, stage_run_id, flow_run_id)


# ---- compute tasks ----


@task(name="train-model", cache_policy=NO_CACHE, **PERSIST)
def train_model_task(
    slice_id: str, start_uri: str | None, run_id: str, overrides: dict[str, Any] | None = None
) -> TrainResult:
    settings = settings_from(overrides)
    with training_slot(settings) as waited_s, tracking.system_metrics(settings, run_id):
        if settings.train.launcher == "torchrun":
            result = stages.run_train_torchrun(settings, overrides, slice_id, start_uri)
        else:
            result = stages.run_train(settings, slice_id, start_uri or "scratch")
    result.waited_for_slot_s = round(waited_s, 3)
    return result


@task(name="evaluate-model", cache_policy=NO_CACHE, **PERSIST)
def evaluate_model_task(
    checkpoint_uri: str, parent_uri: str | None, run_id: str, overrides: dict[str, Any] | None = None
) -> Evaluation:
    return stages.run_evaluate(settings_from(overrides), checkpoint_uri, parent_uri, mlflow_run_id=run_id)


# ---- flows ----


@flow(name="train", **PERSIST)
def train_flow(
    slice_id: str = "latest",
    start: str = "champion",
    steps: int | None = None,
    mlflow_parent_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainResult:
    """Continue pre-training on a slice (default: the newest) from `start` (champion, scratch, a checkpoint URI or
    models:/…), with replay of every earlier slice. Holds the global training slot while it trains."""
    overrides = with_steps(overrides, steps)
    settings = settings_from(overrides)
    start_uri = io(resolve_task, settings)(start, overrides)
    run_id = io(begin_stage_task, settings)(mlflow_parent_run_id, "train", overrides)
    ok = False
    try:
        result = train_model_task(slice_id, start_uri, run_id, overrides)
        io(log_train_task, settings)(run_id, result, overrides)
        ok = True
    finally:
        io(end_run_task, settings)(run_id, ok, overrides)
    # The history is logged to MLflow step by step; too long for a flow result.
    return result.model_copy(update={"history": [], "mlflow_run_id": run_id})


@flow(name="evaluate", **PERSIST)
def evaluate_flow(
    checkpoint: str = "candidate",
    parent: str | None = "champion",
    mlflow_parent_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Evaluation:
    """Held-out loss per slice (forgetting), KG fact checks and FID of `checkpoint`, each next to `parent`'s
    (a checkpoint URI, champion, candidate, models:/…, or None)."""
    settings = settings_from(overrides)
    checkpoint_uri = io(resolve_task, settings)(checkpoint, overrides)
    parent_uri = io(resolve_task, settings)(parent, overrides)
    if parent_uri == checkpoint_uri:
        parent_uri = None
    run_id = io(begin_stage_task, settings)(mlflow_parent_run_id, "evaluate", overrides)
    ok = False
    try:
        evaluation = evaluate_model_task(checkpoint_uri, parent_uri, run_id, overrides)
        io(log_evaluation_task, settings)(
            [run_id] + ([mlflow_parent_run_id] if mlflow_parent_run_id else []), evaluation, overrides
        )
        ok = True
    finally:
        io(end_run_task, settings)(run_id, ok, overrides)
    return evaluation


@flow(name="register", **PERSIST)
def register_flow(
    checkpoint: str,
    evaluation: Evaluation | None = None,
    mlflow_parent_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Registration:
    """Register a trained checkpoint as a model version with its lineage and apply the promotion gates (evaluating
    it against its parent first when no `evaluation` is given)."""
    logger = get_run_logger()
    settings = settings_from(overrides)
    checkpoint_uri = io(resolve_task, settings)(checkpoint, overrides)
    trained = io(train_result_task, settings)(checkpoint_uri, overrides)
    standalone = mlflow_parent_run_id is None
    cycle_run_id = mlflow_parent_run_id or io(begin_cycle_task, settings)(f"register-{trained.run_id}", overrides)
    if evaluation is None:
        parent = stages.baseline_checkpoint(settings, trained.resumed_from)
        evaluation = evaluate_flow(checkpoint_uri, parent, cycle_run_id, overrides)
    run_id = io(begin_stage_task, settings)(cycle_run_id, "register", overrides)
    ok = False
    try:
        flow_run_id = str(flow_run.root_flow_run_id or flow_run.id) if flow_run.id else None
        registration = io(register_task, settings)(trained, evaluation, cycle_run_id, run_id, flow_run_id, overrides)
        ok = True
    finally:
        io(end_run_task, settings)(run_id, ok, overrides)
        if standalone:
            io(end_run_task, settings)(cycle_run_id, ok, overrides)
    logger.info("registered version %s (%s)", registration.model_version, registration.gate)
    return registration
