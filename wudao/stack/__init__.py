"""The embedded one-machine stack: SeaweedFS (S3), an MLflow server and a Prefect server, all on 127.0.0.1.

State lives under `$WUDAO_HOME/stack/` (pid files, `stack.json` with the endpoints, the generated S3 credentials
with mode 0600) and logs under `$WUDAO_HOME/logs/`. Each service runs in its own process group, so `down` can
stop the whole tree it started (mlflow and weed both spawn children) and nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from wudao.errors import WudaoError
from wudao.stack.state import (
    FLOW_SERVER,
    OBJECT_STORE,
    ORCHESTRATOR,
    SERVICES,
    TRACKING,
    Service,  # noqa: F401
    default_urls,
    log_path,
    pid_alive,
    pid_file,
    read_s3_credentials,
    recorded_urls,
    running_pid,
    state_dir,
)

if TYPE_CHECKING:
    from wudao.config import StackSettings

# weed listens on each HTTP port and on port + 10000 for gRPC; its inner servers take the ports just above master_port.
WEED_OFFSETS = {"volume": 1, "filer": 2, "admin": 3}


class StackError(WudaoError):
    """A service could not be started, reached or stopped; the message says which and where its log is."""


@dataclass
class ServiceStatus:
    name: str
    """The program (`seaweedfs`, `mlflow`, `prefect`)."""
    role: str
    url: str
    running: bool
    healthy: bool
    pid: int | None
    log: str
    started_now: bool = False


@dataclass
class StackStatus:
    home: str
    services: list[ServiceStatus] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(s.healthy for s in self.services)

    def to_dict(self) -> dict:
        return {"home": self.home, "healthy": self.healthy, "services": {s.name: asdict(s) for s in self.services}}


def prepare(home: Path) -> None:
    """The state dir with the stack's S3 identity and the object store's signing keys (each made once, 0600)."""
    state_dir(home).mkdir(parents=True, exist_ok=True)
    _ensure_s3_credentials(home)
    _ensure_weed_security(home)


def _ensure_s3_credentials(home: Path) -> tuple[str, str]:
    """Generate the local S3 identity once; it is only ever kept in 0600 files under the state dir."""
    state = state_dir(home)
    creds = state / "s3-credentials.json"
    if not creds.exists():
        key_id, secret = "WUDAO" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
        _write_private(creds, json.dumps({"access_key_id": key_id, "secret_access_key": secret}))
        identities = {
            "identities": [
                {
                    "name": "wudao",
                    "credentials": [{"accessKey": key_id, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        _write_private(state / "weed-s3.json", json.dumps(identities))
    return read_s3_credentials(home)


WEED_SECURITY = "security.toml"


def _ensure_weed_security(home: Path) -> None:
    """SeaweedFS's own HTTP ports (filer, volume) answer without credentials: anyone on the machine could list,
    read, overwrite and delete the whole bucket past S3's keys. JWT keys in `security.toml` (weed reads it from
    its working directory, the 0600 state dir) make those ports refuse unsigned requests; the S3 gateway, in the
    same process, signs its own. Generated once, kept with the S3 credentials."""
    path = state_dir(home) / WEED_SECURITY
    if path.exists():
        return
    sections = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
    _write_private(path, "".join(f'[{name}]\nkey = "{secrets.token_urlsafe(32)}"\n' for name in sections))


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _commands(home: Path, cfg: StackSettings) -> dict[Service, tuple[list[str], dict[str, str]]]:
    """Command line and extra environment of each service."""
    state = state_dir(home)
    bin_dir = Path(sys.executable).parent
    weed = str(bin_dir / "weed") if (bin_dir / "weed").exists() else "weed"
    key_id, secret = read_s3_credentials(home)
    master = cfg.master_port
    weed_cmd = [
        weed,
        "mini",
        f"-dir={home / 'seaweedfs'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={cfg.s3_port}",
        f"-master.port={master}",
        f"-volume.port={master + WEED_OFFSETS['volume']}",
        f"-filer.port={master + WEED_OFFSETS['filer']}",
        f"-admin.port={master + WEED_OFFSETS['admin']}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-s3.config={state / 'weed-s3.json'}",
        f"-bucket={cfg.bucket}",
    ]
    mlflow_cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(cfg.mlflow_port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{cfg.bucket}/mlflow",
    ]
    mlflow_env = {
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{cfg.s3_port}",
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
    }
    prefect_cmd = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(cfg.prefect_port),
    ]
    prefect_env = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{cfg.prefect_port}/api",
    }
    return {OBJECT_STORE: (weed_cmd, {}), TRACKING: (mlflow_cmd, mlflow_env), ORCHESTRATOR: (prefect_cmd, prefect_env)}


def _healthy(svc: Service, url: str, home: Path, cfg: StackSettings) -> bool:
    try:
        if svc == OBJECT_STORE:
            from wudao.storage import S3Store

            key_id, secret = read_s3_credentials(home)
            store = S3Store(
                f"s3://{cfg.bucket}", endpoint_url=url, access_key_id=key_id, secret_access_key=secret, max_attempts=1
            )
            store.client.head_bucket(Bucket=cfg.bucket)
            return True
        return httpx.get(url + "/health", timeout=2.0).status_code == 200  # mlflow: /health, prefect: /api/health
    except Exception:
        return False


def _ports(svc: Service, cfg: StackSettings) -> dict[int, str]:
    """Every port a service listens on, with the setting that moves it."""
    if svc == TRACKING:
        return {cfg.mlflow_port: "WUDAO_STACK__MLFLOW_PORT"}
    if svc == ORCHESTRATOR:
        return {cfg.prefect_port: "WUDAO_STACK__PREFECT_PORT"}
    ports = {cfg.s3_port: "WUDAO_STACK__S3_PORT", cfg.s3_port + 10000: "WUDAO_STACK__S3_PORT"}
    for offset in (0, *WEED_OFFSETS.values()):
        ports[cfg.master_port + offset] = ports[cfg.master_port + offset + 10000] = "WUDAO_STACK__MASTER_PORT"
    return ports


def _check_ports_free(svc: Service, cfg: StackSettings) -> None:
    import socket

    for port, setting in _ports(svc, cfg).items():
        with socket.socket() as sock:
            # Servers bind with SO_REUSEADDR, so connections of a stopped stack in TIME_WAIT do not block them.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as e:
                raise StackError(
                    f"cannot start {svc.program}: port {port} on 127.0.0.1 is in use (another stack or program); "
                    f"stop it or set {setting}"
                ) from e


def start_service(svc: Service, home: Path, cfg: StackSettings) -> int:
    """Start one service in its own process group (logging to `logs/<program>.log`); returns its pid. Call
    `prepare(home)` once first, and `wait_healthy` after."""
    cmd, extra_env = _commands(home, cfg)[svc]
    log_file = log_path(home, svc)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    (home / "seaweedfs").mkdir(parents=True, exist_ok=True)
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **extra_env}
    with open(log_file, "ab") as log:
        # weed runs in the state dir, where its security.toml is; the others in home.
        cwd = state_dir(home) if svc == OBJECT_STORE else home
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            cwd=cwd,
        )
    pid_file(home, svc).write_text(str(proc.pid))
    return proc.pid


def wait_healthy(svc: Service, home: Path, cfg: StackSettings, pid: int, url: str | None = None) -> None:
    """Until the service answers at `url` (default: its configured URL), or a StackError naming its log."""
    url = url or default_urls(cfg)[svc.program]
    deadline = time.monotonic() + cfg.start_timeout_s
    while time.monotonic() < deadline:
        if _healthy(svc, url, home, cfg):
            return
        if not pid_alive(pid, svc.marker):
            raise StackError(f"{svc.program} exited during start-up: see {log_path(home, svc)}")
        time.sleep(0.5)
    raise StackError(f"{svc.program} not healthy at {url} after {cfg.start_timeout_s:.0f}s: see {log_path(home, svc)}")


def up(home: Path, cfg: StackSettings) -> StackStatus:
    """Start every service that is not already running; a second `up` starts nothing new."""
    home = home.resolve()
    prepare(home)
    recorded = recorded_urls(home)
    urls = default_urls(cfg)
    # A running service keeps the endpoint it was started with, even if the settings changed since.
    for svc in SERVICES:
        if running_pid(home, svc) is not None and svc.program in recorded:
            urls[svc.program] = recorded[svc.program]
    (state_dir(home) / "stack.json").write_text(json.dumps({"urls": urls}, indent=2))

    for svc in SERVICES:  # fail before starting anything when a port is taken
        if running_pid(home, svc) is None:
            _check_ports_free(svc, cfg)
    started: dict[Service, int] = {}
    try:
        # The orchestrator does not depend on the object store: start it first so the two slow start-ups overlap.
        for svc in (ORCHESTRATOR, OBJECT_STORE):
            if running_pid(home, svc) is None:
                started[svc] = start_service(svc, home, cfg)
        if OBJECT_STORE in started:  # tracking proxies its artefacts to the object store
            wait_healthy(OBJECT_STORE, home, cfg, started[OBJECT_STORE], urls[OBJECT_STORE.program])
        if running_pid(home, TRACKING) is None:
            started[TRACKING] = start_service(TRACKING, home, cfg)
        for svc in (TRACKING, ORCHESTRATOR):
            if svc in started:
                wait_healthy(svc, home, cfg, started[svc], urls[svc.program])
    except StackError:
        for svc in started:
            stop_service(home, svc)
        raise
    st = status(home, cfg)
    for s in st.services:
        s.started_now = s.role in {svc.role for svc in started}
    return st


def status(home: Path, cfg: StackSettings) -> StackStatus:
    home = home.resolve()
    urls = recorded_urls(home) or default_urls(cfg)
    result = StackStatus(home=str(home))
    for svc in SERVICES:
        pid = running_pid(home, svc)
        url = urls[svc.program]
        result.services.append(
            ServiceStatus(
                name=svc.program,
                role=svc.role,
                url=url,
                running=pid is not None,
                healthy=pid is not None and _healthy(svc, url, home, cfg),
                pid=pid,
                log=str(log_path(home, svc)),
            )
        )
    return result


def stop_service(home: Path, svc: Service, timeout_s: float = 15.0) -> bool:
    """Stop the service's whole process group (TERM, then KILL after `timeout_s`); False if it was not running."""
    pid = running_pid(home, svc)
    pid_path = pid_file(home, svc)
    if pid is None:
        pid_path.unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid, svc.marker):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # weed ignores SIGTERM for a while; mlflow's workers may linger
    except ProcessLookupError:
        pass
    for _ in range(50):
        if not pid_alive(pid, svc.marker):
            break
        time.sleep(0.1)
    pid_path.unlink(missing_ok=True)
    return True


def start_flow_server(home: Path, cmd: list[str], prefect_api_url: str, timeout_s: float) -> dict:
    """Run `wudao deploy` in the background (pid file + log like the services); returns once its deployments
    are on the server. A second call finds it running and starts nothing."""
    import httpx

    home = home.resolve()
    state_dir(home).mkdir(parents=True, exist_ok=True)
    log_file = log_path(home, FLOW_SERVER)
    pid = running_pid(home, FLOW_SERVER)
    proc = None
    if pid is None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        pid = proc.pid
        pid_file(home, FLOW_SERVER).write_text(str(pid))
    url = f"{prefect_api_url.rstrip('/')}/deployments/name/lifelong-cycle/default"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # Our own child: ask it (its /proc cmdline is not yet the new one right after the fork).
        exited = proc.poll() is not None if proc else not pid_alive(pid, FLOW_SERVER.marker)
        if exited:
            raise StackError(f"`wudao deploy` exited during start-up: see {log_file}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return {
                    "pid": pid,
                    "started_now": proc is not None,
                    "log": str(log_file),
                    "prefect_api_url": prefect_api_url,
                }
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise StackError(f"deployments did not appear on {prefect_api_url} after {timeout_s:.0f}s: see {log_file}")


def down(home: Path, cfg: StackSettings) -> list[str]:
    """Stop the flow server and the services that `up` started under `home` (found by pid file); returns the
    names stopped."""
    home = home.resolve()
    return [svc.program for svc in (FLOW_SERVER, TRACKING, ORCHESTRATOR, OBJECT_STORE) if stop_service(home, svc)]
