"""Forgetting made visible: every registered version's held-out loss and KG P@1 per slice, as a table and a plot.

Each cycle's evaluate stage measures the candidate on every slice seen so far, and register records the version
with its run. Read back in version order, those numbers are the forgetting curve: one line per slice, starting at
the version that first learnt it; a line that climbs (loss) or falls (P@1) is a slice being forgotten. Nothing is
re-measured here: a version's numbers are those its own cycle logged (`heldout_loss/<slice>`, `kg/p_at_1/<slice>`,
`kg/chance`, `fid` on its run; gate verdicts and lineage on its version tags).

Pure functions (records, table, series, figure) are apart from the MLflow reading, so they test without a server.
`wudao history` prints the table; `tracking.log_evaluation` logs the plot and table with every evaluation.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from wudao.config import Settings, hide_password
from wudao.registry import CHAMPION, RegistryError
from wudao.results import Evaluation
from wudao.tracking import KG_SLICES_TAG, TrackingError, client, kg_chance, log_table_once, unreachable

HELDOUT, KG_P1 = "heldout_loss/", "kg/p_at_1/"
CANDIDATE = "candidate"
"""The label of the model being evaluated when it is not a registered version yet."""
PLOT_ARTIFACT, TABLE_ARTIFACT = "eval/forgetting.png", "eval/forgetting_history.json"


@dataclass
class VersionRecord:
    """What one version's cycle measured, per slice, and how its gates ruled."""

    version: str
    aliases: list[str] = field(default_factory=list)
    slices: list[str] = field(default_factory=list)
    """The slices it was trained on."""
    heldout_loss: dict[str, float] = field(default_factory=dict)
    kg_p_at_1: dict[str, float] = field(default_factory=dict)
    """Keyed by the KG's own slice names (`first_slice` of its facts), not necessarily the ingest's slice ids."""
    kg: dict[str, float | None] | None = None
    """Overall KG cloze result: p_at_1, chance (uniform guessing in each fact's answer space), mrr."""
    fid: float | None = None
    gate: dict[str, Any] | None = None
    run_id: str | None = None
    checkpoint_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- records from plain data ----


def gate_of(tags: dict[str, str]) -> dict[str, Any] | None:
    """The gate outcome recorded on a version's tags (`wudao.gate`, `wudao.gate.<name>`), or None when never gated."""
    overall = tags.get("wudao.gate")
    if overall is None:
        return None
    status, _, reason = overall.partition(": ")
    gates = {}
    for key, value in sorted(tags.items()):
        if key.startswith("wudao.gate."):
            gate_status, _, detail = value.partition(": ")
            gates[key.removeprefix("wudao.gate.")] = {"status": gate_status, "detail": detail}
    out: dict[str, Any] = {"passed": status == "passed", "reason": reason, "gates": gates}
    # Moves by hand override the gate; say so next to it, or the verdict reads as why the alias sits where it does.
    for key in ("promoted_by_hand", "rolled_back"):
        if f"wudao.{key}" in tags:
            out[key] = tags[f"wudao.{key}"]
    return out


def version_record(
    version: str,
    aliases: list[str],
    tags: dict[str, str],
    metrics: dict[str, float],
    kg_slices: list[str],
    run_id: str | None = None,
) -> VersionRecord:
    """One version from its tags and its run's metrics. `kg_slices` says which `kg/p_at_1/<name>` are slices (the
    rest are languages)."""
    kg = None
    if "kg/p_at_1" in metrics:
        kg = {"p_at_1": metrics["kg/p_at_1"], "chance": metrics.get("kg/chance"), "mrr": metrics.get("kg/mrr")}
    fid = metrics.get("fid")
    if fid is None and tags.get("wudao.eval.fid"):
        fid = float(tags["wudao.eval.fid"])
    return VersionRecord(
        version=version,
        aliases=sorted(aliases),
        slices=json.loads(tags.get("wudao.slices", "[]")),
        heldout_loss={k.removeprefix(HELDOUT): v for k, v in sorted(metrics.items()) if k.startswith(HELDOUT)},
        kg_p_at_1={s: metrics[KG_P1 + s] for s in kg_slices if KG_P1 + s in metrics},
        kg=kg,
        fid=fid,
        gate=gate_of(tags),
        run_id=run_id,
        checkpoint_uri=tags.get("wudao.checkpoint_uri"),
    )


def candidate_record(evaluation: Evaluation) -> VersionRecord:
    """The model an evaluate stage just measured, from its result (before it is registered)."""
    kg = evaluation.kg
    return VersionRecord(
        version=CANDIDATE,
        slices=list(evaluation.slices or evaluation.candidate),
        heldout_loss=dict(evaluation.candidate),
        kg_p_at_1={s: v["p_at_1"] for s, v in kg.by_slice.items()} if kg else {},
        kg={"p_at_1": kg.p_at_1, "chance": kg_chance(kg), "mrr": kg.mrr} if kg else None,
        fid=evaluation.fid.fid if evaluation.fid else None,
        checkpoint_uri=evaluation.checkpoint_uri,
    )


def with_candidate(records: list[VersionRecord], evaluation: Evaluation | dict[str, Any]) -> list[VersionRecord]:
    """The registered versions plus the evaluated model, unless it already is one of them (a standalone evaluate
    of a registered version, or a retry after registration): then it is not drawn twice."""
    evaluation = Evaluation.model_validate(evaluation)
    if any(r.checkpoint_uri == evaluation.checkpoint_uri for r in records):
        return records
    return [*records, candidate_record(evaluation)]


def _first_seen(per_version: list[dict[str, float]]) -> list[str]:
    """Keys in the order versions first measured them: slice N's column comes after slice N-1's."""
    seen: dict[str, None] = {}
    for values in per_version:
        seen.update(dict.fromkeys(values))
    return list(seen)


def history_table(model: str, records: list[VersionRecord]) -> dict[str, Any]:
    """The `wudao history --json` object: versions (oldest first) x slices."""
    return {
        "model": model,
        "slices": _first_seen([r.heldout_loss for r in records]),
        "kg_slices": _first_seen([r.kg_p_at_1 for r in records]),
        "versions": [r.to_dict() for r in records],
    }


def label(record: VersionRecord) -> str:
    if record.version == CANDIDATE:
        return CANDIDATE
    return f"v{record.version}" + ("\n@champion" if CHAMPION in record.aliases else "")


def forgetting_series(
    records: list[VersionRecord],
) -> tuple[list[str], dict[str, list[float | None]], dict[str, list[float | None]]]:
    """(x labels, held-out loss per slice, KG P@1 per slice), each series one value per version (None = not
    measured by that version, e.g. a slice that came later)."""
    labels = [label(r) for r in records]
    heldout = {s: [r.heldout_loss.get(s) for r in records] for s in _first_seen([r.heldout_loss for r in records])}
    kg = {s: [r.kg_p_at_1.get(s) for r in records] for s in _first_seen([r.kg_p_at_1 for r in records])}
    return labels, heldout, kg


def forgetting_columns(records: list[VersionRecord]) -> dict[str, list[Any]]:
    """The history as MLflow table columns (one row per version): the run's `eval/forgetting_history.json`."""
    _, heldout, kg = forgetting_series(records)
    columns: dict[str, list[Any]] = {
        "version": [r.version for r in records],
        "aliases": [",".join(r.aliases) for r in records],
    }
    columns.update({f"heldout_loss/{s}": v for s, v in heldout.items()})
    columns.update({f"kg/p_at_1/{s}": v for s, v in kg.items()})
    columns["kg/p_at_1"] = [r.kg["p_at_1"] if r.kg else None for r in records]
    columns["fid"] = [r.fid for r in records]
    return columns


def forgetting_figure(
    labels: list[str], heldout_loss: dict[str, list[float | None]], kg_p_at_1: dict[str, list[float | None]]
):
    """Two panels over the versions in order: held-out loss per slice (lower is better) and KG P@1 per slice
    (higher is better), one line per slice. Plain data in, a matplotlib Figure out (no pyplot: no global state,
    safe on Prefect's worker threads; rendered by Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.1 * len(labels) + 3), 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, kg_ax = fig.subplots(2, 1, sharex=True)
    x = list(range(len(labels)))
    for ax, series in ((loss_ax, heldout_loss), (kg_ax, kg_p_at_1)):
        for name, values in series.items():
            ax.plot(x, [math.nan if v is None else v for v in values], marker="o", label=name)
        if series:
            ax.legend(fontsize="small", loc="best")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.grid(True, alpha=0.3)
    loss_ax.set_ylabel("held-out loss (lower is better)")
    loss_ax.set_title("Forgetting curve: a rising line is a slice being forgotten", fontsize="medium")
    kg_ax.set_ylabel("KG P@1 (higher is better)")
    kg_ax.set_xticks(x, labels)
    kg_ax.set_xlabel("model version, in cycle order")
    return fig


# ---- reading MLflow ----


def _kg_slices(c, run) -> list[str]:
    """The KG slice names of a run: its tag, else (runs logged before the tag) the by_slice keys of its eval/kg.json."""
    if tag := run.data.tags.get(KG_SLICES_TAG):
        return json.loads(tag)
    if not any(k.startswith(KG_P1) for k in run.data.metrics):
        return []
    try:
        with tempfile.TemporaryDirectory(prefix="wudao-history-") as tmp:
            path = c.download_artifacts(run.info.run_id, "eval/kg.json", tmp)
            return list(json.loads(Path(path).read_text()).get("by_slice", {}))
    except (MlflowException, OSError, ValueError):
        return []  # no KG report on that run: its per-slice P@1 stays unknown rather than mislabelled


def read_versions(settings: Settings) -> list[VersionRecord]:
    """Every registered version of the model, oldest first, with its run's metrics. RegistryError when the model
    is not registered (or has no version yet)."""
    c, name = client(settings), settings.registry.model_name
    try:
        model = c.get_registered_model(name)
        versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise RegistryError(
                f"no registered model {name!r} at {hide_password(settings.mlflow_tracking_uri)}: run a cycle first "
                "(`wudao cycle SOURCE`)"
            ) from e
        raise TrackingError(
            f"cannot read model {name!r} from MLflow at {hide_password(settings.mlflow_tracking_uri)}: {e.message}"
        ) from e
    except Exception as e:
        raise unreachable(settings, e) from e
    if not versions:
        raise RegistryError(f"model {name!r} has no versions yet: run a cycle first (`wudao cycle SOURCE`)")
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    records = []
    for mv in versions:
        metrics, kg_slices = {}, []
        if mv.run_id:
            try:
                run = c.get_run(mv.run_id)
            except MlflowException:  # the run was deleted: the version's tags still tell lineage and gates
                run = None
            if run is not None:
                metrics, kg_slices = dict(run.data.metrics), _kg_slices(c, run)
        records.append(
            version_record(
                str(mv.version), aliases.get(str(mv.version), []), dict(mv.tags), metrics, kg_slices, mv.run_id
            )
        )
    return records


def history(settings: Settings) -> dict[str, Any]:
    """`wudao history`: every version x slice, oldest first."""
    return history_table(settings.registry.model_name, read_versions(settings))


def log_forgetting(settings: Settings, run_id: str, evaluation: Evaluation) -> None:
    """The forgetting curve (`eval/forgetting.png`) and its table (`eval/forgetting_history.json`) over every
    registered version plus the evaluated candidate, logged to `run_id`."""
    try:
        records = read_versions(settings)
    except RegistryError:  # the first cycle: nothing registered yet, the candidate is the whole history
        records = []
    records = with_candidate(records, evaluation)
    c = client(settings)
    fig = forgetting_figure(*forgetting_series(records))
    c.log_figure(run_id, fig, PLOT_ARTIFACT)
    log_table_once(c, run_id, forgetting_columns(records), TABLE_ARTIFACT)
