"""A cycle killed (-9) mid-training: the next cycle finds no new objects but an unlearned slice, resumes it from
the dead run's newest checkpoint, registers it, and marks the dead cycle's MLflow runs FAILED and its Prefect
flow run CRASHED (they stayed RUNNING for ever)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from uuid import UUID

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import stack_env
from wudao.stages import platform_store

pytestmark = pytest.mark.slow

WUDAO = str(Path(sys.executable).parent / "wudao")


def _env(s, limit: str) -> dict[str, str]:
    return {
        **stack_env(s, s.prefect_api_url),
        "WUDAO_ORCHESTRATION__TRAINING_LIMIT": limit,
        "WUDAO_TRAIN__STEPS": "400",
        "WUDAO_TRAIN__CHECKPOINT_EVERY": "10",
        "WUDAO_TRAIN__BATCH_SIZE": "4",
        "WUDAO_TRAIN__MICRO_BATCH_SIZE": "4",
        "WUDAO_TRAIN__THREADS": "1",
        "WUDAO_TRAIN__IMAGE_RATIO": "0",
        "WUDAO_MODEL__D_MODEL": "32",
        "WUDAO_MODEL__N_LAYERS": "2",
        "WUDAO_MODEL__N_HEADS": "2",
        "WUDAO_INGEST__VOCAB_SIZE": "600",
    }


def test_cycle_killed_mid_training_is_resumed_by_the_next_cycle(local_stack, s3_settings, demo_dir):
    _, cfg = local_stack
    s = s3_settings.model_copy(update={"prefect_api_url": f"http://127.0.0.1:{cfg.prefect_port}/api"})
    env = _env(s, f"wudao-training-{uuid.uuid4().hex[:8]}")  # its own slot: the dead holder blocks no other test
    source = str(demo_dir / "corpus" / "slice-01")
    store = platform_store(s)
    proc = subprocess.Popen(
        [WUDAO, "cycle", source, "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if any(o.key.endswith("/step-00000010/manifest.json") for o in store.list("checkpoints/")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the cycle was still training when killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    c = MlflowClient(s.mlflow_tracking_uri)
    exp = c.get_experiment_by_name(s.registry.experiment)
    dead = [r for r in c.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
    assert {r.data.tags["wudao.kind"] for r in dead} >= {"lifelong-cycle", "train"}, "the kill left RUNNING runs"

    p = subprocess.run([WUDAO, "cycle", source, "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)
    assert result["ingest"]["objects_new"] == 0 and result["resumed_slice"] == "slice-00001"
    assert result["status"] == "registered" and result["train"]["restarted_at_step"] >= 10, "resumed, not restarted"
    version = c.get_model_version(s.registry.model_name, result["registration"]["model_version"])
    assert json.loads(version.tags["wudao.slices"]) == ["slice-00001"]

    for run in dead:
        after = c.get_run(run.info.run_id)
        assert after.info.status == "FAILED" and "died" in after.data.tags["wudao.end_reason"]
    prefect_ids = {r.data.tags["wudao.prefect_flow_run_id"] for r in dead}
    with temporary_settings({PREFECT_API_URL: s.prefect_api_url}), get_client(sync_client=True) as client:
        states = {i: client.read_flow_run(UUID(i)).state.type.value for i in prefect_ids}
    assert set(states.values()) == {"CRASHED"}, states

    again = subprocess.run([WUDAO, "cycle", source, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "no-new-data", (
        "a learned slice is not redone"
    )
