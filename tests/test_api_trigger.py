"""Trigger the served `lifelong-cycle` deployment through Prefect's REST API, as the README's curl does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

WUDAO = str(Path(sys.executable).parent / "wudao")


def test_rest_trigger_runs_a_cycle(local_stack, s3_settings, demo_dir, tmp_path):
    home, cfg = local_stack
    api = f"http://127.0.0.1:{cfg.prefect_port}/api"
    s = s3_settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "MLFLOW_", "PREFECT_", "AWS_"))}
    env.update({
        "WUDAO_HOME": str(s.home), "WUDAO_STORAGE_URI": s.storage_uri, "WUDAO_S3_ENDPOINT_URL": s.s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": s.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key.get_secret_value(),
        "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, "PREFECT_API_URL": api,
        "WUDAO_REGISTRY__MODEL_NAME": s.registry.model_name, "WUDAO_REGISTRY__EXPERIMENT": s.registry.experiment,
        "WUDAO_TRAIN__STEPS": "4", "WUDAO_MODEL__D_MODEL": "32", "WUDAO_MODEL__N_LAYERS": "1",
    })  # fmt: skip
    server = subprocess.Popen([WUDAO, "deploy"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "deploy.log", "wb"), start_new_session=True)  # fmt: skip
    try:
        deployment = _wait_for(lambda: _get(f"{api}/deployments/name/lifelong-cycle/default"), 120, server, tmp_path)
        run = httpx.post(
            f"{api}/deployments/{deployment['id']}/create_flow_run",
            json={"parameters": {"source": str(demo_dir / "corpus" / "slice-01")}},
            timeout=30,
        ).json()
        final = _wait_for(lambda: _finished(f"{api}/flow_runs/{run['id']}"), 300, server, tmp_path)
        assert final["state"]["type"] == "COMPLETED", final["state"].get("message")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    version = MlflowClient(s.mlflow_tracking_uri).get_model_version_by_alias(s.registry.model_name, "champion")
    assert version.tags["wudao.prefect_flow_run_id"] == run["id"]


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
