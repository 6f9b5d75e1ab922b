"""What infra/mlflow-auth.ini's `auth_cache_ttl_seconds` buys: the basic-auth app checks every request's password
with a PBKDF2 hash unless a successful check is cached. Two MLflow servers with the basic-auth app, one with the
committed config and one with the cache off (all else equal: one uvicorn worker, SQLite stores), answer the same
authenticated requests, interleaved so machine noise hits both equally.

    .venv/bin/python bench/mlflow_auth.py [--requests 20] [--json]
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port  # noqa: E402


def _start(folder: Path, ttl: int | None, password: str) -> tuple[subprocess.Popen, str]:
    """An MLflow basic-auth server whose config is the committed one, with its own SQLite stores and, given `ttl`,
    that cache lifetime instead of the committed one."""
    config = configparser.ConfigParser()
    config.read(ROOT / "infra" / "mlflow-auth.ini")
    config["mlflow"]["database_uri"] = f"sqlite:///{folder / 'auth.db'}"
    if ttl is not None:
        config["mlflow"]["auth_cache_ttl_seconds"] = str(ttl)
    folder.mkdir(parents=True)
    with open(folder / "auth.ini", "w") as f:
        config.write(f)
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(16),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
    ]
    log = open(folder / "server.log", "wb")
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    ), f"http://127.0.0.1:{port}"


def _wait(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: mlflow server exited: see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: mlflow server not healthy after {timeout_s:.0f} s: see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    committed_ttl = int(
        re.search(r"^auth_cache_ttl_seconds = (\d+)", (ROOT / "infra" / "mlflow-auth.ini").read_text(), re.M).group(1)
    )
    password = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="wudao-bench-") as tmp:
        servers = {
            "cached": _start(Path(tmp) / "cached", None, password),
            "uncached": _start(Path(tmp) / "uncached", 0, password),
        }
        try:
            for name, (proc, url) in servers.items():
                _wait(url, proc, Path(tmp) / name / "server.log")
            times: dict[str, list[float]] = {name: [] for name in servers}
            with httpx.Client(auth=("admin", password), timeout=30) as client:
                for _ in range(args.requests):
                    for name, (_, url) in servers.items():
                        t = time.perf_counter()
                        r = client.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1})
                        times[name].append(time.perf_counter() - t)
                        if r.status_code != 200:
                            raise SystemExit(f"error: {name} server answered {r.status_code}")
        finally:
            for proc, _ in servers.values():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    cached, uncached = statistics.median(times["cached"]), statistics.median(times["uncached"])
    result = {
        "requests": args.requests,
        "auth_cache_ttl_seconds": committed_ttl,
        "cached_ms": cached * 1000,
        "uncached_ms": uncached * 1000,
        "uncached_over_cached": uncached / cached,
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k:22s} {v:,.2f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
