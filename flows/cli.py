"""The `wudao` command: the library's commands (`wudao.cli`) plus the ones that drive Prefect flows (`cycle`,
`deploy`, `trigger`). This is the console script's entry point: the library never imports flows, so the
commands that need them are added here, on top of both.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from wudao.cli import JsonOpt, _follows_line, _print_kv, _run, _settings, app


@app.command("cycle")
def cycle_cmd(
    source: Annotated[str, typer.Argument(help="A local folder or an s3://bucket/prefix with new raw data.")],
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: train.steps).")] = None,
    kg: Annotated[
        str | None, typer.Option(help="KG folder to fact-check the candidate against (default: eval.kg_uri).")
    ] = None,
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
    typer.echo(
        f"ingest:   {ing['objects_new']} new object(s), {ing['documents_accepted']} documents -> {ing['slice_id'] or 'no new slice'}"
    )
    if resumed := result.get("resumed_slice"):
        typer.echo(f"resume:   slice {resumed} was never learned (an earlier cycle stopped): learning it now")
    if result["status"] != "registered":
        typer.echo("nothing new to learn: no training this cycle")
    else:
        t, r = result["train"], result["registration"]
        restarted = f" (resumed at step {t['restarted_at_step']})" if t.get("restarted_at_step") else ""
        typer.echo(
            f"train:    {t['steps']} steps, final loss {t['final_loss']:.3f}, from {t['resumed_from'] or 'scratch'}{restarted}"
        )
        typer.echo(
            f"evaluate: held-out loss {json.dumps({k: round(v, 3) for k, v in result['evaluation']['candidate'].items()})}"
        )
        if fid := result["evaluation"].get("fid"):
            typer.echo(
                f"          FID {fid['fid']:.2f}, KID {fid['kid_mean']:.4f} ± {fid['kid_std']:.4f} over {fid['n_images']} captions"
            )
            if follows := fid.get("follows"):
                typer.echo(f"          {_follows_line(follows)}")
            for note in (fid.get("warning"), fid.get("weights_note")):
                if note:
                    typer.echo(f"          note: {note}")
        if kg := result["evaluation"].get("kg"):
            typer.echo(
                f"          KG P@1 {kg['p_at_1']:.3f} (chance {kg.get('chance', 0):.3f}, majority {kg.get('majority', 0):.3f}; "
                f"95% CI {kg['ci95'][0]:.3f}-{kg['ci95'][1]:.3f}), MRR {kg['mrr']:.3f} over {kg['n_facts']} facts"
            )
            for name, group in kg.get("by_slice", {}).items():
                typer.echo(
                    f"          KG P@1 {name}: {group['p_at_1']:.3f} (chance {group.get('chance', 0):.3f}, "
                    f"majority {group.get('majority', 0):.3f}) over {group['n_facts']} facts"
                )
        typer.echo(
            f"register: version {r['model_version']} ({'champion' if r['champion'] else 'candidate'}; gate {r['gate']})"
        )
        typer.echo(f"MLflow run:           {r['run_url']}")
        typer.echo(f"MLflow model version: {r['model_version_url']}")
    if result.get("prefect_flow_run_url"):
        typer.echo(f"Prefect flow run:     {result['prefect_flow_run_url']}")


@app.command("deploy")
def deploy_cmd(
    cron: Annotated[
        str | None, typer.Option(help='Schedule of lifelong-cycle, e.g. "0 2 * * *" (UTC); none = trigger only.')
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Default SOURCE parameter of lifelong-cycle (needed with --cron).")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, help="Flow runs executed at once (trainings still go one at a time).")
    ] = 4,
    detach: Annotated[
        bool, typer.Option("--detach", help="Serve in the background (stopped by `wudao stack down`).")
    ] = False,
    setup_only: Annotated[
        bool,
        typer.Option(
            "--setup-only",
            help="Only prepare the server (training limit, result storage) for prefect.yaml deployments.",
        ),
    ] = False,
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
            cmd = [sys.executable, "-m", "flows.cli", "deploy", "--limit", str(limit)]
            cmd += ["--cron", cron, "--source", source] if cron else (["--source", source] if source else [])
            return stack.start_flow_server(settings.home, cmd, settings.prefect_api_url, settings.stack.start_timeout_s)

        _run(json_out, work, _print_kv)
        return
    from flows.deploy import serve

    typer.echo(
        f"serving lifelong-cycle, ingest, train, evaluate, register on {settings.prefect_api_url} (Ctrl+C to stop)",
        err=True,
    )
    serve(settings, cron=cron, source=source, limit=limit)


@app.command("trigger")
def trigger_cmd(
    flow: Annotated[
        str, typer.Argument(help="lifelong-cycle, ingest, train, evaluate or register (or FLOW/DEPLOYMENT).")
    ],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="KEY=VALUE (VALUE read as JSON when it parses); repeatable."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run to its end and print its result.")] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="With --wait: stop following after this many seconds.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Start a run of a deployed flow through the Prefect API (as the UI or `curl` would)."""
    from flows.deploy import parse_params, trigger

    def work():
        from prefect.settings import get_current_settings

        from wudao.stack import StackError

        settings = _settings()
        api_url = settings.prefect_api_url or get_current_settings().api.url  # env / stack, else the Prefect profile
        if not api_url:  # else Prefect starts a throwaway server that knows no deployment
            raise StackError(
                "no Prefect server to trigger on: start the stack (`wudao stack up`, then `wudao deploy`) "
                "or set PREFECT_API_URL"
            )
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


if __name__ == "__main__":
    app()
