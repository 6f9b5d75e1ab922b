"""The default recipe learns: three lifelong cycles on the demo slices, each probed on the facts it taught.

The platform's own stages (ingest -> train from the previous cycle -> evaluate) with a folder store and a SQLite
catalog; model and training settings are the defaults a user gets. Each new slice must be learned far above both
baselines (uniform chance and always-the-most-common-object), and slice 1 must keep most of what it knew, in
P@1 and in held-out loss, while slices 2 and 3 are learned. Slow: about 3 minutes of training per cycle on 2 CPU
cores.
"""

from __future__ import annotations

import json

import pytest

from wudao.config import Settings
from wudao.stages import run_evaluate, run_ingest, run_train


@pytest.mark.slow
@pytest.mark.timeout(2400)  # three real cycles of ~3 minutes' training each, evaluation included
def test_three_cycles_learn_each_slice_and_keep_the_first_above_chance(tmp_path, demo_dir):
    settings = Settings(
        home=tmp_path / "home",
        storage_uri=str(tmp_path / "objects"),
        eval={"kg_uri": str(demo_dir / "kg"), "kg_limit": None, "kg_claim_subjects": 0},
    ).resolved()
    checkpoint, cycles = "scratch", []
    for n in (1, 2, 3):
        run_ingest(settings, str(demo_dir / "corpus" / f"slice-{n:02d}"))
        checkpoint = run_train(settings, start=checkpoint)["checkpoint_uri"]
        evaluation = run_evaluate(settings, checkpoint, None)
        by_slice = evaluation["kg"]["by_slice"]
        cycles.append({"heldout": evaluation["candidate"], "kg": by_slice})
        new = by_slice[f"slice-{n:02d}"]
        print(json.dumps({"cycle": n, "new_slice": new, "heldout": evaluation["candidate"]}))
        # Issue #12's target is >= 0.6 on the slice just learned. Measured (seeded, CPU, default 25 % replay):
        # 0.67 / 0.62 / 0.76 against chance 0.05 and majority 0.10-0.16; the bound leaves room for numeric drift.
        assert new["p_at_1"] >= 0.55 and new["p_at_1"] >= new["majority"] + 0.3, (
            f"cycle {n} did not learn its slice's facts: {new}"
        )
    first = [c["kg"]["slice-01"] for c in cycles]
    loss = [c["heldout"]["slice-00001"] for c in cycles]
    print(json.dumps({"slice-01_p_at_1": [f["p_at_1"] for f in first], "slice-00001_heldout": loss}))
    # Measured: slice 1's P@1 0.67 -> 0.56 -> 0.50 and held-out loss 1.44 -> 1.26 -> 1.44 (1.14x its best). Issue
    # #12 asks for P@1 within 0.05 of the best: not met (see the README). With 5 % replay the held-out loss went
    # 1.44 -> 2.08 -> 2.53 (1.76x); these bounds fail on that.
    best = max(f["p_at_1"] for f in first)
    assert first[-1]["p_at_1"] >= 0.6 * best and first[-1]["p_at_1"] >= first[-1]["majority"] + 0.2, (
        f"slice-01 P@1 per cycle {[f['p_at_1'] for f in first]}: forgotten"
    )
    assert loss[-1] <= 1.3 * min(loss), f"slice-00001 held-out loss per cycle {loss}: forgotten"
