"""Static checks of the production files (Docker does not run on these machines, so nothing here builds)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET_WORDS = ("PASSWORD", "SECRET", "AUTH_STRING", "ACCESS_KEY")


def _is_secret(name: str) -> bool:
    return any(word in name for word in SECRET_WORDS)


def _compose() -> dict:
    return yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())


def _env_items(env) -> list[tuple[str, str]]:
    if isinstance(env, dict):
        return [(k, str(v)) for k, v in env.items() if k != "<<"]
    return [tuple(item.split("=", 1)) for item in env or []]


def test_compose_services_build_from_real_files_and_bind_loopback():
    services = _compose()["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker", "trainer"} <= set(services)
    for name, svc in services.items():
        if "build" in svc:
            dockerfile = (ROOT / "infra" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_has_no_literal_secrets():
    for name, svc in _compose()["services"].items():
        for key, value in _env_items(svc.get("environment")):
            if _is_secret(key):
                assert value.startswith("${"), f"{name}: {key} must come from the environment"
        assert not re.search(r"://\w+:(?!\$\$?\{)[^@\s]+@", str(svc.get("command", ""))), f"{name}: literal password in a URL"


def test_prefect_yaml_deploys_every_flow_under_the_names_wudao_trigger_uses():
    assert (ROOT / "infra" / "prefect.yaml").resolve() == (ROOT / "prefect.yaml").resolve()
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployed = {}
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        deployed[getattr(module, func).name] = dep
        assert dep["name"] == "default", "wudao trigger FLOW means FLOW/default"
        assert dep["work_pool"]["name"] in ("wudao-cpu", "wudao-gpu")
        for sched in dep.get("schedules", []):
            assert len(sched["cron"].split()) == 5
    from flows.deploy import FLOW_NAMES

    assert set(deployed) == set(FLOW_NAMES)
    assert deployed["lifelong-cycle"]["schedules"], "the cycle runs on a schedule"
    assert deployed["train"]["work_pool"]["name"] == deployed["lifelong-cycle"]["work_pool"]["name"] == "wudao-gpu"


def test_compose_databases_exist_and_services_are_wired():
    services = _compose()["services"]
    created = set(re.findall(r"CREATE DATABASE (\w+);", (ROOT / "infra" / "postgres-init.sql").read_text()))
    assert created == {"catalog", "mlflow", "mlflow_auth", "prefect"}, "separate databases per owner"
    used = set()
    for svc in services.values():
        text = yaml.safe_dump(svc)
        used |= set(re.findall(r"@postgres/(\w+)", text))
    assert used == created, f"databases used {used} vs created {created}"
    assert "--app-name basic-auth" in " ".join(services["mlflow"]["command"])
    assert services["mlflow"]["environment"]["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    gpu = services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and services["trainer"]["environment"]["WUDAO_TRAIN__LAUNCHER"] == "torchrun"
    # Every worker reaches the servers by service name, with the same auth the servers expect.
    for name in ("worker", "trainer"):
        env = dict(_env_items(services[name]["environment"]))
        assert env["PREFECT_API_URL"].startswith("http://prefect-server:") and env["MLFLOW_TRACKING_URI"].startswith("http://mlflow:")
        assert env["PREFECT_API_AUTH_STRING"] == services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
        assert env["MLFLOW_TRACKING_PASSWORD"] == services["mlflow"]["environment"]["MLFLOW_ADMIN_PASSWORD"]
    # Pools named in prefect.yaml are the ones the workers serve.
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = {dep["work_pool"]["name"] for dep in spec["deployments"]}
    served = {re.search(r"--pool (\S+)", " ".join(map(str, [services[n]["command"]]))).group(1) for n in ("worker", "trainer")}
    assert pools == served


def test_k8s_job_template_launches_torchrun_on_the_pod_gpus_without_secrets():
    import json

    template = json.loads((ROOT / "infra" / "k8s" / "gpu-pool.json").read_text())
    job = template["job_configuration"]["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["WUDAO_TRAIN__LAUNCHER"] == "torchrun"
    assert env["WUDAO_TRAIN__NPROC_PER_NODE"] == container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert {"secretRef"} <= {k for ref in container["envFrom"] for k in ref}
    assert not any(_is_secret(name) for name in env), "secrets come from the Secret only"
    variables = template["variables"]["properties"]
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables), f"undeclared variables: {placeholders - set(variables)}"
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dockerfiles_run_as_non_root_and_copy_existing_paths():
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        assert text.lstrip().startswith(("FROM", "#")) and "\nFROM " in "\n" + text
        assert re.search(r"^USER (?!root)\S+", text, re.M), f"{dockerfile.name} runs as root"
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            for src in line.split()[:-1]:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
