"""Static checks of the production files (no Docker daemon here, so nothing builds: test_infra_tools.py runs
Compose's loader, hadolint and the Kubernetes worker's template code, test_production.py the production path itself)."""

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
        assert not re.search(r"://\w+:(?!\$\$?\{)[^@\s]+@", str(svc.get("command", ""))), (
            f"{name}: literal password in a URL"
        )


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
    # No job variables: they would have to be valid for the process and the Kubernetes pool alike.
    assert not any(dep["work_pool"].get("job_variables") for dep in spec["deployments"])
    # Flow runs start in $WUDAO_CODE_DIR, read on the worker; its default is where the images keep the code.
    shell, chdir = (next(iter(step.values())) for step in spec["pull"])
    default = re.fullmatch(r'echo "\$\{WUDAO_CODE_DIR:-(\S+)\}"', shell["script"]).group(1)
    assert chdir["directory"] == "{{ " + shell["id"] + ".stdout }}"
    for dockerfile in ("worker", "trainer"):
        assert f"WORKDIR {default}\n" in (ROOT / "docker" / f"{dockerfile}.Dockerfile").read_text()


def test_compose_databases_exist_and_services_are_wired():
    services = _compose()["services"]
    created = set(re.findall(r"CREATE DATABASE (\w+);", (ROOT / "infra" / "postgres-init.sql").read_text()))
    assert created == {"catalog", "mlflow", "mlflow_auth", "prefect"}, "separate databases per owner"
    # Database URLs name only the database; the server and login are libpq's PGHOST/PGUSER/PGPASSWORD.
    used = set(
        re.findall(
            r"postgresql\+\w+:///(\w+)", yaml.safe_dump(services) + (ROOT / "infra" / "mlflow-auth.ini").read_text()
        )
    )
    assert used == created, f"databases used {used} vs created {created}"
    for name, svc in services.items():
        if re.search(r"postgresql\+\w+:///", yaml.safe_dump(svc)):
            assert svc["environment"]["PGHOST"] == "postgres" and svc["environment"]["PGPASSWORD"].startswith("${"), (
                name
            )
    assert "--app-name basic-auth" in " ".join(services["mlflow"]["command"])
    assert services["mlflow"]["environment"]["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    gpu = services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and services["trainer"]["environment"]["WUDAO_TRAIN__LAUNCHER"] == "torchrun"
    # Every worker reaches the servers by service name, with the same auth the servers expect.
    for name in ("worker", "trainer"):
        env = dict(_env_items(services[name]["environment"]))
        assert env["PREFECT_API_URL"].startswith("http://prefect-server:") and env["MLFLOW_TRACKING_URI"].startswith(
            "http://mlflow:"
        )
        assert (
            env["PREFECT_API_AUTH_STRING"]
            == services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
        )
        assert env["MLFLOW_TRACKING_PASSWORD"] == services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    # Pools named in prefect.yaml are the ones the workers serve.
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = {dep["work_pool"]["name"] for dep in spec["deployments"]}
    commands = {n: services[n]["command"] for n in ("worker", "trainer")}
    served = {re.search(r"--pool (\S+)", c if isinstance(c, str) else " ".join(c)).group(1) for c in commands.values()}
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


def test_dockerfiles_pin_their_base_run_as_non_root_and_copy_existing_paths():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        bases = re.findall(r"^FROM (\S+)", text, re.M)
        assert bases, dockerfile.name
        for base in bases:  # a release, e.g. python:3.11.13-slim-bookworm; not `latest`, `3.11-slim` or untagged
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", base), (
                f"{dockerfile.name}: base {base} is not pinned to a release"
            )
        users = re.findall(r"^USER (\S+)", text, re.M)
        # Numeric and not 0: Kubernetes can only check runAsNonRoot against a numeric user.
        assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0, (
            f"{dockerfile.name} runs as root"
        )
        for pin in re.findall(r'"((?:mlflow|psycopg|boto3)\S*?[<>=][^"]+)"', text):
            assert f'"{pin}"' in pyproject, f"{dockerfile.name}: {pin} differs from pyproject.toml's bounds"
        if dockerfile.stem in ("worker", "trainer"):
            assert re.search(r'pip install .*"\.\[prod[,\]]', text), f"{dockerfile.name} must install the prod extra"
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            for src in line.split()[:-1]:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
