"""What each stage of a cycle hands the next, typed and JSON both ways.

    ingest -> IngestResult -> train -> TrainResult -> evaluate -> Evaluation -> register -> Registration

(`Trained` is the part of a `TrainResult` a checkpoint's manifest keeps: a standalone registration reads it.)

Stages return these models, the Prefect flows pass them between tasks (Prefect persists them as JSON and reads them
back as the same classes), gates and trackers read their fields, and `--json` / flow results print `to_dict()`.
`result["field"]` and `result.get("field")` read a result as the JSON it prints, for scripts written against it.
This module imports nothing of the platform, so every part may use it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class StageResult(BaseModel):
    """Base of the stage results: attribute access for code, item access for JSON-minded scripts."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.to_dict():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class IngestResult(StageResult):
    """The ingest report: what arrived, what was kept, why the rest was not, and the committed slice (if any)."""

    source: str
    slice_id: str | None = None
    """The committed slice; None when nothing new arrived (or nothing survived cleaning)."""
    manifest_uri: str | None = None
    tokenizer_version: str | None = None
    objects_seen: int = 0
    objects_new: int = 0
    documents_accepted: int = 0
    documents_heldout: int = 0
    duplicates_exact: int = 0
    duplicates_near: int = 0
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = {}
    """Refused objects and records by `wudao.data.quarantine.Reason`."""
    low_quality_rules: dict[str, int] = {}
    languages: dict[str, int] = {}
    tokens: int = 0
    shards: int = 0
    images_accepted: int = 0
    captions: int = 0


class Trained(StageResult):
    """What a checkpoint says about the training that made it: all that registration needs."""

    run_id: str
    checkpoint_uri: str
    resumed_from: str | None
    """The checkpoint the run started from: the parent model (null = scratch)."""
    slice_ids: list[str]
    tokenizer_version: str
    steps: int


class TrainResult(Trained):
    """One finished (or resumed and finished) training run."""

    restarted_at_step: int
    """Step an interrupted run resumed at (0 = ran from the beginning)."""
    tokens: int
    final_loss: float
    tokens_per_s: float
    skipped_steps: int
    mfu: float | None
    history: list[dict[str, Any]] = []
    """Per step: loss, lm loss per objective, aux losses, expert load, grad norm, LR, tokens/s (logged to MLflow step by
    step; the train flow drops it from its result)."""
    mlflow_run_id: str | None = None
    """The train flow's MLflow run (set by the flow)."""
    waited_for_slot_s: float | None = None
    """How long the train flow waited for the global training slot (set by the flow)."""


class _Open(StageResult):
    """A report with a few fields the platform reads and more it only logs and prints (kept as they come)."""

    model_config = ConfigDict(extra="allow")


class KGSummary(_Open):
    """`wudao eval kg`'s report (see wudao/eval/kg.py for every field): what gates, history and MLflow read."""

    p_at_1: float
    mrr: float
    n_facts: int
    chance: float | None = None
    by_language: dict[str, dict[str, Any]] = {}
    by_slice: dict[str, dict[str, Any]] = {}
    claims: dict[str, Any] = {}
    per_fact: list[dict[str, Any]] | None = None


class FIDSummary(_Open):
    """`wudao eval fid`'s report (see wudao/eval/fid.py), with the key under which FIDs compare."""

    fid: float
    key: str | None = None
    """Identifies how the FID was measured (reference set, N, weights, candidates): FIDs compare only under one key."""
    kid_mean: float | None = None
    kid_std: float | None = None
    fid_blur: dict[str, float] = {}
    follows: dict[str, Any] | None = None


class Evaluation(StageResult):
    """A candidate measured next to its parent on every slice it has seen, and on the KG and FID when configured."""

    checkpoint_uri: str
    slices: list[str]
    candidate: dict[str, float]
    """Held-out loss per slice."""
    parent: dict[str, float] | None = None
    """The parent's held-out loss on the same slices (None: no parent)."""
    fid: FIDSummary | None = None
    kg: KGSummary | None = None
    kg_parent: KGSummary | None = None
    """The parent on the same facts, so the KG gate compares like with like."""

    def to_dict(self) -> dict[str, Any]:
        # FID and KG appear only when they were measured (as `--json` has always printed them).
        out = self.model_dump(mode="json")
        return {k: v for k, v in out.items() if v is not None or k not in ("fid", "kg", "kg_parent")}


class Registration(StageResult):
    """A registered model version, the gates' verdicts and whether it became `@champion`."""

    mlflow_run_id: str
    run_url: str
    model_version: str
    model_version_url: str
    parent_version: str | None
    champion: bool
    gate: str
    gates: list[dict[str, Any]] = []
