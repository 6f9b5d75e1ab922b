"""What the embedded stack leaves on disk, read without starting anything: which services run (pid files under
`$WUDAO_HOME/stack/`), where they answer (`stack.json`) and the generated S3 identity. A leaf module: the settings
tree reads it to default to the running stack (`Settings.resolved`), and `wudao.stack` writes what it reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wudao.config import StackSettings


@dataclass(frozen=True)
class Service:
    """One server of the stack. Code addresses it by role; its program's name names its pid file, its log
    (`logs/<program>.log`) and its entry in `wudao stack status`, so swapping the program is one line here."""

    role: str
    program: str
    marker: str
    """What its command line contains (guards against a recycled pid)."""


OBJECT_STORE = Service("object_store", "seaweedfs", "weed")
TRACKING = Service("tracking", "mlflow", "mlflow")
ORCHESTRATOR = Service("orchestrator", "prefect", "prefect")
SERVICES = (OBJECT_STORE, TRACKING, ORCHESTRATOR)
FLOW_SERVER = Service("flows", "flows", "deploy")
"""`wudao deploy --detach`: the served deployments (not a server of the stack, but started and stopped with it)."""


@dataclass
class Endpoints:
    """Where the running local services answer (None: not running)."""

    s3_endpoint: str | None = None
    mlflow_url: str | None = None
    prefect_api_url: str | None = None


def state_dir(home: Path) -> Path:
    return home / "stack"


def pid_alive(pid: int, marker: str) -> bool:
    """True if `pid` runs and its command line mentions `marker` (guards against a recycled pid)."""
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace")
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False
    return marker in cmdline


def pid_file(home: Path, svc: Service) -> Path:
    return state_dir(home) / f"{svc.program}.pid"


def log_path(home: Path, svc: Service) -> Path:
    return home / "logs" / f"{svc.program}.log"


def running_pid(home: Path, svc: Service) -> int | None:
    try:
        pid = int(pid_file(home, svc).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid, svc.marker) else None


def default_urls(cfg: StackSettings) -> dict[str, str]:
    """Each service's URL by program (as `stack.json` records them)."""
    return {
        OBJECT_STORE.program: f"http://127.0.0.1:{cfg.s3_port}",
        TRACKING.program: f"http://127.0.0.1:{cfg.mlflow_port}",
        ORCHESTRATOR.program: f"http://127.0.0.1:{cfg.prefect_port}/api",
    }


def recorded_urls(home: Path) -> dict[str, str]:
    try:
        return json.loads((state_dir(home) / "stack.json").read_text())["urls"]
    except (FileNotFoundError, KeyError, ValueError):
        return {}


def running_endpoints(home: Path, cfg: StackSettings) -> Endpoints:
    """Endpoints of the services that `stack up` started under `home` and that are still alive."""
    urls = recorded_urls(home) or default_urls(cfg)

    def url(svc: Service) -> str | None:
        return urls.get(svc.program) if running_pid(home, svc) is not None else None

    return Endpoints(s3_endpoint=url(OBJECT_STORE), mlflow_url=url(TRACKING), prefect_api_url=url(ORCHESTRATOR))


def read_s3_credentials(home: Path) -> tuple[str, str]:
    data = json.loads((state_dir(home) / "s3-credentials.json").read_text())
    return data["access_key_id"], data["secret_access_key"]
