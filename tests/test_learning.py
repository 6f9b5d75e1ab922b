"""The default recipe learns: three lifelong cycles on the demo slices, each probed on the facts it taught.

The platform's own stages (ingest -> train from the previous cycle -> evaluate) with a folder store and a SQLite
catalog; model and training settings are the defaults a user gets. Knowledge must be far above both baselines
(uniform chance and always-the-most-common-object), and slice 1 must stay above chance while slices 2 and 3
are learned. Slow: about 3 minutes of training per cycle on 2 CPU cores.
"""

from __future__ import annotations

import json

import pytest

from wudao.config import Settings
from wudao.stages import run_evaluate, run_ingest, run_train


@pytest.mark.slow
@pytest.mark.timeout(2400)  # three real cycles of ~3 minutes' training each, evaluation included
def test_three_cycles_learn_each_slice_and_keep_the_first_above_chance(tmp_path, demo_dir):
    settings = Settings(home=tmp_path / "home", storage_uri=str(tmp_path / "objects"),
                        eval={"kg_uri": str(demo_dir / "kg"), "kg_limit": None, "kg_claim_subjects": 0}).resolved()  # fmt: skip
    checkpoint, cycles = "scratch", []
    for n in (1, 2, 3):
        run_ingest(settings, str(demo_dir / "corpus" / f"slice-{n:02d}"))
        checkpoint = run_train(settings, start=checkpoint)["checkpoint_uri"]
        evaluation = run_evaluate(settings, checkpoint, None)
        by_slice = evaluation["kg"]["by_slice"]
        cycles.append({"heldout": evaluation["candidate"], "kg": by_slice})
        new = by_slice[f"slice-{n:02d}"]
        print(json.dumps({"cycle": n, "new_slice": new, "heldout": evaluation["candidate"]}))
        assert new["p_at_1"] >= 4 * new["chance"] and new["p_at_1"] >= new["majority"] + 0.1, \
            f"cycle {n} did not learn its slice's facts: {new}"  # fmt: skip
    # Measured (seeded, CPU): slice-01 P@1 0.42 -> 0.17 -> 0.14 and held-out loss 2.66 -> 3.30 -> 2.95 with the
    # default replay of 5 %: the first slice is still known above both baselines, but much is forgotten (issue
    # #12 asks for P@1 within 0.05 of its best; not met yet). These bounds catch a collapse back to chance.
    first = [c["kg"]["slice-01"] for c in cycles]
    assert first[-1]["p_at_1"] >= 2 * first[-1]["chance"], f"slice-01 P@1 per cycle {[f['p_at_1'] for f in first]}: forgotten"
    loss = [c["heldout"]["slice-00001"] for c in cycles]
    assert loss[-1] <= 1.25 * min(loss), f"slice-00001 held-out loss per cycle {loss}: forgotten"
