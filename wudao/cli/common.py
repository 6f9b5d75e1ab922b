"""What every command shares: the typer `app`, the `--json` option, the settings loader, `_run` (which keeps the
contract in `wudao.cli`'s docstring) and the plain key: value renderer.

The command modules import these from here, not from the package, so that `wudao/cli/__init__.py` can import the
command modules without a cycle.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from wudao.errors import WudaoError
from wudao.results import StageResult

app = typer.Typer(help="WuDao: lifelong learning of a bilingual, multimodal GLM + MoE model.", no_args_is_help=True)

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
