"""Commands that run the platform rather than a model: the local stack (`stack up/status/down`), the catalog
database (`db upgrade`), the registry's champion (`promote`, `rollback`), the versions x slices table (`history`)
and the resolved settings (`config`)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from wudao.cli.common import JsonOpt, _print_kv, _run, _settings, app

# Added to `app` in `wudao/cli/__init__.py`, where the order of the groups in `wudao --help` is set.
stack_app = typer.Typer(
    help="The embedded local stack: SeaweedFS (S3), MLflow and Prefect on 127.0.0.1.", no_args_is_help=True
)
db_app = typer.Typer(help="The catalog database.", no_args_is_help=True)


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


# ---- registry ----


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


# ---- settings ----


@app.command("config")
def config_cmd(json_out: JsonOpt = False) -> None:
    """The resolved settings (secrets left out)."""
    _run(json_out, lambda: _settings().public_dict(), _print_kv)
