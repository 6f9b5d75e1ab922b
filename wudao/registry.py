"""MLflow: one run per cycle, a registered model version per trained checkpoint, lineage tags and aliases.

Every version gets the alias `candidate`; it becomes `champion` when it is the first one, or when it passes the
gate (mean held-out loss over all slices no worse than its parent's on the same slices). Run ids are passed
explicitly (MLflow's active run is thread-local, and Prefect runs tasks on worker threads).
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import wudao
from wudao.config import Settings

CHAMPION, CANDIDATE = "champion", "candidate"


class RegistryError(RuntimeError):
    pass


@dataclass
class Champion:
    version: str
    checkpoint_uri: str
    tokenizer_version: str


@dataclass
class Registration:
    mlflow_run_id: str
    run_url: str
    model_version: str
    model_version_url: str
    parent_version: str | None
    champion: bool
    gate: str

    def to_dict(self) -> dict:
        return asdict(self)


def client(settings: Settings) -> MlflowClient:
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return MlflowClient(settings.mlflow_tracking_uri)


def _experiment_id(c: MlflowClient, settings: Settings) -> str:
    try:
        exp = c.get_experiment_by_name(settings.registry.experiment)
    except MlflowException as e:
        raise RegistryError(f"cannot reach MLflow at {settings.mlflow_tracking_uri}: {e.message.splitlines()[0]}") from None
    except Exception as e:  # connection refused and friends surface as requests/urllib3 errors
        raise RegistryError(f"cannot reach MLflow at {settings.mlflow_tracking_uri} ({type(e).__name__}): run `wudao stack up`") from None
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if not settings.mlflow_tracking_uri.startswith("http"):
        # A server-less (SQLite) store would otherwise put artefacts under the current directory.
        artifact_location = (settings.home / "mlflow" / "artifacts").as_uri()
    return c.create_experiment(settings.registry.experiment, artifact_location=artifact_location)


def champion(settings: Settings) -> Champion | None:
    """The current `@champion` version and its checkpoint, or None before the first registration."""
    c = client(settings)
    try:
        mv = c.get_model_version_by_alias(settings.registry.model_name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise RegistryError(f"cannot read the champion from MLflow at {settings.mlflow_tracking_uri}: {e.message}") from None
    except Exception as e:
        raise RegistryError(f"cannot reach MLflow at {settings.mlflow_tracking_uri} ({type(e).__name__}): run `wudao stack up`") from None
    return Champion(mv.version, mv.tags["wudao.checkpoint_uri"], mv.tags["wudao.tokenizer_version"])


def checkpoint_of(settings: Settings, model_uri: str) -> str:
    """The checkpoint behind `models:/name/version` or `models:/name@alias`."""
    c = client(settings)
    ref = model_uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = c.get_model_version(name, version)
    except (MlflowException, ValueError) as e:
        raise RegistryError(f"no model version {model_uri}: {e}") from None
    return mv.tags["wudao.checkpoint_uri"]


HISTORY_TAG = "wudao.champion_history"


def _history(c: MlflowClient, name: str) -> list[dict]:
    return json.loads(c.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def _set_champion(c: MlflowClient, name: str, version: str, why: str) -> None:
    """Move `@champion` and append the move to the model's champion history (a registered-model tag)."""
    history = _history(c, name)
    history.append({"version": version, "why": why, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    c.set_registered_model_alias(name, CHAMPION, version)
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-100:]))


def promote(settings: Settings, version: str) -> dict[str, Any]:
    """Make `version` the champion by hand (recorded in the champion history and on the version)."""
    c, name = client(settings), settings.registry.model_name
    try:
        c.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"model {name} has no version {version}") from None
    previous = champion(settings)
    _set_champion(c, name, version, "promoted by hand")
    c.set_model_version_tag(name, version, "wudao.promoted_by_hand", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return {"model": name, "champion": version, "previous": previous.version if previous else None}


def rollback(settings: Settings) -> dict[str, Any]:
    """Move `@champion` back to the version that held it before the current one."""
    c, name = client(settings), settings.registry.model_name
    current = champion(settings)
    if current is None:
        raise RegistryError(f"model {name} has no champion to roll back")
    history = _history(c, name)
    earlier = [h["version"] for h in history if h["version"] != current.version]
    if not earlier:
        raise RegistryError(f"version {current.version} is the only champion model {name} has had: nothing to roll back to")
    target = earlier[-1]
    _set_champion(c, name, target, f"rollback from {current.version}")
    c.set_model_version_tag(name, current.version, "wudao.rolled_back", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return {"model": name, "champion": target, "previous": current.version}


def ui_base(tracking_uri: str) -> str:
    return tracking_uri.rstrip("/") if tracking_uri.startswith("http") else tracking_uri


def gate(candidate: dict[str, float], parent: dict[str, float] | None) -> tuple[bool, str]:
    """Promote when the candidate's mean held-out loss over the parent's evaluated slices is not worse."""
    if not parent:
        return True, "first version: no parent to compare with"
    common = sorted(set(candidate) & set(parent))
    if not common:
        return True, "no common held-out slices with the parent"
    cand = sum(candidate[s] for s in common) / len(common)
    par = sum(parent[s] for s in common) / len(common)
    verdict = cand <= par
    return verdict, f"mean held-out loss {cand:.4f} vs parent {par:.4f} over {len(common)} slice(s)"


class WudaoLM(mlflow.pyfunc.PythonModel):
    """pyfunc flavour: `predict(["The capital of France is [MASK].", "Paris is"], params={"max_new_tokens": n})`
    fills each prompt's blank, or continues a prompt without one (greedy)."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from wudao.data.tokenizer import load_tokenizer
        from wudao.model import GLMConfig, GLMModel
        from wudao.serving import Generator

        ckpt = Path(context.artifacts["checkpoint"])
        manifest = json.loads((ckpt / "manifest.json").read_text())
        model = GLMModel(GLMConfig(**manifest["model_config"]))
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        self.generator = Generator.create(model, load_tokenizer(Path(context.artifacts["tokenizer"]).read_bytes()))

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        max_new = int((params or {}).get("max_new_tokens", 32))
        return [self.generator.text(str(prompt), max_new) for prompt in model_input]


def begin_cycle(settings: Settings, name: str) -> str:
    """Create the cycle's MLflow run up front, so it shows in the UI (with system metrics) while training runs."""
    c = client(settings)
    return c.create_run(_experiment_id(c, settings), run_name=name, tags={"wudao.kind": "lifelong-cycle"}).info.run_id


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


def register_cycle(
    settings: Settings,
    *,
    store,
    ingest_report: dict[str, Any],
    train_result: dict[str, Any],
    evaluation: dict[str, Any],
    parent: Champion | None,
    prefect_flow_run_id: str | None = None,
    mlflow_run_id: str | None = None,
) -> Registration:
    """Log one cycle into its MLflow run (created here unless `begin_cycle` made it), register the checkpoint as a
    model version and apply the gate."""
    from wudao.data.tokenizer import tokenizer_key
    from wudao.storage import join_key, key_in_store

    c = client(settings)
    exp_id = _experiment_id(c, settings)
    run_id = mlflow_run_id or begin_cycle(settings, f"cycle-{train_result['run_id']}")
    try:
        params = [Param(k, str(v)[:500]) for k, v in settings.public_dict().items()]
        params.append(Param("train.resumed_from", str(train_result["resumed_from"])))
        # Every per-step value of the run: loss (and per objective), aux losses, expert load, grad norm, LR, tokens/s.
        metrics = [Metric("train_loss" if k == "loss" else k, float(v), 0, h["step"])
                   for h in train_result["history"] for k, v in h.items() if k != "step" and v is not None]  # fmt: skip
        if train_result.get("mfu") is not None:
            metrics.append(Metric("mfu", train_result["mfu"], 0, train_result["steps"]))
        for slice_id, loss in evaluation["candidate"].items():
            metrics.append(Metric(f"heldout_loss/{slice_id}", loss, 0, 0))
        kg = dict(evaluation.get("kg") or {})
        if kg:
            metrics += [Metric("kg/p_at_1", kg["p_at_1"], 0, 0), Metric("kg/mrr", kg["mrr"], 0, 0)]
            metrics += [Metric(f"kg/p_at_1/{lang}", v["p_at_1"], 0, 0) for lang, v in kg["by_language"].items()]
            metrics += [Metric(f"kg/p_at_1/{sl}", v["p_at_1"], 0, 0) for sl, v in kg["by_slice"].items()]
            metrics += [Metric(f"kg/claims/{k}", kg["claims"][k], 0, 0) for k in ("supported_rate", "contradicted_rate", "unverifiable_rate")]
        # MLflow takes at most 1000 metrics and 100 params per request.
        for i in range(0, len(params), 100):
            c.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            c.log_batch(run_id, metrics=metrics[i : i + 1000])
        c.log_dict(run_id, ingest_report, "ingest_report.json")
        if kg:
            c.log_dict(run_id, kg.pop("per_fact", []), "eval/kg_per_fact.json")  # the per-fact table
            c.log_dict(run_id, kg, "eval/kg.json")
        c.log_dict(run_id, {k: v for k, v in evaluation.items() if k != "kg"}, "eval/heldout.json")
        passed, reason = gate(evaluation["candidate"], evaluation.get("parent"))

        prefix = key_in_store(store, train_result["checkpoint_uri"])
        with tempfile.TemporaryDirectory(prefix="wudao-register-") as tmp:
            ckpt_dir = Path(tmp) / "checkpoint"
            for name in ("model.safetensors", "manifest.json"):
                store.get_file(join_key(prefix, name), ckpt_dir / name)
            tok_path = store.get_file(tokenizer_key(train_result["tokenizer_version"]), Path(tmp) / "tokenizer.json")
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=WudaoLM(),
                    artifacts={"checkpoint": str(ckpt_dir), "tokenizer": str(tok_path)},
                    pip_requirements=[f"wudao=={wudao.__version__}"],
                    # Declares `max_new_tokens`, so serving accepts it (params absent from the signature are dropped).
                    signature=infer_signature(["The capital of France is [MASK]."], ["The capital of France is Paris."],
                                              params={"max_new_tokens": 32}),  # fmt: skip
                    registered_model_name=settings.registry.model_name,
                )
        version = str(info.registered_model_version)
        tags = {
            "wudao.checkpoint_uri": train_result["checkpoint_uri"],
            "wudao.tokenizer_version": train_result["tokenizer_version"],
            "wudao.slices": json.dumps(train_result["slice_ids"]),
            "wudao.parent_version": parent.version if parent else "",
            "wudao.train_run_id": train_result["run_id"],
            "wudao.code_version": wudao.__version__,
            "wudao.mlflow_run_id": run_id,
            "wudao.gate": ("passed: " if passed else "failed: ") + reason,
        }
        if prefect_flow_run_id:
            tags["wudao.prefect_flow_run_id"] = prefect_flow_run_id
        name = settings.registry.model_name
        for k, v in tags.items():
            c.set_model_version_tag(name, version, k, v)
            c.set_tag(run_id, k, v)
        c.set_registered_model_alias(name, CANDIDATE, version)
        if passed:
            _set_champion(c, name, version, f"gate: {reason}")
        c.set_terminated(run_id, "FINISHED")
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    base = ui_base(settings.mlflow_tracking_uri)
    return Registration(
        mlflow_run_id=run_id,
        run_url=f"{base}/#/experiments/{exp_id}/runs/{run_id}",
        model_version=version,
        model_version_url=f"{base}/#/models/{settings.registry.model_name}/versions/{version}",
        parent_version=parent.version if parent else None,
        champion=passed,
        gate=tags["wudao.gate"],
    )
