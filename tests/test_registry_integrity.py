"""Versions are whole or absent: a registration carries its wudao.* tags from the moment the version exists, and a
version without them (an older, partial or foreign registration) is refused by name, never a KeyError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from wudao import registry, stages, tracking
from wudao.registry import REQUIRED_TAGS, RegistryError

pytestmark = pytest.mark.slow

WUDAO = str(Path(sys.executable).parent / "wudao")


class Died(BaseException):
    """What a kill -9 right after "Created version" looks like to the code that was to run next."""


def test_a_version_is_born_with_its_tags_and_an_incomplete_one_is_refused(s3_settings, demo_dir, monkeypatch):
    s = s3_settings
    for key, value in {
        "AWS_ACCESS_KEY_ID": s.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key.get_secret_value(),
    }.items():
        monkeypatch.setenv(key, value)
    stages.run_ingest(s, str(demo_dir / "corpus" / "slice-01"))
    trained = stages.run_train(s, None, "scratch")
    evaluation = stages.run_evaluate(s, trained["checkpoint_uri"], None)
    cycle_run = tracking.begin_cycle(s, "cycle-dies-after-version")

    create = MlflowClient.create_model_version

    def create_then_die(self, *args, **kwargs):
        create(self, *args, **kwargs)
        raise Died()  # the process is gone the instant the version exists

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_die)
    with pytest.raises(Died):
        stages_store = stages.platform_store(s)
        registry.register_cycle(
            s, store=stages_store, trained=trained, evaluation=evaluation, parent=None, cycle_run_id=cycle_run
        )
    monkeypatch.undo()
    c = MlflowClient(s.mlflow_tracking_uri)
    (version,) = c.search_model_versions(f"name='{s.registry.model_name}'")
    assert all(version.tags.get(t) for t in REQUIRED_TAGS), "the version exists only with its tags"
    assert version.tags["wudao.checkpoint_uri"] == trained["checkpoint_uri"]

    # A version registered without the platform's tags (by hand, or by an older release killed mid-way).
    bare = c.create_model_version(
        s.registry.model_name, source=version.source, run_id=cycle_run, model_id=version.source.removeprefix("models:/")
    )
    with pytest.raises(RegistryError, match=f"version {bare.version} was not registered completely"):
        registry.promote(s, bare.version)
    env = {
        "WUDAO_HOME": str(s.home),
        "WUDAO_STORAGE_URI": s.storage_uri,
        "WUDAO_S3_ENDPOINT_URL": s.s3_endpoint_url,
        "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri,
        "WUDAO_REGISTRY__MODEL_NAME": s.registry.model_name,
        "WUDAO_REGISTRY__EXPERIMENT": s.registry.experiment,
        "PATH": "/usr/bin:/bin",
    }
    p = subprocess.run([WUDAO, "promote", bare.version], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "not registered completely" in p.stderr
    # If the alias already points at such a version, readers say so instead of failing with KeyError.
    c.set_registered_model_alias(s.registry.model_name, registry.CHAMPION, bare.version)
    with pytest.raises(RegistryError, match="not registered completely"):
        registry.champion(s)
    assert registry.promote(s, version.version)["champion"] == version.version, "a complete version repairs @champion"
    assert registry.champion(s).checkpoint_uri == trained["checkpoint_uri"]
