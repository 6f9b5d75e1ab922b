"""The settings tree: defaults, wudao.toml, WUDAO_* and standard env vars, and secrets kept out of sight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from wudao.config import Settings
from wudao.model.glm import GLMModel
from wudao.model.moe import MoE
from wudao.train.loop import model_config

WUDAO = str(Path(sys.executable).parent / "wudao")


def test_defaults_resolve_to_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("WUDAO_HOME", "WUDAO_STORAGE_URI", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(var, raising=False)
    s = Settings().resolved()
    assert s.home == tmp_path / ".wudao"
    assert s.storage_uri == str(tmp_path / ".wudao" / "objects")
    assert s.catalog_url == f"sqlite:///{tmp_path / '.wudao' / 'catalog.db'}"
    assert s.mlflow_tracking_uri.startswith("sqlite:///")


def test_env_and_toml_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wudao.toml").write_text('storage_uri = "s3://from-toml"\n[train]\nsteps = 11\nlr = 0.5\n')
    monkeypatch.setenv("WUDAO_TRAIN__STEPS", "22")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8999")
    s = Settings()
    assert s.storage_uri == "s3://from-toml"
    assert s.train.steps == 22, "env beats the file"
    assert s.train.lr == 0.5, "the file beats defaults"
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5999"
    assert s.s3_endpoint_url == "http://127.0.0.1:8999"


def test_secrets_never_printed(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRET")
    s = Settings()
    assert s.aws_secret_access_key.get_secret_value() == "very-secret-value"
    text = repr(s) + str(s) + str(s.public_dict())
    assert "very-secret-value" not in text and "AKIDSECRET" not in text


def test_moe_settings_reach_every_moe_layer(monkeypatch):
    monkeypatch.setenv("WUDAO_MODEL__CAPACITY_FACTOR", "1.25")
    monkeypatch.setenv("WUDAO_MODEL__EVAL_CAPACITY_FACTOR", "2.5")
    monkeypatch.setenv("WUDAO_MODEL__ROUTER_JITTER", "0.01")
    s = Settings()
    moes = [m for m in GLMModel(model_config(s.model, vocab_size=64, seq_len=32)).modules() if isinstance(m, MoE)]
    assert moes and all((m.capacity_factor, m.eval_capacity_factor, m.router_jitter) == (1.25, 2.5, 0.01) for m in moes)
    monkeypatch.setenv("WUDAO_MODEL__ROUTER_JITTER", "1.5")
    with pytest.raises(pydantic.ValidationError, match="router_jitter"):
        Settings()


def test_passwords_inside_urls_are_masked_wherever_settings_are_shown(tmp_path, monkeypatch):
    from wudao.config import hide_password

    assert (
        hide_password("postgresql+psycopg://wudao:pg-s3cret@db:5432/wudao")
        == "postgresql+psycopg://wudao:***@db:5432/wudao"
    )
    assert hide_password("http://admin:p@ss:w@127.0.0.1:5000/") == "http://admin:***@127.0.0.1:5000/"
    for unchanged in ("sqlite:////tmp/catalog.db", "s3://bucket/prefix", "http://user@host/", "/a/b:c@d", "plain"):
        assert hide_password(unchanged) == unchanged
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "MLFLOW_", "AWS_", "PREFECT_"))}
    env.update(
        WUDAO_HOME=str(tmp_path),
        WUDAO_CATALOG_URL="postgresql+psycopg://wudao:pg-s3cret@127.0.0.1:5432/wudao",
        MLFLOW_TRACKING_URI="http://admin:ml-s3cret@127.0.0.1:5999",
    )
    for args in (["config"], ["config", "--json"]):
        p = subprocess.run([WUDAO, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert "s3cret" not in p.stdout + p.stderr and "wudao:***@127.0.0.1" in p.stdout
    monkeypatch.setenv("WUDAO_CATALOG_URL", env["WUDAO_CATALOG_URL"])
    assert "pg-s3cret" not in json.dumps(Settings().public_dict()), "MLflow params come from public_dict"
