"""Forgetting made visible: the per-version history table, the forgetting plot, `wudao history`, the experiment kind.

The pure parts run on hand-made data; the MLflow reading runs against a real (server-less, SQLite) MLflow store;
one slow test runs two real cycles and reads the history back through the CLI.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from wudao import history, tracking
from wudao.config import Settings

WUDAO = str(Path(sys.executable).parent / "wudao")

GATE_TAGS = {
    "wudao.gate": "failed: old_slices failed (forgot slice-00001 5.9000 vs 5.5000)",
    "wudao.gate.old_slices": "failed: forgot slice-00001 5.9000 vs 5.5000",
    "wudao.gate.fid": "skipped: no FID this cycle",
}


def _records() -> list[history.VersionRecord]:
    v1 = history.version_record(
        "1",
        ["champion"],
        {"wudao.slices": '["slice-00001"]', "wudao.gate": "passed: passed nothing"},
        {
            "heldout_loss/slice-00001": 5.5,
            "kg/p_at_1": 0.1,
            "kg/chance": 0.05,
            "kg/mrr": 0.2,
            "kg/p_at_1/en": 0.12,
            "kg/p_at_1/slice-01": 0.1,
        },
        ["slice-01"],
        "run1",
    )
    v2 = history.version_record(
        "2",
        ["candidate"],
        {"wudao.slices": '["slice-00001", "slice-00002"]', **GATE_TAGS},
        {
            "heldout_loss/slice-00001": 5.9,
            "heldout_loss/slice-00002": 5.0,
            "parent/heldout_loss/slice-00001": 5.5,
            "kg/p_at_1": 0.2,
            "kg/p_at_1/zh": 0.3,
            "kg/p_at_1/slice-01": 0.05,
            "kg/p_at_1/slice-02": 0.3,
            "fid": 40.0,
        },
        ["slice-01", "slice-02"],
        "run2",
    )
    return [v1, v2]


def test_version_record_reads_slices_gates_and_kg_apart_from_languages():
    v1, v2 = _records()
    assert v2.heldout_loss == {"slice-00001": 5.9, "slice-00002": 5.0}, "parent/heldout_loss is not the version's own"
    assert v2.kg_p_at_1 == {"slice-01": 0.05, "slice-02": 0.3}, "kg/p_at_1/<lang> is not a slice"
    assert v1.kg == {"p_at_1": 0.1, "chance": 0.05, "mrr": 0.2} and v2.kg["chance"] is None
    assert v2.fid == 40.0 and v1.fid is None
    assert v1.gate == {"passed": True, "reason": "passed nothing", "gates": {}}
    assert v2.gate["passed"] is False and v2.gate["gates"]["old_slices"]["status"] == "failed"
    assert v2.gate["gates"]["fid"] == {"status": "skipped", "detail": "no FID this cycle"}
    assert history.version_record("3", [], {"wudao.eval.fid": "12.5"}, {}, []).fid == 12.5, (
        "FID from the tag when not a metric"
    )


def test_history_table_is_versions_by_slices():
    table = history.history_table("wudao", _records())
    assert table["model"] == "wudao"
    assert table["slices"] == ["slice-00001", "slice-00002"] and table["kg_slices"] == ["slice-01", "slice-02"]
    assert [v["version"] for v in table["versions"]] == ["1", "2"]
    assert table["versions"][0]["aliases"] == ["champion"] and table["versions"][1]["slices"] == [
        "slice-00001",
        "slice-00002",
    ]
    json.dumps(table)  # the CLI prints it as one JSON object


def test_candidate_joins_the_history_once():
    evaluation = {
        "checkpoint_uri": "s3://b/checkpoints/c/step-6",
        "slices": ["slice-00001", "slice-00002", "slice-00003"],
        "candidate": {"slice-00001": 6.1, "slice-00002": 5.2, "slice-00003": 4.8},
        "kg": {
            "p_at_1": 0.25,
            "mrr": 0.3,
            "n_facts": 2,
            "by_slice": {"slice-03": {"p_at_1": 0.5}},
            "per_fact": [{"answer_space": 4}, {"answer_space": 2}],
        },
    }
    records = history.with_candidate(_records(), evaluation)
    assert [r.version for r in records] == ["1", "2", "candidate"]
    assert records[-1].kg == {"p_at_1": 0.25, "chance": 0.375, "mrr": 0.3}
    labels, heldout, kg = history.forgetting_series(records)
    assert labels == ["v1\n@champion", "v2", "candidate"]
    assert heldout["slice-00001"] == [5.5, 5.9, 6.1] and heldout["slice-00003"] == [None, None, 4.8]
    assert kg["slice-03"] == [None, None, 0.5]
    registered = history.with_candidate(records[:2], {**evaluation, "checkpoint_uri": "s3://b/v2"})
    assert len(registered) == 3, "an unregistered checkpoint is the candidate"
    records[1].checkpoint_uri = "s3://b/v2"
    assert len(history.with_candidate(records[:2], {**evaluation, "checkpoint_uri": "s3://b/v2"})) == 2, (
        "not drawn twice"
    )
    columns = history.forgetting_columns(records)
    assert columns["version"] == ["1", "2", "candidate"] and columns["heldout_loss/slice-00002"] == [None, 5.0, 5.2]
    assert len({len(v) for v in columns.values()}) == 1, "a rectangular table"


def test_forgetting_figure_has_one_line_per_slice_and_renders_png():
    labels, heldout, kg = history.forgetting_series(_records())
    fig = history.forgetting_figure(labels, heldout, kg)
    loss_ax, kg_ax = fig.axes
    assert len(loss_ax.lines) == 2 and len(kg_ax.lines) == 2
    assert [line.get_label() for line in loss_ax.lines] == ["slice-00001", "slice-00002"]
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    image = Image.open(io.BytesIO(buf.getvalue()))
    assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
    empty = history.forgetting_figure(["candidate"], {"slice-00001": [5.0]}, {})
    assert len(empty.axes[0].lines) == 1 and len(empty.axes[1].lines) == 0, "no KG checks: an empty panel, no error"


@pytest.fixture(scope="module")
def sqlite_settings(tmp_path_factory) -> Settings:
    """A real MLflow store without a server: SQLite under a temporary home (MLflow builds its schema once here)."""
    home = tmp_path_factory.mktemp("history-home")
    return Settings(
        home=home, storage_uri=str(home / "objects"), registry={"experiment": "hist", "model_name": "hist"}
    ).resolved()


def test_experiment_is_tagged_as_model_development(sqlite_settings):
    c = tracking.client(sqlite_settings)
    exp = c.get_experiment(tracking.experiment_id(c, sqlite_settings))
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = sqlite_settings.model_copy(
        update={"registry": sqlite_settings.registry.model_copy(update={"experiment": "older"})}
    )
    made_before = c.create_experiment("older", artifact_location=(older.home / "mlflow" / "older").as_uri())
    assert tracking.EXPERIMENT_KIND_TAG not in c.get_experiment(made_before).tags
    assert tracking.experiment_id(c, older) == made_before
    assert c.get_experiment(made_before).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development", (
        "set on an existing one"
    )


def test_reads_registered_versions_and_logs_the_forgetting_plot(sqlite_settings):
    s = sqlite_settings
    c: MlflowClient = tracking.client(s)
    name = s.registry.model_name
    with pytest.raises(history.RegistryError, match="no registered model"):
        history.history(s)
    c.create_registered_model(name)
    evaluations = [
        {
            "checkpoint_uri": "file:///ck/1",
            "slices": ["slice-00001"],
            "candidate": {"slice-00001": 5.5},
            "parent": None,
        },
        {
            "checkpoint_uri": "file:///ck/2",
            "slices": ["slice-00001", "slice-00002"],
            "candidate": {"slice-00001": 5.8, "slice-00002": 5.1},
            "parent": {"slice-00001": 5.5, "slice-00002": 6.0},
        },
    ]
    kg = {
        "p_at_1": 0.2,
        "mrr": 0.3,
        "n_facts": 2,
        "by_language": {"en": {"p_at_1": 0.2}},
        "by_slice": {"slice-01": {"p_at_1": 0.2}},
        "claims": {"supported_rate": 0.0, "contradicted_rate": 0.0, "unverifiable_rate": 1.0},
        "per_fact": [{"answer_space": 5}],
    }
    for i, evaluation in enumerate(evaluations, start=1):
        run_id = tracking.begin_cycle(s, f"cycle-{i}")
        tracking.log_evaluation(s, run_id, {**evaluation, "kg": kg})
        mv = c.create_model_version(name, f"{c.get_run(run_id).info.artifact_uri}/model", run_id)
        for k, v in {
            "wudao.checkpoint_uri": evaluation["checkpoint_uri"],
            "wudao.slices": json.dumps(evaluation["slices"]),
            "wudao.gate": "passed: passed nothing",
        }.items():
            c.set_model_version_tag(name, mv.version, k, v)
    c.set_registered_model_alias(name, "champion", "2")

    table = history.history(s)
    assert [v["version"] for v in table["versions"]] == ["1", "2"] and table["versions"][1]["aliases"] == ["champion"]
    assert table["versions"][1]["heldout_loss"] == {"slice-00001": 5.8, "slice-00002": 5.1}
    assert table["versions"][0]["kg_p_at_1"] == {"slice-01": 0.2} and table["versions"][0]["kg"][
        "chance"
    ] == pytest.approx(0.2)

    # A third cycle's evaluate run gets the curve over versions 1, 2 and itself, and logging again adds no rows.
    run_id = tracking.begin_cycle(s, "cycle-3")
    third = {
        "checkpoint_uri": "file:///ck/3",
        "slices": ["slice-00001", "slice-00002", "slice-00003"],
        "candidate": {"slice-00001": 6.0, "slice-00002": 5.3, "slice-00003": 4.9},
        "parent": None,
    }
    for _ in range(2):  # a retried task logs twice
        tracking.log_evaluation(s, run_id, third)
    paths = {a.path for a in c.list_artifacts(run_id, "eval")}
    assert {history.PLOT_ARTIFACT, history.TABLE_ARTIFACT, "eval/forgetting.json"} <= paths
    local = Path(c.download_artifacts(run_id, "eval", str(s.home / "dl")))
    assert Image.open(local / "forgetting.png").size[0] > 0
    logged = json.loads((local / "forgetting_history.json").read_text())
    rows = [dict(zip(logged["columns"], row)) for row in logged["data"]]
    assert [r["version"] for r in rows] == ["1", "2", "candidate"]
    assert [r["heldout_loss/slice-00001"] for r in rows] == [5.5, 5.8, 6.0]


def test_cli_history_without_a_registered_model_is_one_line_and_exit_1(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WUDAO_HOME": str(tmp_path / "home")}
    p = subprocess.run([WUDAO, "history", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 1 and p.stdout == ""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: no registered model") and "Traceback" not in p.stderr


@pytest.mark.slow
def test_two_cycles_show_in_history_and_the_forgetting_plot(prefect_harness, s3_settings, demo_dir, monkeypatch):
    from flows.lifelong import lifelong_cycle
    from tests.test_cycle import _as_overrides, _env

    s = s3_settings.model_copy(update={"train": s3_settings.train.model_copy(update={"steps": 2})})
    overrides = {**_as_overrides(s), "eval": {"kg_uri": str(demo_dir / "kg"), "kg_limit": 8, "kg_claim_subjects": 1}}
    env = _env(s)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    results = [lifelong_cycle(source=str(demo_dir / "corpus" / f"slice-0{i}"), overrides=overrides) for i in (1, 2)]
    assert [r["registration"]["model_version"] for r in results] == ["1", "2"]

    cli_env = {
        **env,
        "PATH": "/usr/bin:/bin",
        "HOME": str(s.home),
        "WUDAO_HOME": str(s.home),
        "WUDAO_STORAGE_URI": s.storage_uri,
        "WUDAO_REGISTRY__MODEL_NAME": s.registry.model_name,
    }
    p = subprocess.run([WUDAO, "history", "--json"], capture_output=True, text=True, env=cli_env, timeout=300)
    assert p.returncode == 0, p.stderr
    table = json.loads(p.stdout)
    assert [v["version"] for v in table["versions"]] == ["1", "2"]
    assert set(table["versions"][0]["heldout_loss"]) == {"slice-00001"}
    assert set(table["versions"][1]["heldout_loss"]) == {"slice-00001", "slice-00002"}
    assert table["versions"][1]["kg_p_at_1"] and table["versions"][1]["gate"]["gates"]["old_slices"]["status"] in (
        "passed",
        "failed",
    )
    human = subprocess.run([WUDAO, "history"], capture_output=True, text=True, env=cli_env, timeout=300)
    assert human.returncode == 0 and "slice-00002" in human.stdout and "held-out loss" in human.stdout

    c = MlflowClient(s.mlflow_tracking_uri)
    cycle_run = c.get_run(results[1]["registration"]["mlflow_run_id"])
    assert (
        c.get_experiment(cycle_run.info.experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    )
    evaluate = c.search_runs(
        [cycle_run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{cycle_run.info.run_id}' and attributes.run_name = 'evaluate'",
    )[0]
    assert {history.PLOT_ARTIFACT, history.TABLE_ARTIFACT} <= {
        a.path for a in c.list_artifacts(evaluate.info.run_id, "eval")
    }
