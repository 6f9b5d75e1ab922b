"""P-tuning against full fine-tuning and the zero-shot base on the demo task: same base, budget and dev rows.

The base is the platform's own first cycle: `wudao demo-data`, ingest corpus slice-01, train from scratch with the
default recipe (TrainSettings / ModelSettings defaults) on a folder store and a SQLite catalog (no servers). The task
is demo-data's continent task: slice-01's countries, asked in a phrasing the corpus never uses, split by country.
Every method gets the same budget (`--steps` steps of `tune.batch_size` examples, the other `tune.*` defaults):

    ptuning      P-tuning v2: prefix keys/values in every layer, model frozen
    ptuning-v1   P-tuning v1: input prompt embeddings, model frozen
    finetune     every weight (tune.finetune_lr)
    base         the same model zero-shot on the same dev rows

beside majority (the most common train label of the row's language) and chance (uniform over its labels), and
dev accuracy against the share of train.jsonl used (1%, 10%, 100%: at least one row, drawn per seed).

    .venv/bin/python bench/tune.py [--base-steps 1500] [--steps 300] [--fractions 0.01,0.1,1]
                                   [--methods ptuning,ptuning-v1,finetune] [--seeds 0,1] [--work DIR] [--json]

`--work DIR` keeps the store, catalog and demo data there: a second run finds the base's finished training (same
run id) and skips it, and `WUDAO_HOME=DIR/home WUDAO_STORAGE_URI=DIR/objects wudao ...` sees the same state.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wudao.config import Settings, TuneSettings  # noqa: E402
from wudao.data.demo import write_demo  # noqa: E402
from wudao.data.tokenizer import load_tokenizer, tokenizer_key  # noqa: E402
from wudao.stages import platform_store, run_ingest, run_train  # noqa: E402
from wudao.train.checkpoint import load_checkpoint  # noqa: E402
from wudao.tune.recipe import tune  # noqa: E402
from wudao.tune.task import load_task  # noqa: E402


def train_base(work: Path, base_steps: int | None):
    """The first lifelong cycle's model, exactly as `wudao ingest` + `wudao train` make it."""
    demo = work / "demo"
    if not (demo / "tasks").is_dir():
        write_demo(demo, slices=3, seed=0, images=4)
    settings = Settings(
        home=work / "home", storage_uri=str(work / "objects"), train={"steps": base_steps} if base_steps else {}
    ).resolved()
    run_ingest(settings, str(demo / "corpus" / "slice-01"))  # nothing new on a second run: no new slice
    started = time.perf_counter()
    trained = run_train(settings, start="scratch")
    seconds = time.perf_counter() - started
    store = platform_store(settings)
    ckpt = load_checkpoint(store, trained["checkpoint_uri"])
    tok = load_tokenizer(store.get_bytes(tokenizer_key(ckpt.manifest["tokenizer_version"])))
    info = {
        "steps": trained["steps"],
        "final_loss": trained["final_loss"],
        "train_s": round(seconds, 1),
        "reused": trained["restarted_at_step"] == trained["steps"],  # --work: the finished run was found
        "params": sum(p.numel() for p in ckpt.model.parameters()),
    }
    return ckpt.model, tok, demo / "tasks" / "continent", info


def subset(task, fraction: float, seed: int):
    """The task with a seeded share of its train rows (at least one); labels stay the full task's closed set."""
    n = max(1, round(fraction * len(task.train)))
    if n >= len(task.train):
        return task
    rows = np.random.default_rng(seed).choice(len(task.train), n, replace=False)
    return replace(task, train=[task.train[i] for i in sorted(rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-steps", type=int, default=None, help="steps of the base training (default train.steps)")
    ap.add_argument("--steps", type=int, default=TuneSettings().steps, help="tuning steps of every method")
    ap.add_argument("--fractions", default="0.01,0.1,1")
    ap.add_argument("--methods", default="ptuning,ptuning-v1,finetune")
    ap.add_argument("--seeds", default="0,1", help="tuning (and train-subset) seeds; accuracies are their mean")
    ap.add_argument("--work", type=Path, default=None, help="keep (and reuse) the base's store and catalog here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wudao-bench-tune-") as tmp:
        model, tok, task_dir, base = train_base(args.work.resolve() if args.work else Path(tmp), args.base_steps)
        task = load_task(task_dir)
        result: dict = {"base": base, "task": task.summary(), "steps": args.steps, "seeds": seeds, "methods": {}}
        for method in methods:
            row: dict = {"dev_accuracy": {}, "dev_accuracy_by_seed": {}, "tune_s": {}}
            for fraction in fractions:
                accs, secs = [], []
                for seed in seeds:
                    cfg = TuneSettings(method=method, steps=args.steps, seed=seed)
                    out = tune(
                        model,
                        tok,
                        subset(task, fraction, seed),
                        cfg,
                        base_checkpoint_uri="bench",
                        tokenizer_version="bench",
                    )
                    accs.append(out.metrics["dev_accuracy"])
                    secs.append(out.metrics["seconds"])
                    m = out.metrics
                key = f"{fraction:g}"
                row["dev_accuracy"][key] = float(np.mean(accs))
                row["dev_accuracy_by_seed"][key] = accs
                row["tune_s"][key] = round(float(np.mean(secs)), 1)
                if not args.json:
                    print(f"{method:11s} train {key:>5s}: dev {np.mean(accs):.3f} {accs}", file=sys.stderr, flush=True)
            row.update(trainable_params=m["trainable_params"], trainable_fraction=m["trainable_fraction"])
            result["methods"][method] = row
            # The baselines do not depend on the method or the train share: taken from the last full-task run.
            result.update(
                base_accuracy=m["base_accuracy"],
                majority_accuracy=m["majority_accuracy"],
                chance_accuracy=m["chance_accuracy"],
            )
    full = f"{max(fractions):g}"
    acc = {meth: r["dev_accuracy"][full] for meth, r in result["methods"].items()}
    if "ptuning" in acc and "finetune" in acc:
        result["ptuning_over_finetune"] = acc["ptuning"] / acc["finetune"] if acc["finetune"] else None
    if "ptuning" in acc:
        result["ptuning_over_base"] = acc["ptuning"] / result["base_accuracy"] if result["base_accuracy"] else None
        result["ptuning_over_majority"] = acc["ptuning"] / result["majority_accuracy"]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"base: {base['steps']} steps of the default recipe in {base['train_s']} s, {base['params']:,} parameters; "
        f"task {result['task']}"
    )
    print(
        f"{'method':12s} {'trainable':>18s}  "
        + "  ".join(f"{f'{f:g}':>6s}" for f in fractions)
        + "   (dev accuracy by train share)"
    )
    for meth, r in result["methods"].items():
        params = f"{r['trainable_params']:,} ({100 * r['trainable_fraction']:.2f}%)"
        print(f"{meth:12s} {params:>18s}  " + "  ".join(f"{v:6.3f}" for v in r["dev_accuracy"].values()))
    print(
        f"{'zero-shot base':31s}  {result['base_accuracy']:6.3f}   majority {result['majority_accuracy']:.3f}, "
        f"chance {result['chance_accuracy']:.3f}"
    )
    for k in ("ptuning_over_finetune", "ptuning_over_base", "ptuning_over_majority"):
        if result.get(k) is not None:
            print(f"{k}: {result[k]:.2f}")
    print(f"wall: {result['wall_s']} s")


if __name__ == "__main__":
    main()
