"""`wudao stack up|status|down` through the CLI: idempotent start, health, and stopping only what it started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import free_stack_settings
from tests.test_cli import run
from wudao import stack


@pytest.mark.slow
def test_up_twice_status_down(tmp_path):
    cfg = free_stack_settings()
    env = {
        "WUDAO_HOME": str(tmp_path / "home"),
        "WUDAO_STACK__S3_PORT": str(cfg.s3_port),
        "WUDAO_STACK__MASTER_PORT": str(cfg.master_port),
        "WUDAO_STACK__MLFLOW_PORT": str(cfg.mlflow_port),
        "WUDAO_STACK__PREFECT_PORT": str(cfg.prefect_port),
    }
    try:
        first = run("stack", "up", "--json", env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        up1 = json.loads(first.stdout)
        assert up1["healthy"] and all(s["started_now"] for s in up1["services"].values())
        assert up1["services"]["mlflow"]["url"] == f"http://127.0.0.1:{cfg.mlflow_port}"

        up2 = json.loads(run("stack", "up", "--json", env=env, cwd=tmp_path).stdout)
        assert not any(s["started_now"] for s in up2["services"].values()), "a second up starts nothing"
        assert {n: s["pid"] for n, s in up2["services"].items()} == {n: s["pid"] for n, s in up1["services"].items()}

        status = json.loads(run("stack", "status", "--json", env=env, cwd=tmp_path).stdout)
        assert status["healthy"]

        # With the stack up, other commands find it without further configuration.
        resolved = json.loads(run("config", "--json", env=env, cwd=tmp_path).stdout)
        assert resolved["storage_uri"] == "s3://wudao"
        assert resolved["mlflow_tracking_uri"] == f"http://127.0.0.1:{cfg.mlflow_port}"

        creds = tmp_path / "home" / "stack" / "s3-credentials.json"
        assert oct(creds.stat().st_mode & 0o777) == "0o600"
    finally:
        down = json.loads(run("stack", "down", "--json", env=env, cwd=tmp_path).stdout)
    assert sorted(down["stopped"]) == ["mlflow", "prefect", "seaweedfs"]
    after = json.loads(run("stack", "status", "--json", env=env, cwd=tmp_path).stdout)
    assert not any(s["running"] for s in after["services"].values())
    for svc in up1["services"].values():
        assert _gone(svc["pid"]), f"{svc['name']} (pid {svc['pid']}) still runs"
    again = json.loads(run("stack", "down", "--json", env=env, cwd=tmp_path).stdout)
    assert again["stopped"] == [], "down stops only what up started"


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its reaper counts as exited: it holds no ports and runs no code)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


def test_port_in_use_is_one_clear_error_and_starts_nothing(tmp_path):
    import socket

    cfg = free_stack_settings()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", cfg.mlflow_port))
        busy.listen()
        env = {
            "WUDAO_HOME": str(tmp_path / "home"),
            "WUDAO_STACK__S3_PORT": str(cfg.s3_port),
            "WUDAO_STACK__MASTER_PORT": str(cfg.master_port),
            "WUDAO_STACK__MLFLOW_PORT": str(cfg.mlflow_port),
            "WUDAO_STACK__PREFECT_PORT": str(cfg.prefect_port),
        }
        p = run("stack", "up", env=env, cwd=tmp_path)
    assert p.returncode == 1
    assert f"port {cfg.mlflow_port}" in p.stderr and "WUDAO_STACK__MLFLOW_PORT" in p.stderr
    status = json.loads(run("stack", "status", "--json", env=env, cwd=tmp_path).stdout)
    assert not any(s["running"] for s in status["services"].values())


def test_seaweedfs_own_ports_refuse_requests_without_the_stack_keys(local_stack):
    """The filer and volume HTTP ports sit beside S3 on loopback: without JWT keys they listed, wrote and deleted
    the whole bucket for anyone on the machine, past S3's credentials."""
    import urllib.error
    import urllib.request

    home, cfg = local_stack
    security = home / "stack" / stack.WEED_SECURITY
    assert security.stat().st_mode & 0o777 == 0o600
    filer = f"http://127.0.0.1:{cfg.master_port + stack.WEED_OFFSETS['filer']}"
    volume = f"http://127.0.0.1:{cfg.master_port + stack.WEED_OFFSETS['volume']}"
    requests = [
        urllib.request.Request(f"{filer}/buckets/{cfg.bucket}/?pretty=y"),  # list the bucket
        urllib.request.Request(f"{filer}/buckets/{cfg.bucket}/planted.txt", data=b"x", method="PUT"),  # write
        urllib.request.Request(f"{filer}/buckets/{cfg.bucket}/", method="DELETE"),  # delete it all
        urllib.request.Request(f"{volume}/1,01637037d6", data=b"x", method="PUT"),  # write a blob directly
    ]
    for req in requests:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 401, (req.method, req.full_url, refused.value.code)
