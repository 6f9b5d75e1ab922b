"""The production path, run as the README's "Production" section says, on real servers on loopback.

One module fixture: a PostgreSQL cluster of its own (password logins) with the four databases, an MLflow server with
the basic-auth app on PostgreSQL (artefacts proxied to the session's SeaweedFS), a Prefect server on PostgreSQL
behind an API auth string, `prefect deploy --all` from the repository root, a process worker per pool, and one
`lifelong-cycle` triggered through the API over tiny demo data with a tiny model. The README's settings block names
the variables (this module gives them its own values), its commands block runs verbatim in bash.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import _pg_bin, free_port, postgres_cluster

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_MARK, COMMANDS_MARK = "<!-- production:settings", "<!-- production:commands"

PRODUCTION_NAMES = frozenset(
    {
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "WUDAO_S3_ENDPOINT_URL",
        "MLFLOW_S3_ENDPOINT_URL",
        "WUDAO_STORAGE_URI",
        "WUDAO_CATALOG_URL",
        "WUDAO_HOME",
        "WUDAO_CODE_DIR",
        "MLFLOW_HOST",
        "MLFLOW_PORT",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_AUTH_CONFIG_PATH",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "PREFECT_SERVER_API_HOST",
        "PREFECT_SERVER_API_PORT",
        "PREFECT_API_URL",
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_API_AUTH_STRING",
    }
)
"""The variables the README's settings block exports; the fixture sets exactly these (with its own values)."""

TEST_ONLY = {
    "PREFECT_HOME": "tmp",  # Prefect's profile and local state, per test run
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # nothing leaves the machine
    "PREFECT_WORKER_QUERY_SECONDS": "2",  # workers look for runs every 2 s, not 10
    "MLFLOW_WORKERS": "1",  # one uvicorn worker on 2 shared cores
    # A tiny model: the path is under test here, not the learning.
    "WUDAO_TRAIN__STEPS": "4",
    "WUDAO_TRAIN__BATCH_SIZE": "4",
    "WUDAO_TRAIN__SEQ_LEN": "32",
    "WUDAO_MODEL__D_MODEL": "32",
    "WUDAO_MODEL__N_LAYERS": "1",
    "WUDAO_MODEL__N_HEADS": "2",
    "WUDAO_MODEL__MAX_SEQ_LEN": "64",
}
"""What the test adds beyond the README's names: isolation and cost, never a different production setting."""

SCRIPT_TIMEOUT_S = 600
DATABASES = ("catalog", "mlflow", "mlflow_auth", "prefect")


def readme_block(mark: str) -> str:
    """The ```bash block right after the README line starting with `mark`."""
    text = (ROOT / "README.md").read_text()
    assert mark in text, f"README.md lost its {mark} block"
    found = re.match(r"[^\n]*\n```bash\n(.*?)\n```", text.split(mark, 1)[1], re.S)
    assert found, f"no ```bash block after {mark}"
    return found.group(1)


def exported_names(block: str) -> set[str]:
    names: set[str] = set()
    for line in block.splitlines():
        code = re.sub(r"\s#.*$", "", line)
        if code.startswith("export "):
            names |= set(re.findall(r"(?:^export|\s)([A-Z][A-Z0-9_]*)=", code))
    return names


@dataclass
class Production:
    env: dict[str, str]
    home: Path
    trigger: dict
    stdout: str
    stderr: Path
    pg_port: int

    @property
    def prefect_auth(self) -> tuple[str, str]:
        user, _, password = self.env["PREFECT_API_AUTH_STRING"].partition(":")
        return user, password

    @property
    def secrets(self) -> dict[str, str]:
        return {
            name: self.env[name]
            for name in (
                "PGPASSWORD",
                "AWS_SECRET_ACCESS_KEY",
                "MLFLOW_AUTH_ADMIN_PASSWORD",
                "MLFLOW_FLASK_SERVER_SECRET_KEY",
            )
        } | {"prefect auth": self.prefect_auth[1]}

    def prefect(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, self.env["PREFECT_API_URL"] + path, auth=self.prefect_auth, timeout=30, **kwargs)

    def sql(self, database: str, query: str, *params) -> list[tuple]:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.pg_port, user="wudao", password=self.env["PGPASSWORD"], dbname=database
        ) as conn:
            return conn.execute(query, params).fetchall()


def _env(home: Path, pg_port: int, db_password: str, local_stack) -> dict[str, str]:
    from wudao import stack

    stack_home, cfg = local_stack
    key_id, secret = stack.read_s3_credentials(stack_home)
    s3 = f"http://127.0.0.1:{cfg.s3_port}"
    mlflow_port, prefect_port = free_port(), free_port()
    auth_password = secrets.token_urlsafe(16)
    values = {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg_port),
        "PGUSER": "wudao",
        "PGPASSWORD": db_password,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "WUDAO_S3_ENDPOINT_URL": s3,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "WUDAO_STORAGE_URI": f"s3://{cfg.bucket}/prod-{uuid.uuid4().hex[:8]}",
        "WUDAO_CATALOG_URL": "postgresql+psycopg:///catalog",
        "WUDAO_HOME": str(home),
        "WUDAO_CODE_DIR": str(ROOT),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(mlflow_port),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_AUTH_CONFIG_PATH": str(ROOT / "infra" / "mlflow-auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": auth_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": auth_password,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(prefect_port),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
    }
    values["PREFECT_SERVER_API_AUTH_STRING"] = values["PREFECT_API_AUTH_STRING"] = f"admin:{secrets.token_urlsafe(16)}"
    assert set(values) == PRODUCTION_NAMES
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "MLFLOW_", "PREFECT_", "AWS_", "PG"))
    }
    # The venv's `wudao`, `prefect` and `mlflow` first, as after `source .venv/bin/activate`.
    inherited["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{inherited.get('PATH', '')}"
    return {**inherited, **values, **TEST_ONLY, "PREFECT_HOME": str(home / "prefect-home")}


def _stop_group(pgid: int, timeout_s: float = 5.0) -> None:
    """SIGTERM the script's process group (servers, workers, their children), SIGKILL what is left (Prefect's
    workers take their time over a graceful stop; the test is done with them)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.3)


def _logs_tail(home: Path, stderr: Path) -> str:
    parts = [f"--- script stderr\n{stderr.read_text(errors='replace')[-3000:]}"]
    for log in sorted((home / "logs").glob("*.log")):
        parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def production(local_stack, demo_dir, tmp_path_factory):
    for tool, package in (("psql", "postgresql-client"), ("curl", "curl"), ("bash", "bash")):
        if shutil.which(tool) is None:
            pytest.skip(f"the README's production commands need {tool} (apt-get install {package}; .ci/run does)")
    root = tmp_path_factory.mktemp("production")
    home = root / "home"
    db_password = secrets.token_urlsafe(16)
    with postgres_cluster(root / "pg", password=db_password) as pg_port:
        env = _env(home, pg_port, db_password, local_stack)
        _upload_demo_slice(env, demo_dir / "corpus" / "slice-01")
        stderr = root / "script.stderr"
        with open(root / "script.stdout", "wb") as out, open(stderr, "wb") as err:
            script = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", readme_block(COMMANDS_MARK)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        try:
            try:
                rc = script.wait(timeout=SCRIPT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"the README's commands did not finish in {SCRIPT_TIMEOUT_S} s\n{_logs_tail(home, stderr)}"
                ) from None
            stdout = (root / "script.stdout").read_text()
            assert rc == 0, f"the README's commands failed (exit {rc})\n{_logs_tail(home, stderr)}"
            trigger = json.loads(stdout.strip().splitlines()[-1])  # `wudao trigger --json`: the last line
            yield Production(env=env, home=home, trigger=trigger, stdout=stdout, stderr=stderr, pg_port=pg_port)
        finally:
            _stop_group(script.pid)


def _store(env: dict[str, str]):
    from wudao.storage import S3Store

    return S3Store(
        env["WUDAO_STORAGE_URI"],
        endpoint_url=env["WUDAO_S3_ENDPOINT_URL"],
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def _upload_demo_slice(env: dict[str, str], folder: Path) -> None:
    """New objects arrive under the incoming prefix, as a producer would drop them."""
    store = _store(env)
    for path in sorted(folder.iterdir()):
        store.put_file(f"raw/incoming/{path.name}", path)


def test_readme_production_blocks_are_what_the_test_runs():
    """The settings block exports exactly the names the fixture sets; the commands are the issue's production path."""
    assert exported_names(readme_block(SETTINGS_MARK)) == PRODUCTION_NAMES
    assert not PRODUCTION_NAMES & set(TEST_ONLY), "a test-only variable would change a production setting"
    commands = readme_block(COMMANDS_MARK)
    for needle in (
        "psql -q -v ON_ERROR_STOP=1 -d postgres -f infra/postgres-init.sql",
        "mlflow server --app-name basic-auth",
        "--backend-store-uri postgresql+psycopg:///mlflow",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg:///prefect",
        "wudao deploy --setup-only",
        "prefect work-pool create wudao-cpu --type process",
        "prefect work-pool create wudao-gpu --type process",
        "prefect --no-prompt deploy --all",
        "prefect worker start --pool wudao-cpu",
        "prefect worker start --pool wudao-gpu",
        "wudao trigger lifelong-cycle",
    ):
        assert needle in commands, f"README production commands lost: {needle}"
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", commands + readme_block(SETTINGS_MARK)), "no password inside a URL"


@pytest.mark.slow
def test_cycle_runs_on_a_process_worker_of_a_prefect_server_on_postgresql(production):
    run = production.trigger
    assert run["state"] == "COMPLETED" and run["deployment"] == "lifelong-cycle/default", run
    assert run["result"]["status"] == "registered" and run["result"]["ingest"]["objects_new"] == 2
    flow_run = production.prefect("GET", f"/flow_runs/{run['flow_run_id']}").json()
    assert flow_run["work_pool_name"] == "wudao-gpu", "the cycle ran on the pool prefect.yaml names"
    # prefect.yaml's five deployments, on the pools the README's workers serve, both workers online.
    deployments = production.prefect("POST", "/deployments/filter", json={}).json()
    assert {(d["name"], d["work_pool_name"]) for d in deployments} == {
        ("default", "wudao-gpu"),
        ("default", "wudao-cpu"),
    }
    assert len(deployments) == 5 and all(d["job_variables"] == {} for d in deployments)
    for pool in ("wudao-cpu", "wudao-gpu"):
        assert production.prefect("GET", f"/work_pools/{pool}").json()["status"] == "READY", f"no worker polls {pool}"
    # The run lives in the Prefect server's PostgreSQL database, not in a SQLite file.
    assert production.sql("prefect", "SELECT state_type FROM flow_run WHERE id = %s", run["flow_run_id"]) == [
        ("COMPLETED",)
    ]
    assert not list((production.home / "prefect-home").rglob("*.db")), "the Prefect server used SQLite"


@pytest.mark.slow
def test_version_registered_in_mlflow_on_postgresql_read_with_credentials(production, monkeypatch):
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, production.env[name])
    client = MlflowClient(production.env["MLFLOW_TRACKING_URI"])
    registration = production.trigger["result"]["registration"]
    version = client.get_model_version("wudao", registration["model_version"])
    assert version.tags["wudao.prefect_flow_run_id"] == production.trigger["flow_run_id"]
    assert client.get_run(registration["mlflow_run_id"]).info.status == "FINISHED"
    assert production.sql("mlflow", "SELECT name, version FROM model_versions") == [
        ("wudao", int(registration["model_version"]))
    ]
    assert production.sql("mlflow_auth", "SELECT username, is_admin FROM users") == [("admin", True)]
    # The catalog, too, is the PostgreSQL database the settings name.
    assert production.sql("catalog", "SELECT id FROM slices") == [("slice-00001",)]


@pytest.mark.slow
def test_servers_refuse_requests_without_valid_credentials(production):
    mlflow = production.env["MLFLOW_TRACKING_URI"]
    search = f"{mlflow}/api/2.0/mlflow/registered-models/search"
    assert httpx.get(search, timeout=10).status_code == 401
    assert httpx.get(search, auth=("admin", "not-the-password"), timeout=10).status_code == 401
    assert httpx.get(search, auth=("admin", production.env["MLFLOW_TRACKING_PASSWORD"]), timeout=10).status_code == 200
    api = production.env["PREFECT_API_URL"]
    assert httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).status_code == 401
    assert httpx.post(f"{api}/flow_runs/filter", json={}, auth=("admin", "not-it"), timeout=10).status_code == 401
    assert production.prefect("POST", "/flow_runs/filter", json={}).status_code == 200
    # Health stays open for probes (the README's start-up waits use it).
    assert (
        httpx.get(f"{mlflow}/health", timeout=10).status_code
        == httpx.get(f"{api}/health", timeout=10).status_code
        == 200
    )


@pytest.mark.slow
def test_no_secret_in_params_tags_logs_databases_or_objects(production, monkeypatch):
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, production.env[name])
    scanned: dict[str, bytes] = {}
    # MLflow: every run's params and tags, every version's and model's tags.
    client = MlflowClient(production.env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert len(runs) >= 5, "the cycle's run and its four stage runs"
    for r in runs:
        scanned[f"mlflow run {r.info.run_id}"] = json.dumps([r.data.params, r.data.tags]).encode()
    for m in client.search_registered_models():
        scanned[f"mlflow model {m.name}"] = json.dumps(
            [m.tags, [v.tags for v in client.search_model_versions(f"name='{m.name}'")]]
        ).encode()
    # Prefect: every log line of the run and its subflows, as the UI shows them.
    logs, offset = [], 0
    while page := production.prefect("POST", "/logs/filter", json={"offset": offset, "limit": 200}).json():
        logs += page
        offset += len(page)
    assert any("registered version" in line["message"] for line in logs)
    scanned["prefect logs"] = json.dumps(logs).encode()
    # Every server's and worker's log, and what the script printed.
    for path in [*(production.home / "logs").glob("*.log"), production.stderr]:
        scanned[str(path)] = path.read_bytes()
    assert {"mlflow.log", "prefect-server.log", "worker-cpu.log", "worker-gpu.log"} <= {Path(k).name for k in scanned}
    scanned["script stdout"] = production.stdout.encode()
    # The databases themselves (pg_dump of each) and every object the cycle wrote to the store.
    pg_dump = str(_pg_bin() / "pg_dump")
    for db in DATABASES:
        scanned[f"database {db}"] = subprocess.run(
            [pg_dump, "-d", db], env=production.env, capture_output=True, check=True
        ).stdout
    store = _store(production.env)
    for obj in store.list(""):
        scanned[f"s3 {obj.key}"] = store.get_bytes(obj.key)
    assert any(key.startswith("s3 mlflow/") for key in scanned), "MLflow's proxied artefacts are in the store"
    for what, secret in production.secrets.items():
        leaks = [where for where, data in scanned.items() if secret.encode() in data]
        assert not leaks, f"the {what} leaked into {leaks}"
