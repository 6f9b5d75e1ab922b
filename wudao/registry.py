"""MLflow model registry: a registered version per trained checkpoint, lineage tags, gates and aliases.

Every version gets the alias `candidate`; it becomes `champion` when it is the first one or when no promotion
gate fails (wudao/gates.py). Each gate's verdict is a version tag and a row of the `gates.json` table, so the
reason a candidate was or was not promoted is visible in the UI. `promote` and `rollback` move `@champion` by
hand, recorded in the champion history. Runs and what stages log into them live in wudao/tracking.py.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import wudao
from wudao import gates
from wudao.config import Settings, hide_password
from wudao.errors import WudaoError
from wudao.results import Evaluation, Registration, Trained
from wudao.tracking import TrackingError, client, log_table_once, run_url

CHAMPION, CANDIDATE = "champion", "candidate"


class RegistryError(WudaoError):
    pass


@dataclass
class Champion:
    version: str
    checkpoint_uri: str
    tokenizer_version: str


REQUIRED_TAGS = ("wudao.checkpoint_uri", "wudao.tokenizer_version")
"""Tags without which a version is not the platform's (an old, partial or foreign registration)."""


def _complete(mv) -> Champion:
    """The version as a Champion, or a RegistryError naming what it lacks (never a KeyError)."""
    missing = [t for t in REQUIRED_TAGS if not mv.tags.get(t)]
    if missing:
        raise RegistryError(
            f"model {mv.name} version {mv.version} was not registered completely (no {', '.join(missing)} "
            "tag): it cannot be used; promote another version or run a cycle"
        )
    return Champion(mv.version, mv.tags["wudao.checkpoint_uri"], mv.tags["wudao.tokenizer_version"])


def alias_version(settings: Settings, alias: str) -> Champion | None:
    """The version holding `alias` (champion, candidate) and its checkpoint, or None when no version holds it."""
    c = client(settings)
    try:
        mv = c.get_model_version_by_alias(settings.registry.model_name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise TrackingError(
            f"cannot read @{alias} from MLflow at {hide_password(settings.mlflow_tracking_uri)}: {e.message}"
        ) from e
    except Exception as e:
        raise TrackingError(
            f"cannot reach MLflow at {hide_password(settings.mlflow_tracking_uri)} ({type(e).__name__}): run `wudao stack up`"
        ) from e
    return _complete(mv)


def champion(settings: Settings) -> Champion | None:
    """The current `@champion` version and its checkpoint, or None before the first registration."""
    return alias_version(settings, CHAMPION)


def version_of_checkpoint(settings: Settings, checkpoint_uri: str | None) -> Champion | None:
    """The registered version made from `checkpoint_uri` (the newest, if registered twice), or None."""
    if not checkpoint_uri:
        return None
    versions = _search_versions(client(settings), f"name='{settings.registry.model_name}'")
    found = [v for v in versions if v.tags.get("wudao.checkpoint_uri") == checkpoint_uri]
    if not found:
        return None
    mv = max(found, key=lambda v: int(v.version))
    return Champion(mv.version, checkpoint_uri, mv.tags["wudao.tokenizer_version"])


def learned_slices(settings: Settings) -> set[str]:
    """Every slice some complete version was trained on (its `wudao.slices`), champion or not."""
    versions = _search_versions(client(settings), f"name='{settings.registry.model_name}'")
    return {
        s
        for v in versions
        if all(v.tags.get(t) for t in REQUIRED_TAGS)
        for s in json.loads(v.tags.get("wudao.slices", "[]"))
    }


def checkpoint_of(settings: Settings, model_uri: str) -> str:
    """The checkpoint behind `models:/name/version` or `models:/name@alias`."""
    return version_of(settings, model_uri)[1].checkpoint_uri


def version_of(settings: Settings, model_uri: str) -> tuple[str, Champion]:
    """The registered model's name and the complete version behind `models:/name/version` or `models:/name@alias`."""
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
        raise RegistryError(f"no model version {model_uri}: {e}") from e
    return name, _complete(mv)


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
        _complete(c.get_model_version(name, version))
    except MlflowException as e:
        raise RegistryError(f"model {name} has no version {version}") from e
    try:
        previous = champion(settings)
    except RegistryError:  # the champion alias points at an incomplete version: promoting replaces it
        previous = None
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
        raise RegistryError(
            f"version {current.version} is the only champion model {name} has had: nothing to roll back to"
        )
    target = earlier[-1]
    _set_champion(c, name, target, f"rollback from {current.version}")
    c.set_model_version_tag(
        name, current.version, "wudao.rolled_back", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    return {"model": name, "champion": target, "previous": current.version}


def parent_record(c: MlflowClient, name: str, parent: Champion | None) -> gates.ParentRecord | None:
    """The parent version's slices and recorded FID, read from its tags."""
    if parent is None:
        return None
    tags = c.get_model_version(name, parent.version).tags
    fid = tags.get("wudao.eval.fid")
    return gates.ParentRecord(
        version=parent.version,
        slices=json.loads(tags.get("wudao.slices", "[]")),
        fid=float(fid) if fid else None,
        fid_key=tags.get("wudao.eval.fid_key"),
    )


def _existing_version(c: MlflowClient, name: str, cycle_run_id: str) -> str | None:
    """The version a failed earlier attempt of this registration already created (so a retry does not add one)."""
    found = _search_versions(c, f"name='{name}' and run_id='{cycle_run_id}'")
    return str(max(int(v.version) for v in found)) if found else None


def _search_versions(c: MlflowClient, filter_string: str) -> list:
    """Model versions matching the filter; none while the registered model does not exist yet."""
    try:
        return c.search_model_versions(filter_string)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise


def log_model_version(
    settings: Settings,
    store,
    checkpoint_uri: str,
    tokenizer_version: str,
    cycle_run_id: str,
    tags: dict[str, str],
    *,
    name: str | None = None,
    extra_artifacts: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    python_model=None,
    kg_files: dict[str, bytes] | None = None,
) -> str:
    """Log the checkpoint as a pyfunc LoggedModel in the cycle's run, then register it with all its tags in one
    call: a version never exists without its files or without the `wudao.*` tags every reader needs (a kill
    between a registration and tags set afterwards left versions that broke promote, generate and the cycle).

    `kg_files` (the KG the version was evaluated with) travels inside it for checked generation. `name` (default
    `registry.model_name`), `extra_artifacts` (an adapter's folder), `params` (the request params
    the signature declares) and `python_model` (default `WudaoLM`) serve tuned adapters, registered the same way
    under their own model."""
    from wudao.data.tokenizer import tokenizer_key
    from wudao.pyfunc import PARAMS, WudaoLM, model_artifacts

    with tempfile.TemporaryDirectory(prefix="wudao-register-") as tmp:
        artifacts = model_artifacts(
            store, checkpoint_uri, tokenizer_key(tokenizer_version), settings.ingest.image_size, Path(tmp), kg=kg_files
        )
        artifacts.update(extra_artifacts or {})
        with mlflow.start_run(run_id=cycle_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=python_model or WudaoLM(),
                artifacts=artifacts,
                pip_requirements=[f"wudao=={wudao.__version__}"],
                # Declares the request params, so serving accepts them (params absent from the signature are dropped).
                signature=infer_signature(
                    ["The capital of France is [MASK]."], ["The capital of France is Paris."], params=params or PARAMS
                ),
            )
    c, name = client(settings), name or settings.registry.model_name
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = c.create_model_version(name, source=info.model_uri, run_id=cycle_run_id, tags=tags, model_id=info.model_id)
    return str(mv.version)


def register_cycle(
    settings: Settings,
    *,
    store,
    trained: Trained,
    evaluation: Evaluation,
    parent: Champion | None,
    cycle_run_id: str,
    stage_run_id: str | None = None,
    prefect_flow_run_id: str | None = None,
    kg_artifact: dict[str, Any] | None = None,
) -> Registration:
    """Register the trained checkpoint as a model version of the cycle's run, apply the gates, tag the lineage and
    move the aliases. Safe to retry: a version this cycle already registered is reused, and tags and aliases are
    set idempotently."""
    c, name = client(settings), settings.registry.model_name
    results = gates.evaluate_gates(settings.registry.gates, evaluation, parent_record(c, name, parent))
    passed, reason = gates.verdict(results)
    table = {
        col: [r.to_dict()[col] for r in results]
        for col in ("name", "status", "candidate", "parent", "threshold", "detail")
    }
    for run_id in {cycle_run_id, stage_run_id or cycle_run_id}:
        log_table_once(c, run_id, table, "gates.json")  # a retry does not list the gates twice

    tags = {
        "wudao.checkpoint_uri": trained.checkpoint_uri,
        "wudao.tokenizer_version": trained.tokenizer_version,
        "wudao.slices": json.dumps(trained.slice_ids),
        "wudao.parent_version": parent.version if parent else "",
        "wudao.train_run_id": trained.run_id,
        "wudao.code_version": wudao.__version__,
        "wudao.mlflow_run_id": cycle_run_id,
        "wudao.gate": ("passed: " if passed else "failed: ") + reason,
        **{f"wudao.gate.{r.name}": r.tag() for r in results},
    }
    if evaluation.kg:
        tags["wudao.eval.kg_p_at_1"] = f"{evaluation.kg.p_at_1:.6f}"
    if evaluation.fid:
        tags["wudao.eval.fid"] = f"{evaluation.fid.fid:.6f}"
        tags["wudao.eval.fid_key"] = evaluation.fid.key or ""
    if prefect_flow_run_id:
        tags["wudao.prefect_flow_run_id"] = prefect_flow_run_id
    if kg_artifact:  # {"uri", "files"}: the KG logged with the version for checked generation; or {"uri", "error"}
        tags["wudao.kg"] = kg_artifact["uri"] if "files" in kg_artifact else f"not logged: {kg_artifact['error']}"
    version = _existing_version(c, name, cycle_run_id)
    if version is None:
        version = log_model_version(
            settings,
            store,
            trained.checkpoint_uri,
            trained.tokenizer_version,
            cycle_run_id,
            tags,
            kg_files=(kg_artifact or {}).get("files"),
        )
    else:  # a retry: the earlier attempt's version gets this attempt's tags (idempotent)
        for k, v in tags.items():
            c.set_model_version_tag(name, version, k, v)
    for k, v in tags.items():
        c.set_tag(cycle_run_id, k, v)
    c.set_registered_model_alias(name, CANDIDATE, version)
    current = champion(settings)
    if passed and (current is None or current.version != version):  # a retry does not record the move twice
        _set_champion(c, name, version, f"gate: {reason}")
    base = hide_password(settings.mlflow_tracking_uri).rstrip("/")
    return Registration(
        mlflow_run_id=cycle_run_id,
        run_url=run_url(settings, cycle_run_id),
        model_version=version,
        model_version_url=f"{base}/#/models/{name}/versions/{version}",
        parent_version=parent.version if parent else None,
        champion=passed,
        gate=tags["wudao.gate"],
        gates=[r.to_dict() for r in results],
    )
