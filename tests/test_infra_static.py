"""Static checks of the production files (Docker does not run on these machines, so nothing here builds)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET_WORDS = ("PASSWORD", "SECRET", "AUTH", "ACCESS_KEY")


def _compose() -> dict:
    return yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())


def _env_items(env) -> list[tuple[str, str]]:
    if isinstance(env, dict):
        return [(k, str(v)) for k, v in env.items() if k != "<<"]
    return [tuple(item.split("=", 1)) for item in env or []]


def test_compose_services_build_from_real_files_and_bind_loopback():
    services = _compose()["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker"} <= set(services)
    for name, svc in services.items():
        if "build" in svc:
            dockerfile = (ROOT / "infra" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_has_no_literal_secrets():
    for name, svc in _compose()["services"].items():
        for key, value in _env_items(svc.get("environment")):
            if any(word in key for word in SECRET_WORDS):
                assert value.startswith("${"), f"{name}: {key} must come from the environment"
        assert not re.search(r"://\w+:(?!\$\{)[^@\s]+@", str(svc.get("command", ""))), f"{name}: literal password in a URL"


def test_prefect_yaml_entrypoints_resolve_to_flows():
    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    assert spec["deployments"]
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert flow.name == "lifelong-cycle"
        assert dep.get("concurrency_limit") == 1, "one training at a time"
        for sched in dep.get("schedules", []):
            assert len(sched["cron"].split()) == 5


def test_dockerfiles_run_as_non_root_and_copy_existing_paths():
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        assert text.lstrip().startswith(("FROM", "#")) and "\nFROM " in "\n" + text
        assert re.search(r"^USER (?!root)\S+", text, re.M), f"{dockerfile.name} runs as root"
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            for src in line.split()[:-1]:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
