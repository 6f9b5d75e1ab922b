"""The lifelong cycle end to end through Prefect, against real S3 (SeaweedFS) and MLflow servers."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from wudao import registry

pytestmark = pytest.mark.slow


def test_two_cycles_register_versions_with_lineage(prefect_harness, s3_settings, demo_dir, monkeypatch):
    from flows.lifelong import lifelong_cycle

    overrides = {
        **_as_overrides(s3_settings),
        "eval": {"kg_uri": str(demo_dir / "kg"), "kg_limit": 12, "kg_claim_subjects": 2},
    }
    for key, value in _env(s3_settings).items():
        monkeypatch.setenv(key, value)

    first = lifelong_cycle(source=str(demo_dir / "corpus" / "slice-01"), overrides=overrides)
    assert first["status"] == "registered"
    reg1 = first["registration"]
    assert reg1["model_version"] == "1" and reg1["champion"] and reg1["parent_version"] is None
    assert first["train"]["resumed_from"] is None

    second = lifelong_cycle(source=str(demo_dir / "corpus" / "slice-02"), overrides=overrides)
    reg2 = second["registration"]
    assert reg2["model_version"] == "2" and reg2["parent_version"] == "1"
    assert second["train"]["resumed_from"] == first["train"]["checkpoint_uri"], "continues from the champion"
    assert set(second["evaluation"]["candidate"]) == {"slice-00001", "slice-00002"}

    client = MlflowClient(s3_settings.mlflow_tracking_uri)
    name = s3_settings.registry.model_name
    v2 = client.get_model_version(name, "2")
    assert v2.tags["wudao.parent_version"] == "1"
    assert json.loads(v2.tags["wudao.slices"]) == ["slice-00001", "slice-00002"]
    assert v2.tags["wudao.checkpoint_uri"] == second["train"]["checkpoint_uri"]
    assert client.get_model_version_by_alias(name, "candidate").version == "2"
    expected_champion = "2" if reg2["champion"] else "1"
    assert registry.champion(s3_settings).version == expected_champion

    # One parent run per cycle, params = the resolved config (no secrets), a nested run per stage.
    run = client.get_run(reg2["mlflow_run_id"])
    assert run.data.params["train.steps"] == str(s3_settings.train.steps)
    assert not any("secret" in k.lower() for k in run.data.params), "no secrets among the params"
    stage_runs = {
        r.info.run_name: r
        for r in client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    }
    assert set(stage_runs) == {"ingest", "train", "evaluate", "register"}
    assert all(r.info.status == "FINISHED" for r in stage_runs.values()) and run.info.status == "FINISHED"
    train_run = stage_runs["train"]
    assert len(client.get_metric_history(train_run.info.run_id, "train_loss")) == s3_settings.train.steps
    assert any(k.startswith("system/") for k in train_run.data.metrics), "system metrics were logged during training"
    inputs = {
        (d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
        for d in train_run.inputs.dataset_inputs
    }
    assert inputs == {("slice-00001", "training"), ("slice-00002", "training")}, (
        "slices are the training run's dataset inputs"
    )
    assert "ingest/documents_accepted" in stage_runs["ingest"].data.metrics
    for r in (run, stage_runs["evaluate"]):
        assert "heldout_loss/slice-00001" in r.data.metrics
        assert {"kg/p_at_1", "kg/mrr", "kg/p_at_1/en", "kg/p_at_1/zh"} <= set(r.data.metrics), "KG checks every cycle"
    artifacts = {a.path for a in client.list_artifacts(stage_runs["evaluate"].info.run_id, "eval")}
    assert {"eval/kg_per_fact.json", "eval/kg.json", "eval/forgetting.json"} <= artifacts
    assert "gates.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {g["name"] for g in reg2["gates"]} == {"old_slices", "new_slice", "kg_p_at_1", "fid"}
    assert v2.tags["wudao.gate.old_slices"].startswith(("passed", "failed"))
    assert v2.tags["wudao.gate.fid"].startswith("skipped"), "no FID configured in this test"

    # The registered model answers through the pyfunc flavour, loaded by alias from the server.
    mlflow.set_tracking_uri(s3_settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(["The capital of France is"], params={"max_new_tokens": 5})
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)

    # Promotion by hand and rollback move @champion through the recorded history.
    assert registry.promote(s3_settings, "2") == {"model": name, "champion": "2", "previous": expected_champion}
    assert registry.promote(s3_settings, "1")["previous"] == "2"
    assert registry.champion(s3_settings).version == "1"
    assert registry.rollback(s3_settings) == {"model": name, "champion": "2", "previous": "1"}
    assert registry.champion(s3_settings).version == "2"
    history = json.loads(client.get_registered_model(name).tags["wudao.champion_history"])
    assert [h["version"] for h in history][-3:] == ["2", "1", "2"]
    with pytest.raises(registry.RegistryError, match="no version 99"):
        registry.promote(s3_settings, "99")

    again = lifelong_cycle(source=str(demo_dir / "corpus" / "slice-02"), overrides=overrides)
    assert again["status"] == "no-new-data" and "train" not in again

    # A candidate trained with an absurd learning rate is registered, but @champion stays where it was.
    bad = lifelong_cycle(
        source=str(demo_dir / "corpus" / "slice-03"),
        overrides={
            **overrides,
            "train": {**overrides["train"], "lr": 30.0, "spike_sigma": 1e9, "max_skipped_in_row": 1000},
        },
    )
    reg3 = bad["registration"]
    assert reg3["model_version"] == "3" and reg3["parent_version"] == "2" and not reg3["champion"]
    assert registry.champion(s3_settings).version == "2"
    assert client.get_model_version_by_alias(name, "candidate").version == "3"
    v3 = client.get_model_version(name, "3")
    assert v3.tags["wudao.gate"].startswith("failed:")
    assert any(v3.tags[f"wudao.gate.{g}"].startswith("failed") for g in ("old_slices", "new_slice", "kg_p_at_1"))


def _as_overrides(s) -> dict:
    """The per-test settings as flow parameters (JSON-able; secrets travel through the environment instead)."""
    return {
        "home": str(s.home),
        "storage_uri": s.storage_uri,
        "catalog_url": s.catalog_url,
        "registry": s.registry.model_dump(),
        "train": s.train.model_dump(),
        "model": s.model.model_dump(),
    }


def _env(s) -> dict[str, str]:
    return {
        "WUDAO_S3_ENDPOINT_URL": s.s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": s.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key.get_secret_value(),
        "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri,
    }
