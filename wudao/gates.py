"""Promotion gates: does a candidate beat its parent without forgetting?

Pure functions over the evaluate stage's result, so the rules are tested without any server. A gate that has
nothing to compare (no parent, no KG, a parent without a comparable FID) is `skipped`, never silently `passed`;
the candidate is promoted when no gate `failed`. Every result becomes a version tag and a row of the gates table.

A new gate is one function here, registered with `@gate("name")`, and its threshold as one field of
`GateSettings` (wudao/config/sections.py); registration, tags, the `gates.json` table and history pick it up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from wudao.config import GateSettings
from wudao.results import Evaluation

Status = Literal["passed", "failed", "skipped"]


@dataclass
class GateResult:
    name: str
    status: Status
    candidate: float | None
    parent: float | None
    threshold: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tag(self) -> str:
        return f"{self.status}: {self.detail}"


@dataclass
class ParentRecord:
    """What the gates need to know about the parent version besides the evaluate stage's own measurements."""

    version: str
    slices: list[str]
    fid: float | None = None
    fid_key: str | None = None
    """Identifies how the parent's FID was measured (captions, N, weights); FIDs compare only under one key."""


Gate = Callable[[GateSettings, Evaluation, ParentRecord], GateResult]
GATES: dict[str, Gate] = {}
"""Every gate by name, in the order they are evaluated and shown."""


def gate(name: str) -> Callable[[Gate], Gate]:
    """Register a gate: `fn(cfg, evaluation, parent) -> GateResult` (named `name`)."""

    def register(fn: Gate) -> Gate:
        GATES[name] = fn
        return fn

    return register


def evaluate_gates(
    cfg: GateSettings, evaluation: Evaluation | dict[str, Any], parent: ParentRecord | None
) -> list[GateResult]:
    """Every gate's verdict, in registration order (all skipped for a first version, which has no parent)."""
    if parent is None:
        skip = "first version: no parent to compare with"
        return [GateResult(name, "skipped", None, None, "", skip) for name in GATES]
    evaluation = Evaluation.model_validate(evaluation)
    return [fn(cfg, evaluation, parent) for fn in GATES.values()]


def verdict(results: list[GateResult]) -> tuple[bool, str]:
    """Promote when nothing failed; the reason names the failures (or says all passed / what was skipped)."""
    failed = [r for r in results if r.status == "failed"]
    if failed:
        return False, "; ".join(f"{r.name} failed ({r.detail})" for r in failed)
    passed = [r.name for r in results if r.status == "passed"]
    skipped = [r.name for r in results if r.status == "skipped"]
    return True, f"passed {', '.join(passed) or 'nothing'}" + (f"; skipped {', '.join(skipped)}" if skipped else "")


@gate("old_slices")
def _old_slices(cfg: GateSettings, evaluation: Evaluation, parent: ParentRecord) -> GateResult:
    """Every earlier slice's held-out loss at most `old_slice_tolerance` worse than the parent's."""
    cand, par = evaluation.candidate, evaluation.parent or {}
    threshold = f"each <= parent x {1 + cfg.old_slice_tolerance:g}"
    common = [s for s in parent.slices if s in cand and s in par]
    if not common:
        return GateResult("old_slices", "skipped", None, None, threshold, "no earlier slice measured for both")
    worst = max(common, key=lambda s: cand[s] / par[s] if par[s] > 0 else float("inf"))
    regressed = [s for s in common if cand[s] > par[s] * (1 + cfg.old_slice_tolerance)]
    mean_c = sum(cand[s] for s in common) / len(common)
    mean_p = sum(par[s] for s in common) / len(common)
    if regressed:
        detail = ", ".join(f"{s} {cand[s]:.4f} vs {par[s]:.4f}" for s in regressed)
        return GateResult("old_slices", "failed", mean_c, mean_p, threshold, f"forgot {detail}")
    detail = f"{len(common)} slice(s), worst {worst} {cand[worst]:.4f} vs {par[worst]:.4f}"
    return GateResult("old_slices", "passed", mean_c, mean_p, threshold, detail)


@gate("new_slice")
def _new_slice(cfg: GateSettings, evaluation: Evaluation, parent: ParentRecord) -> GateResult:
    """The new slice's held-out loss below the parent's (the cycle learned something)."""
    cand, par = evaluation.candidate, evaluation.parent or {}
    threshold = "< parent" if cfg.require_new_slice_gain else "off"
    measured = [s for s in evaluation.slices if s not in parent.slices and s in cand and s in par]
    if not cfg.require_new_slice_gain or not measured:
        return GateResult("new_slice", "skipped", None, None, threshold, "off" if measured else "no new slice measured")
    c = sum(cand[s] for s in measured) / len(measured)
    p = sum(par[s] for s in measured) / len(measured)
    status: Status = "passed" if c < p else "failed"
    return GateResult("new_slice", status, c, p, threshold, f"{', '.join(measured)} {c:.4f} vs parent {p:.4f}")


@gate("kg_p_at_1")
def _kg(cfg: GateSettings, evaluation: Evaluation, parent: ParentRecord) -> GateResult:
    """KG P@1 at most `kg_max_drop` below the parent's, on the same facts."""
    cand, par = evaluation.kg, evaluation.kg_parent
    threshold = f">= parent - {cfg.kg_max_drop:g}"
    if not cand or not par:
        return GateResult("kg_p_at_1", "skipped", cand and cand.p_at_1, None, threshold, "no KG check for both")
    c, p = cand.p_at_1, par.p_at_1
    status: Status = "passed" if c >= p - cfg.kg_max_drop else "failed"
    return GateResult("kg_p_at_1", status, c, p, threshold, f"P@1 {c:.3f} vs parent {p:.3f} on {cand.n_facts} facts")


@gate("fid")
def _fid(cfg: GateSettings, evaluation: Evaluation, parent: ParentRecord) -> GateResult:
    """FID at most `fid_max_increase` above the parent's, measured the same way."""
    cand = evaluation.fid
    threshold = f"<= parent + {cfg.fid_max_increase:g}"
    if not cand:
        return GateResult("fid", "skipped", None, parent.fid, threshold, "no FID this cycle")
    if parent.fid is None or parent.fid_key != cand.key:
        return GateResult("fid", "skipped", cand.fid, parent.fid, threshold, "parent has no FID measured the same way")
    c, p = cand.fid, parent.fid
    status: Status = "passed" if c <= p + cfg.fid_max_increase else "failed"
    return GateResult("fid", status, c, p, threshold, f"FID {c:.2f} vs parent {p:.2f}")
