"""The served deployments on the stack's real Prefect server, driven through its HTTP API as users do: the
README's `curl`, `wudao trigger`, two simultaneous trainings, and a scan for leaked secrets afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import select

from tests.conftest import stack_env

pytestmark = pytest.mark.slow

WUDAO = str(Path(sys.executable).parent / "wudao")


def _env(s, api: str) -> dict[str, str]:
    return {**stack_env(s, api), "WUDAO_TRAIN__STEPS": "4", "WUDAO_MODEL__D_MODEL": "32", "WUDAO_MODEL__N_LAYERS": "1"}


def test_deployments_through_the_api(local_stack, s3_settings, demo_dir, tmp_path):
    home, cfg = local_stack
    api = f"http://127.0.0.1:{cfg.prefect_port}/api"
    s = s3_settings
    env = _env(s, api)
    server = subprocess.Popen(
        [WUDAO, "deploy", "--limit", "3"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "deploy.log", "wb"),
        start_new_session=True,
    )
    try:
        deployment = _wait_for(lambda: _get(f"{api}/deployments/name/lifelong-cycle/default"), 120, server, tmp_path)
        for flow in ("ingest", "train", "evaluate", "register"):
            _wait_for(lambda flow=flow: _get(f"{api}/deployments/name/{flow}/default"), 60, server, tmp_path)

        # The README's curl (`--retry 3`: the local Prefect server's SQLite can answer 5xx under load).
        run = _post(
            f"{api}/deployments/{deployment['id']}/create_flow_run",
            {"parameters": {"source": str(demo_dir / "corpus" / "slice-01")}},
        )
        final = _wait_for(lambda: _finished(f"{api}/flow_runs/{run['id']}"), 300, server, tmp_path)
        assert final["state"]["type"] == "COMPLETED", final["state"].get("message")
        version = MlflowClient(s.mlflow_tracking_uri).get_model_version_by_alias(s.registry.model_name, "champion")
        assert version.tags["wudao.prefect_flow_run_id"] == run["id"]
        assert version.tags["wudao.parent_version"] == "" and json.loads(version.tags["wudao.slices"]) == [
            "slice-00001"
        ]

        # `wudao trigger --wait` reads the run's result back from the object store: the same source is a no-op.
        again = _wudao(
            env,
            "trigger",
            "lifelong-cycle",
            "--param",
            f"source={demo_dir / 'corpus' / 'slice-01'}",
            "--wait",
            "--json",
        )
        assert again["state"] == "COMPLETED" and again["result"]["status"] == "no-new-data"

        # Two trainings triggered at the same moment: both finish, never at the same time.
        results: list[dict] = []
        threads = [
            threading.Thread(
                target=lambda n=n: results.append(
                    _wudao(env, "trigger", "train", "--param", f"steps={n}", "--wait", "--json")
                )
            )
            for n in (5, 6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert sorted(r["result"]["steps"] for r in results) == [5, 6] and all(
            r["state"] == "COMPLETED" for r in results
        )
        windows = _training_windows(s, [r["result"]["run_id"] for r in results])
        (a_start, a_end), (b_start, b_end) = sorted(windows)
        assert a_end <= b_start, f"trainings overlapped: {windows}"
        assert max(r["result"]["waited_for_slot_s"] for r in results) > 0, "the second one waited for the slot"

        unknown = subprocess.run([WUDAO, "trigger", "no-such-flow"], env=env, capture_output=True, text=True)
        assert unknown.returncode == 1 and "no deployment no-such-flow/default" in unknown.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    # No configured secret reaches MLflow (its store and artefacts), Prefect (its database) or any log.
    _assert_no_secret(s.aws_secret_access_key.get_secret_value(), home, tmp_path, s)


def _training_windows(s, run_ids: list[str]) -> list[tuple]:
    from wudao.catalog import Catalog, TrainingRun

    cat = Catalog(s.catalog_url)
    try:
        with cat.session() as session:
            rows = session.scalars(select(TrainingRun).where(TrainingRun.id.in_(run_ids))).all()
            return [(r.created_at, r.finished_at) for r in rows]
    finally:
        cat.close()


def _assert_no_secret(secret: str, stack_home: Path, tmp_path: Path, s) -> None:
    needle = secret.encode()
    files = [
        stack_home / "mlflow" / "mlflow.db",
        *(stack_home / "prefect").rglob("*.db"),
        *(stack_home / "logs").glob("*.log"),
        tmp_path / "deploy.log",
    ]
    assert (stack_home / "mlflow" / "mlflow.db").is_file()
    for path in files:
        assert needle not in path.read_bytes(), f"the S3 secret leaked into {path}"
    # MLflow's artefacts (proxied into the bucket) and the persisted flow results.
    from wudao.stages import platform_store

    store = platform_store(s)
    scanned = 0
    for prefix in ("mlflow/", f"{store.prefix}/prefect-results/"):
        for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                data = store.client.get_object(Bucket=store.bucket, Key=obj["Key"])["Body"].read()
                assert needle not in data, f"the S3 secret leaked into s3 object {obj['Key']}"
                scanned += 1
    assert scanned > 5


def _wudao(env: dict, *args: str) -> dict:
    p = subprocess.run([WUDAO, *args], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def _post(url: str, body: dict, retries: int = 3) -> dict:
    """POST as `curl --retry N` does: transient answers (5xx, 429, 408) are retried after a pause."""
    for attempt in range(retries + 1):
        r = httpx.post(url, json=body, timeout=30)
        if r.status_code not in (408, 429) and r.status_code < 500 or attempt == retries:
            break
        time.sleep(2**attempt)
    assert r.status_code == 201, f"{url} answered {r.status_code}: {r.text[:500]}"
    return r.json()


def _get(url: str):
    r = httpx.get(url, timeout=10)
    return r.json() if r.status_code == 200 else None


def _finished(url: str):
    run = _get(url)
    return run if run and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def _wait_for(probe, timeout_s: float, server, tmp_path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := probe()) is not None:
            return value
        if server.poll() is not None:
            raise AssertionError("wudao deploy exited: " + (tmp_path / "deploy.log").read_text()[-2000:])
        time.sleep(1)
    raise AssertionError("timed out; deploy log: " + (tmp_path / "deploy.log").read_text()[-2000:])
