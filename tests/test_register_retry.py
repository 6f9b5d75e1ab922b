"""The object store goes away while a version is being registered: the task retries, succeeds once the store
is back, and leaves exactly one version, with all its files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client

from wudao import stack, stages, tracking

pytestmark = pytest.mark.slow


def test_register_retries_until_the_store_is_back(prefect_harness, local_stack, s3_settings, demo_dir, monkeypatch):
    from flows.common import io
    from flows.stages import register_task

    home, cfg = local_stack
    s = s3_settings.model_copy(
        update={
            "orchestration": s3_settings.orchestration.model_copy(update={"io_retries": 6, "io_retry_delays_s": [3.0]})
        }
    )
    stages.run_ingest(s, str(demo_dir / "corpus" / "slice-01"))
    trained = stages.run_train(s, None, "scratch")
    evaluation = stages.run_evaluate(s, trained["checkpoint_uri"], None)
    cycle_run = tracking.begin_cycle(s, "cycle-store-outage")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # let the task's retries, not MLflow's, do the waiting
    for key, value in {
        "AWS_ACCESS_KEY_ID": s.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key.get_secret_value(),
    }.items():
        monkeypatch.setenv(key, value)
    overrides = {
        "home": str(s.home),
        "storage_uri": s.storage_uri,
        "s3_endpoint_url": s.s3_endpoint_url,
        "catalog_url": s.catalog_url,
        "mlflow_tracking_uri": s.mlflow_tracking_uri,
        "registry": s.registry.model_dump(),
        "orchestration": s.orchestration.model_dump(),
    }

    @flow(name="register-during-outage")
    def register_during_outage():
        return io(register_task, s)(trained, evaluation, cycle_run, None, None, overrides)

    assert stack.stop_service(home, stack.OBJECT_STORE), "the object store was running"
    restarted = threading.Thread(target=lambda: (time.sleep(8), stack.up(home, cfg)))
    restarted.start()
    try:
        state = register_during_outage(return_state=True)
    finally:
        restarted.join(timeout=300)
    assert stack.status(home, cfg).healthy
    registration = state.result()
    assert registration["model_version"] == "1" and registration["champion"]

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs()
    attempts = [
        t.run_count
        for t in task_runs
        if t.flow_run_id == state.state_details.flow_run_id and t.name.startswith("register-version")
    ]
    assert attempts and attempts[0] > 1, "the first attempt failed while the store was down"

    c = MlflowClient(s.mlflow_tracking_uri)
    versions = c.search_model_versions(f"name='{s.registry.model_name}'")
    assert [v.version for v in versions] == ["1"], "retries did not leave extra versions"
    mlflow.set_tracking_uri(s.mlflow_tracking_uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{s.registry.model_name}/1")
    files = {p.name for p in Path(local).rglob("*") if p.is_file()}
    assert {"model.safetensors", "manifest.json", "tokenizer.json", "MLmodel"} <= files, "the version has all its files"
