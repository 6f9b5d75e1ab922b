"""Shared fixtures: one real local stack (SeaweedFS + MLflow + Prefect) per test session, on free loopback ports.

Nothing here mocks S3, MLflow or Prefect: the fixtures start the same servers `wudao stack up` starts.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from wudao import stack
from wudao.config import Settings, StackSettings
from wudao.storage import S3Store


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_stack_settings() -> StackSettings:
    """Ports for one stack: weed needs master..master+3 and each + 10000 (gRPC) free."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    taken: set[int] = set()

    def block(width: int) -> int:
        for _ in range(500):
            base = rng.randint(20000, 50000)
            ports = [base + i for i in range(width)] + [base + i + 10000 for i in range(width)]
            if not taken.intersection(ports) and all(_port_free(p) for p in ports):
                taken.update(ports)
                return base
        raise RuntimeError("no free port block on 127.0.0.1")

    return StackSettings(
        s3_port=block(1), master_port=block(4), mlflow_port=block(1), prefect_port=block(1), start_timeout_s=180
    )


def stack_env(s: Settings, prefect_api_url: str | None) -> dict[str, str]:
    """The environment of a `wudao` subprocess that uses the services of settings `s` (the test's own stack
    settings, nothing inherited from the caller's WUDAO_/AWS_/MLFLOW_/PREFECT_ variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "MLFLOW_", "PREFECT_", "AWS_"))}
    env.update(
        {
            "WUDAO_HOME": str(s.home),
            "WUDAO_STORAGE_URI": s.storage_uri,
            "WUDAO_S3_ENDPOINT_URL": s.s3_endpoint_url,
            "AWS_ACCESS_KEY_ID": s.aws_access_key_id.get_secret_value(),
            "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key.get_secret_value(),
            "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri,
            "PREFECT_API_URL": prefect_api_url or "",
            "WUDAO_REGISTRY__MODEL_NAME": s.registry.model_name,
            "WUDAO_REGISTRY__EXPERIMENT": s.registry.experiment,
        }
    )
    return env


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """A running stack under a temporary home; yields (home, StackSettings)."""
    home = tmp_path_factory.mktemp("stack-home")
    cfg = free_stack_settings()
    stack.up(home, cfg)
    try:
        yield home, cfg
    finally:
        stack.down(home, cfg)


@pytest.fixture
def s3_settings(local_stack, tmp_path) -> Settings:
    """Settings pointing at the session stack, isolated per test (own prefix, catalog, experiment, model)."""
    home, cfg = local_stack
    key_id, secret = stack.read_s3_credentials(home)
    tag = uuid.uuid4().hex[:8]
    return Settings(
        home=tmp_path / "home",
        storage_uri=f"s3://{cfg.bucket}/test-{tag}",
        s3_endpoint_url=f"http://127.0.0.1:{cfg.s3_port}",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        mlflow_tracking_uri=f"http://127.0.0.1:{cfg.mlflow_port}",
        registry={"experiment": f"test-{tag}", "model_name": f"wudao-test-{tag}"},
        train={"steps": 6, "batch_size": 4, "seq_len": 32},
        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    ).resolved()


@pytest.fixture
def s3_store(s3_settings) -> S3Store:
    from wudao.stages import platform_store

    return platform_store(s3_settings)


@pytest.fixture
def local_settings(tmp_path) -> Settings:
    """Settings with no servers at all: folder store, SQLite catalog."""
    return Settings(
        home=tmp_path / "home",
        storage_uri=str(tmp_path / "objects"),
        train={"steps": 4, "batch_size": 4, "seq_len": 32},
        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    ).resolved()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from wudao.data.demo import write_demo

    out = tmp_path_factory.mktemp("demo")
    write_demo(out, slices=3, seed=0, images=8)
    return out


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@contextmanager
def postgres_cluster(root: Path, password: str | None = None) -> Iterator[int]:
    """A throwaway PostgreSQL cluster under `root` on a free loopback port (superuser `wudao`); yields the port.
    With `password`, TCP logins need it (scram-sha-256) as on a real server; without, they are trusted. Skips the
    test where no server binaries exist."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (install the postgresql package)")
    data, sock = root / "data", root / "sock"
    sock.mkdir(parents=True)
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as the postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        for parent in root.parents:  # the postgres user must be able to reach `root`
            if not parent.stat().st_mode & stat.S_IXOTH:
                os.chmod(parent, parent.stat().st_mode | stat.S_IXOTH)
    auth = ["--auth=trust"]
    if password is not None:
        pwfile = root / "pwfile"
        pwfile.touch(mode=0o600)
        pwfile.write_text(password + "\n")
        if run_as:
            shutil.chown(pwfile, "postgres")
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
    port = free_port()
    # --no-sync / fsync=off: a throwaway cluster, and fsyncs cost seconds on a shared disk.
    subprocess.run(
        [*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "wudao", *auth, "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    if password is not None:
        pwfile.unlink()
    subprocess.run(
        [
            *run_as,
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(root / "pg.log"),
            "start",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield port
    finally:
        subprocess.run(
            [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A throwaway PostgreSQL cluster on a free loopback port (skipped where no server binaries exist)."""
    if url := os.environ.get("WUDAO_TEST_POSTGRES_URL"):
        yield url
        return
    with postgres_cluster(tmp_path_factory.mktemp("pg")) as port:
        yield f"postgresql+psycopg://wudao@127.0.0.1:{port}/postgres"


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from flows.common import ensure_server_setup

    with prefect_test_harness(server_startup_timeout=180):
        # Flow results go to a throwaway folder store (the block the flows name must exist on the server).
        results = Settings(home=tmp_path_factory.mktemp("harness"), storage_uri=str(tmp_path_factory.mktemp("results")))
        ensure_server_setup(results.resolved())
        yield
