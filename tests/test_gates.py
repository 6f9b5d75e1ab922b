"""Promotion gates as pure rules: what passes, what fails, and what is skipped for lack of data."""

from __future__ import annotations

from wudao.config import GateSettings
from wudao.gates import ParentRecord, evaluate_gates, verdict
from wudao.results import Evaluation

PARENT = ParentRecord(version="1", slices=["s1"], fid=30.0, fid_key="k")


def _evaluation(old: float, new: float, *, kg=(0.5, 0.5), fid: float | None = 31.0, fid_key: str = "k") -> Evaluation:
    return Evaluation(
        checkpoint_uri="s3://wudao/checkpoints/run/step-00000010",
        slices=["s1", "s2"],
        candidate={"s1": old, "s2": new},
        parent={"s1": 2.0, "s2": 3.0},
        kg={"p_at_1": kg[0], "mrr": kg[0], "n_facts": 10},
        kg_parent={"p_at_1": kg[1], "mrr": kg[1], "n_facts": 10},
        fid=None if fid is None else {"fid": fid, "key": fid_key},
    )


def _status(results) -> dict[str, str]:
    return {r.name: r.status for r in results}


def test_a_good_candidate_passes_every_gate():
    results = evaluate_gates(GateSettings(), _evaluation(old=2.01, new=2.5), PARENT)
    assert _status(results) == {"old_slices": "passed", "new_slice": "passed", "kg_p_at_1": "passed", "fid": "passed"}
    assert verdict(results)[0]


def test_forgetting_an_old_slice_beyond_the_tolerance_fails():
    results = evaluate_gates(GateSettings(old_slice_tolerance=0.02), _evaluation(old=2.05, new=2.5), PARENT)
    assert _status(results)["old_slices"] == "failed"
    ok, reason = verdict(results)
    assert not ok and "old_slices failed" in reason and "s1" in reason


def test_no_gain_on_the_new_slice_fails_unless_switched_off():
    assert _status(evaluate_gates(GateSettings(), _evaluation(old=2.0, new=3.0), PARENT))["new_slice"] == "failed"
    off = evaluate_gates(GateSettings(require_new_slice_gain=False), _evaluation(old=2.0, new=3.0), PARENT)
    assert _status(off)["new_slice"] == "skipped" and verdict(off)[0]


def test_kg_and_fid_regressions_beyond_delta_fail():
    kg_drop = evaluate_gates(GateSettings(kg_max_drop=0.05), _evaluation(old=2.0, new=2.5, kg=(0.40, 0.50)), PARENT)
    assert _status(kg_drop)["kg_p_at_1"] == "failed"
    fid_up = evaluate_gates(GateSettings(fid_max_increase=5.0), _evaluation(old=2.0, new=2.5, fid=36.0), PARENT)
    assert _status(fid_up)["fid"] == "failed"


def test_fid_measured_differently_is_skipped_not_compared():
    results = evaluate_gates(GateSettings(), _evaluation(old=2.0, new=2.5, fid=90.0, fid_key="other"), PARENT)
    assert _status(results)["fid"] == "skipped" and verdict(results)[0]


def test_the_first_version_skips_every_gate_and_is_promoted():
    results = evaluate_gates(GateSettings(), _evaluation(old=9.0, new=9.0), None)
    assert set(_status(results).values()) == {"skipped"}
    assert verdict(results)[0]
