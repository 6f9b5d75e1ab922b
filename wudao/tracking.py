"""MLflow runs: one parent run per cycle, a nested run per stage, and what each stage logs into its run.

Run ids are always passed explicitly: MLflow's "active run" is thread-local and Prefect runs tasks on worker
threads, so nothing here relies on it. Logging is batched (MLflow takes at most 1000 metrics and 100 params per
request). Secrets never reach MLflow: params come from `Settings.public_dict()`, which leaves them out.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from wudao.config import Settings, hide_password
from wudao.errors import WudaoError
from wudao.results import Evaluation, IngestResult, KGSummary, TrainResult

PARENT_TAG = "mlflow.parentRunId"  # what the UI uses to nest runs under their cycle
# MLflow 3 opens an experiment in its model-training view (runs, metrics, models) only when this tag says so;
# without it the UI guesses and may show the GenAI (traces) view, which has nothing of ours.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
KG_SLICES_TAG = "wudao.eval.kg_slices"
"""Run tag naming the KG's slices: `kg/p_at_1/<name>` holds languages and slices alike, so readers need the list."""


class TrackingError(WudaoError):
    """MLflow could not be reached or refused a request that a later attempt may get through."""


def client(settings: Settings) -> MlflowClient:
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return MlflowClient(settings.mlflow_tracking_uri)


def unreachable(settings: Settings, e: Exception) -> TrackingError:
    """The error for an MLflow server that does not answer: connection refused and friends surface as
    requests/urllib3 errors, not as MlflowException."""
    where = hide_password(settings.mlflow_tracking_uri)
    return TrackingError(f"cannot reach MLflow at {where} ({type(e).__name__}): run `wudao stack up`")


def experiment_id(c: MlflowClient, settings: Settings) -> str:
    try:
        exp = c.get_experiment_by_name(settings.registry.experiment)
    except MlflowException as e:
        raise TrackingError(
            f"cannot reach MLflow at {hide_password(settings.mlflow_tracking_uri)}: {e.message.splitlines()[0]}"
        ) from e
    except Exception as e:
        raise unreachable(settings, e) from e
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag existed (or by hand): set it once
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    if not settings.mlflow_tracking_uri.startswith("http"):
        # A server-less (SQLite) store would otherwise put artefacts under the current directory.
        artifact_location = (settings.home / "mlflow" / "artifacts").as_uri()
    return c.create_experiment(
        settings.registry.experiment, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


def run_url(settings: Settings, run_id: str) -> str:
    c = client(settings)
    base = hide_password(settings.mlflow_tracking_uri).rstrip("/")
    return f"{base}/#/experiments/{c.get_run(run_id).info.experiment_id}/runs/{run_id}"


HOST_TAG, PID_TAG, PREFECT_RUN_TAG = "wudao.host", "wudao.pid", "wudao.prefect_flow_run_id"


def _owner_tags(prefect_flow_run_id: str | None) -> dict[str, str]:
    """Which process runs this MLflow run (so a later cycle can tell that it died) and its Prefect flow run."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    if prefect_flow_run_id:
        tags[PREFECT_RUN_TAG] = prefect_flow_run_id
    return tags


def begin_cycle(
    settings: Settings, name: str, kind: str = "lifelong-cycle", prefect_flow_run_id: str | None = None
) -> str:
    """The cycle's parent run, created before training so it shows in the UI while the cycle runs. Its params
    are the resolved config (no secrets)."""
    c = client(settings)
    tags = {"wudao.kind": kind, **_owner_tags(prefect_flow_run_id)}
    run_id = c.create_run(experiment_id(c, settings), run_name=name, tags=tags).info.run_id
    params = [Param(k, str(v)[:500]) for k, v in settings.public_dict().items()]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i : i + 100])
    return run_id


def begin_stage(
    settings: Settings, parent_run_id: str | None, stage: str, prefect_flow_run_id: str | None = None
) -> str:
    """A run for one stage, nested under its cycle's run (or a top-level run when the stage runs alone)."""
    if parent_run_id is None:
        return begin_cycle(settings, stage, kind=stage, prefect_flow_run_id=prefect_flow_run_id)
    c = client(settings)
    parent = c.get_run(parent_run_id)
    tags = {PARENT_TAG: parent_run_id, "wudao.kind": stage, **_owner_tags(prefect_flow_run_id)}
    return c.create_run(parent.info.experiment_id, run_name=stage, tags=tags).info.run_id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


def fail_dead_runs(settings: Settings) -> list[dict[str, str]]:
    """Mark FAILED the RUNNING runs whose process died (kill -9, OOM, a lost machine's reboot): they would stay
    RUNNING in the UI for ever. Only runs started on this host are judged (a pid means nothing elsewhere).
    Returns each one's run id and Prefect flow run id, so the caller can mark those crashed too."""
    c = client(settings)
    try:
        exp = c.get_experiment_by_name(settings.registry.experiment)
    except MlflowException:
        return []
    if exp is None:
        return []
    host = socket.gethostname()
    dead = []
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            c.set_tag(run.info.run_id, "wudao.end_reason", f"the process that ran it (pid {pid} on {host}) died")
            c.set_terminated(run.info.run_id, "FAILED")
            dead.append({"run_id": run.info.run_id, "prefect_flow_run_id": run.data.tags.get(PREFECT_RUN_TAG, "")})
    return dead


@contextmanager
def stage_run(settings: Settings, parent_run_id: str | None, stage: str) -> Iterator[str]:
    """Open a (nested) run for work outside a cycle's flow, e.g. `wudao tune`; it ends FINISHED, or FAILED when
    the work raises."""
    run_id = begin_stage(settings, parent_run_id, stage)
    try:
        yield run_id
    except BaseException:
        client(settings).set_terminated(run_id, "FAILED")
        raise
    client(settings).set_terminated(run_id, "FINISHED")


def log_metrics(settings: Settings, run_id: str, metrics: list[Metric], tags: dict[str, str] | None = None) -> None:
    c = client(settings)
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i : i + 1000])
    if tags:
        c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_table_once(c: MlflowClient, run_id: str, data: dict[str, list], artifact_file: str) -> None:
    """`log_table`, except when the run has the table already: MLflow appends to an existing table, so a retried
    stage (whose earlier attempt got this far) would otherwise list every row twice."""
    folder = artifact_file.rpartition("/")[0] or None
    if any(a.path == artifact_file for a in c.list_artifacts(run_id, folder)):
        return
    c.log_table(run_id, data, artifact_file)


def slice_inputs(settings: Settings, store, slices: list[str], context: str) -> list[DatasetInput]:
    """The slices as MLflow dataset inputs: name = slice id, digest = hash of its committed manifest."""
    inputs = []
    for slice_id in slices:
        manifest = store.read_manifest(f"slices/{slice_id}") or {}  # committed: the stage that names it read it
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        source = json.dumps({"uri": f"{settings.storage_uri.rstrip('/')}/slices/{slice_id}/"})
        profile = json.dumps({k: manifest.get(k) for k in ("documents", "tokens", "images") if k in manifest})
        dataset = Dataset(
            name=slice_id,
            digest=digest,
            source_type="s3" if settings.storage_uri.startswith("s3://") else "local",
            source=source,
            profile=profile,
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return inputs


def log_ingest(settings: Settings, run_id: str, store, report: IngestResult) -> None:
    """Counts as metrics, the full report (quarantine list included) as an artefact, the new slice as an input."""
    keys = (
        "objects_seen",
        "objects_new",
        "documents_accepted",
        "documents_heldout",
        "duplicates_exact",
        "duplicates_near",
        "quarantined",
        "tokens",
        "images_accepted",
    )
    now = int(time.time() * 1000)
    metrics = [Metric(f"ingest/{k}", float(getattr(report, k)), now, 0) for k in keys]
    metrics += [Metric(f"ingest/quarantine/{r}", float(n), now, 0) for r, n in report.quarantine_reasons.items()]
    metrics += [Metric(f"ingest/lang/{lang}", float(n), now, 0) for lang, n in report.languages.items()]
    log_metrics(settings, run_id, metrics)
    c = client(settings)
    c.log_dict(run_id, report.to_dict(), "ingest_report.json")
    if report.slice_id:
        c.log_inputs(run_id, datasets=slice_inputs(settings, store, [report.slice_id], "ingest"))


def log_train(settings: Settings, run_id: str, store, result: TrainResult) -> None:
    """Per-step metrics (loss, loss per objective, aux losses, expert load, grad norm, LR, tokens/s), the run's
    lineage, and the slices it trained on as dataset inputs (context `training`)."""
    metrics = [
        Metric("train_loss" if k == "loss" else k, float(v), 0, h["step"])
        for h in result.history
        for k, v in h.items()
        if k != "step" and v is not None
    ]
    if result.mfu is not None:
        metrics.append(Metric("mfu", result.mfu, 0, result.steps))
    tags = {
        "wudao.train_run_id": result.run_id,
        "wudao.checkpoint_uri": result.checkpoint_uri,
        "wudao.resumed_from": str(result.resumed_from),
        "wudao.tokenizer_version": result.tokenizer_version,
    }
    log_metrics(settings, run_id, metrics, tags)
    client(settings).log_inputs(run_id, datasets=slice_inputs(settings, store, result.slice_ids, "training"))


def kg_chance(kg: KGSummary | dict[str, Any]) -> float | None:
    """P@1 of guessing uniformly in each fact's answer space, to read P@1 against: the report's own figure, else
    (reports without it) the mean over the probed facts."""
    if kg.get("chance") is not None:
        return float(kg["chance"])
    facts = kg.get("per_fact") or []
    return sum(1 / f["answer_space"] for f in facts) / len(facts) if facts else None


def evaluation_metrics(evaluation: Evaluation) -> list[Metric]:
    """Held-out loss per slice (forgetting), KG P@1/MRR by language and slice, claim rates, FID, KID and whether the
    images follow their captions (`follows/*`)."""
    metrics = [Metric(f"heldout_loss/{s}", v, 0, 0) for s, v in evaluation.candidate.items()]
    for s, v in (evaluation.parent or {}).items():
        metrics.append(Metric(f"parent/heldout_loss/{s}", v, 0, 0))
    if kg := evaluation.kg:
        metrics += [Metric("kg/p_at_1", kg.p_at_1, 0, 0), Metric("kg/mrr", kg.mrr, 0, 0)]
        metrics += [Metric(f"kg/p_at_1/{lang}", v["p_at_1"], 0, 0) for lang, v in kg.by_language.items()]
        metrics += [Metric(f"kg/p_at_1/{sl}", v["p_at_1"], 0, 0) for sl, v in kg.by_slice.items()]
        if (chance := kg_chance(kg)) is not None:
            metrics.append(Metric("kg/chance", chance, 0, 0))
        metrics += [
            Metric(f"kg/claims/{k}", kg.claims[k], 0, 0)
            for k in ("supported_rate", "contradicted_rate", "unverifiable_rate")
        ]
    if evaluation.kg_parent:
        metrics.append(Metric("parent/kg/p_at_1", evaluation.kg_parent.p_at_1, 0, 0))
    if fid := evaluation.fid:
        metrics += [
            Metric(k, float(v), 0, 0)
            for k, v in (("fid", fid.fid), ("kid_mean", fid.kid_mean), ("kid_std", fid.kid_std))
            if v is not None
        ]
        metrics += [Metric(f"fid_blur/{k}", float(v), 0, 0) for k, v in fid.fid_blur.items()]
        metrics += [Metric(f"follows/{k}", float(v), 0, 0) for k, v in (fid.follows or {}).items()]
    return metrics


def log_evaluation(settings: Settings, run_id: str, evaluation: Evaluation | dict[str, Any]) -> None:
    """Metrics, the KG per-fact table, the forgetting table (held-out loss per slice, candidate vs parent), and the
    forgetting curve over every registered version plus this candidate (`eval/forgetting.png`)."""
    from wudao import history  # imported here: wudao.history reads the registry, which imports this module

    evaluation = Evaluation.model_validate(evaluation)
    kg_tags = {KG_SLICES_TAG: json.dumps(sorted(evaluation.kg.by_slice))} if evaluation.kg else None
    log_metrics(settings, run_id, evaluation_metrics(evaluation), kg_tags)
    c = client(settings)
    candidate, parent = evaluation.candidate, evaluation.parent or {}
    log_table_once(
        c,
        run_id,
        {"slice": list(candidate), "candidate": list(candidate.values()), "parent": [parent.get(s) for s in candidate]},
        "eval/forgetting.json",
    )
    summary = evaluation.to_dict()
    if kg := summary.pop("kg", None):
        c.log_dict(run_id, kg.pop("per_fact", None) or [], "eval/kg_per_fact.json")
        c.log_dict(run_id, kg, "eval/kg.json")
    summary.pop("kg_parent", None)
    c.log_dict(run_id, summary, "eval/summary.json")
    history.log_forgetting(settings, run_id, evaluation)


@contextmanager
def system_metrics(settings: Settings, run_id: str | None, interval_s: float = 5.0):
    """CPU, memory, disk, network (and GPU where present) of this machine, logged to `run_id` while inside."""
    if run_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=settings.mlflow_tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # The monitor drops the sample in progress when stopped; log one final sample so a short run has one too.
        monitor.collect_metrics()
        now = int(time.time() * 1000)
        final = [Metric(f"system/{k}", float(v), now, 0) for k, v in monitor.aggregate_metrics().items()]
        if final:
            client(settings).log_batch(run_id, metrics=final)


def is_transient(exc: BaseException) -> bool:
    """An MLflow failure that a later attempt can fix: the server (or the object store behind its artefact
    proxy) was unreachable or answered 5xx / 429."""
    if isinstance(exc, TrackingError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, MlflowException):
        code = str(getattr(exc, "error_code", ""))
        text = str(exc)
        return code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or any(
            marker in text for marker in ("Max retries exceeded", "Connection refused", "500 error", "503")
        )
    try:
        import requests

        return isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout)
    except ImportError:  # pragma: no cover - requests ships with mlflow
        return False
