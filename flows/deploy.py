"""Serve the flows as deployments on a Prefect server, and trigger them: what `wudao deploy` and `wudao trigger`
run. For a worker pool (Kubernetes, Docker, process), `prefect deploy --all` with the repository's prefect.yaml
registers the same five deployments; `wudao deploy --setup-only` prepares the server for them.
"""

from __future__ import annotations

import json
from typing import Any

from wudao.config import Settings
from wudao.errors import WudaoError
from wudao.results import StageResult

DEPLOYMENT = "default"
FLOW_NAMES = ("lifelong-cycle", "ingest", "train", "evaluate", "register")


class TriggerError(WudaoError):
    pass


def _flows() -> dict[str, Any]:
    from flows.ingest import ingest_flow
    from flows.lifelong import lifelong_cycle
    from flows.stages import evaluate_flow, register_flow, train_flow

    return {
        "lifelong-cycle": lifelong_cycle,
        "ingest": ingest_flow,
        "train": train_flow,
        "evaluate": evaluate_flow,
        "register": register_flow,
    }


def serve(settings: Settings, *, cron: str | None, source: str | None, limit: int) -> None:
    """Serve every flow as `<flow>/default` (runs until stopped). With `cron`, `lifelong-cycle` also runs on that
    schedule over `source`; each run executes in its own subprocess, at most `limit` at once (trainings still go
    one at a time through the global training slot)."""
    from prefect import serve as prefect_serve

    from flows.common import ensure_server_setup

    ensure_server_setup(settings)
    deployments = []
    for name, flow in _flows().items():
        options: dict[str, Any] = {"description": (flow.description or "").split("\n\n")[0]}
        if name == "lifelong-cycle":
            options["parameters"] = {"source": source} if source else {}
            if cron:
                options["cron"] = cron
        deployments.append(flow.to_deployment(name=DEPLOYMENT, **options))
    prefect_serve(*deployments, limit=limit, print_starting_message=False)


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`k=v` pairs -> parameters; a value is read as JSON when it parses (numbers, lists, objects), else a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TriggerError(f"--param {pair!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def trigger(
    settings: Settings, flow: str, params: dict[str, Any], *, wait: bool, timeout_s: float | None
) -> dict[str, Any]:
    """Create a flow run of a served or deployed flow through the API; with `wait`, follow it to its end and
    return its result (read back from the object store)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = flow if "/" in flow else f"{flow}/{DEPLOYMENT}"
    try:
        run = run_deployment(name, parameters=params, timeout=(timeout_s if wait else 0))
    except ObjectNotFound as e:
        raise TriggerError(
            f"no deployment {name} on {settings.prefect_api_url or 'the Prefect server'}: run `wudao deploy` "
            f"(flows: {', '.join(FLOW_NAMES)})"
        ) from e
    state = run.state
    out: dict[str, Any] = {
        "flow_run_id": str(run.id),
        "flow_run_name": run.name,
        "deployment": name,
        "state": state.type.value if state else None,
        "parameters": params,
    }
    if settings.prefect_api_url:
        out["url"] = f"{settings.prefect_api_url.rstrip('/').removesuffix('/api')}/runs/flow-run/{run.id}"
    if wait and state is not None:
        if state.is_completed():
            result = state.result()
            out["result"] = result.to_dict() if isinstance(result, StageResult) else result
        elif state.is_final():
            raise TriggerError(
                f"flow run {run.name} ({run.id}) ended {state.type.value}: {(state.message or '').strip()}"
            )
        else:
            out["note"] = f"still {state.type.value} after {timeout_s:g} s"
    return out
