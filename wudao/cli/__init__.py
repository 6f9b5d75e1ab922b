"""The `wudao` command.

Contract: every reporting command takes `--json` and then prints exactly one JSON object on stdout (logs go to
stderr). Exit code 0 = done, 1 = failed with a one-line reason on stderr, 2 = bad usage.

The commands live by concern: data.py (demo data, ingest, KG build), model.py (train, train-vq, generate, tune),
evaluate.py (the `eval` group), ops.py (stack, db, promote, rollback, history, config); what they share -- the
`app`, `--json`, `_run` -- is in common.py. `flows.cli` adds the commands that drive Prefect flows to this `app`.
"""

from __future__ import annotations

# Importing a command module registers its commands. `wudao --help` lists the top-level ones in the order they
# register, which is the import order here (data, then model, then ops: the order a user meets them); evaluate.py
# registers only into its group.
from wudao.cli import data, evaluate, model, ops  # noqa: F401 (model only registers)
from wudao.cli.common import JsonOpt, _print_kv, _run, _settings, app
from wudao.cli.evaluate import _follows_line, _render_fid, _render_kg

# The groups come after the top-level commands in `wudao --help`, in the order they are added here.
app.add_typer(ops.stack_app, name="stack")
app.add_typer(ops.db_app, name="db")
app.add_typer(data.kg_app, name="kg")
app.add_typer(evaluate.eval_app, name="eval")

# Imported by flows/cli.py (which adds cycle/deploy/trigger to this app) and by tests.
__all__ = ["JsonOpt", "_follows_line", "_print_kv", "_render_fid", "_render_kg", "_run", "_settings", "app"]
