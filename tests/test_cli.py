"""The CLI contract: --help lists every command, --json prints one object, failures are one line + exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

WUDAO = str(Path(sys.executable).parent / "wudao")


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "MLFLOW_", "PREFECT_API", "AWS_"))}
    full_env.update(env or {})
    return subprocess.run([WUDAO, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


def _commands(group) -> list[str]:
    """Every top-level command and group of a typer app."""
    click_group = typer.main.get_command(group)
    return sorted(click_group.commands)


def test_help_lists_every_command():
    from flows.cli import app

    out = run("--help").stdout
    commands = _commands(app)
    assert {"stack", "db", "demo-data", "ingest", "train", "cycle", "deploy", "trigger", "config", "kg", "eval"} <= set(
        commands
    )
    for command in commands:
        assert command in out
    for group in ("stack", "db", "kg", "eval"):
        sub = run(group, "--help").stdout
        for command in typer.main.get_command(app).commands[group].commands:
            assert command in sub, f"wudao {group} --help lists {command}"


def test_bad_usage_exits_2():
    assert run("demo-data").returncode == 2
    assert run("no-such-command").returncode == 2


def test_json_mode_prints_exactly_one_object(tmp_path):
    env = {"WUDAO_HOME": str(tmp_path / "home")}
    p = run("demo-data", str(tmp_path / "demo"), "--slices", "2", "--json", env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["slices"][1].endswith("slice-02")
    p = run("ingest", str(tmp_path / "demo" / "corpus" / "slice-01"), "--json", env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["slice_id"] == "slice-00001" and report["documents_accepted"] > 0
    p = run("db", "upgrade", "--json", env=env, cwd=tmp_path)
    assert json.loads(p.stdout)["revision"] == json.loads(p.stdout)["head"]
    env.update({"WUDAO_TRAIN__STEPS": "2", "WUDAO_MODEL__D_MODEL": "32", "WUDAO_MODEL__N_HEADS": "2"})
    trained = json.loads(run("train", "--json", env=env, cwd=tmp_path).stdout)
    assert set(trained) >= {"run_id", "checkpoint_uri", "steps", "tokens", "final_loss", "tokens_per_s", "resumed_from"}
    assert run("kg", "build", str(tmp_path / "kg"), "--json", env=env, cwd=tmp_path).returncode == 0
    # Nothing registered yet: `champion` falls back to the newest trained checkpoint, and says so on stderr.
    p = run(
        "eval",
        "kg",
        "--model",
        "champion",
        "--kg",
        str(tmp_path / "kg"),
        "--limit",
        "5",
        "--json",
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["model"] == trained["checkpoint_uri"] and "newest trained checkpoint" in p.stderr


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["ingest", "/definitely/not/here", "--json"], {}, "source folder /definitely/not/here does not exist"),
        (
            ["ingest", "{tmp}", "--json"],
            {
                "WUDAO_STORAGE_URI": "s3://wudao",
                "WUDAO_S3_ENDPOINT_URL": "http://127.0.0.1:9",
                "AWS_ACCESS_KEY_ID": "x",
                "AWS_SECRET_ACCESS_KEY": "y",
            },
            "cannot reach the S3 endpoint",
        ),
        (["train", "--json"], {}, "no committed slices"),
        (["rollback", "--json"], {}, "has no champion"),
        (["trigger", "lifelong-cycle", "--param", "source=/tmp", "--json"], {}, "no Prefect server to trigger on"),
    ],
)
def test_failures_are_one_line_with_exit_1(tmp_path, args, env, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    p = run(*args, env={"WUDAO_HOME": str(tmp_path / "home"), **env}, cwd=tmp_path)
    assert p.returncode == 1
    assert p.stdout == ""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1]
    assert "Traceback" not in p.stderr
