"""Three lifelong cycles on the demo slices, per recipe: what is learned, what is forgotten, what it costs.

Each setting runs the platform's own stages (ingest -> train from the previous cycle -> evaluate) with a folder
object store and a SQLite catalog (no servers), and reports per cycle the KG P@1 of the slice just learned, and
after the last cycle how much slice 1 lost since its best (P@1 points and held-out loss in %).

    .venv/bin/python bench/lifelong.py [--replay 0,0.05,0.25] [--schedules cosine,constant] [--steps N] [--json]

Training settings not given here are the defaults of `TrainSettings` / `ModelSettings` (the demo recipe).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wudao.config import Settings  # noqa: E402
from wudao.data.demo import write_demo  # noqa: E402
from wudao.stages import run_evaluate, run_ingest, run_train  # noqa: E402


def run_setting(demo: Path, work: Path, replay: float, schedule: str, steps: int | None, kg_limit: int | None) -> dict:
    train = {"replay_fraction": replay, "schedule": schedule, **({"steps": steps} if steps else {})}
    settings = Settings(
        home=work / "home",
        storage_uri=str(work / "objects"),
        train=train,
        eval={"kg_uri": str(demo / "kg"), "kg_limit": kg_limit, "kg_claim_subjects": 0},
    ).resolved()
    cycles, checkpoint, train_s = [], "scratch", 0.0
    for n in (1, 2, 3):
        run_ingest(settings, str(demo / "corpus" / f"slice-{n:02d}"))
        started = time.perf_counter()
        result = run_train(settings, start=checkpoint)
        train_s += time.perf_counter() - started
        checkpoint = result["checkpoint_uri"]
        evaluation = run_evaluate(settings, checkpoint, None)
        kg = evaluation["kg"]["by_slice"]
        cycles.append(
            {
                "heldout_loss": evaluation["candidate"],
                "kg_p_at_1": {s: v["p_at_1"] for s, v in kg.items()},
                "chance": {s: v.get("chance") for s, v in kg.items()},
                "by_language": {lang: v["p_at_1"] for lang, v in evaluation["kg"]["by_language"].items()},
            }
        )
    first_kg, first_loss = "slice-01", "slice-00001"
    p1 = [c["kg_p_at_1"].get(first_kg) for c in cycles]
    loss = [c["heldout_loss"].get(first_loss) for c in cycles]
    return {
        "replay": replay,
        "schedule": schedule,
        "new_slice_p_at_1": [c["kg_p_at_1"].get(f"slice-{i + 1:02d}") for i, c in enumerate(cycles)],
        "chance": [c["chance"].get(f"slice-{i + 1:02d}") for i, c in enumerate(cycles)],
        "p_at_1_by_language": [c["by_language"] for c in cycles],
        "slice1_p_at_1": p1,
        "slice1_p_at_1_drop": max(p1) - p1[-1],
        "slice1_heldout_loss": loss,
        "slice1_heldout_rise_pct": 100 * (loss[-1] - min(loss)) / min(loss),
        "train_s": train_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replay", default="0,0.05,0.25")
    ap.add_argument("--schedules", default="cosine,constant")
    ap.add_argument("--steps", type=int, default=None, help="steps per cycle (default: the settings' default)")
    ap.add_argument("--kg-limit", type=int, default=None, help="probe a seeded sample of N facts (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "demo"
        write_demo(demo, slices=3, seed=0, images=0)
        # cosine at every replay share; the "infinite" constant schedule at the middle share only (the schedule,
        # not the replay, is what that comparison is about)
        settings = [(float(r), "cosine") for r in args.replay.split(",")]
        if "constant" in args.schedules.split(","):
            settings.append((sorted(float(r) for r in args.replay.split(","))[len(settings) // 2], "constant"))
        for i, (replay, schedule) in enumerate(settings):
            row = run_setting(demo, Path(tmp) / f"run-{i}", replay, schedule, args.steps, args.kg_limit)
            rows.append(row)
            if not args.json:
                print(
                    f"replay {replay:<5} {schedule:8s} new-slice P@1 {', '.join(f'{v:.2f}' for v in row['new_slice_p_at_1'])}"
                    f" | slice-1 P@1 drop {row['slice1_p_at_1_drop']:.2f}, held-out +{row['slice1_heldout_rise_pct']:.1f}%"
                    f" | train {row['train_s']:.0f}s | all slices by language {row['p_at_1_by_language'][-1]}",
                    flush=True,
                )
            print(json.dumps(row), file=sys.stderr, flush=True)  # the whole row at once, in case a later setting fails
    if args.json:
        print(json.dumps({"settings": rows}))


if __name__ == "__main__":
    main()
