"""What every flow shares: settings from the environment plus explicit overrides, the retry rule for I/O tasks,
the one-training-at-a-time slot, and the server-side setup the flows expect."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from wudao.config import OrchestrationSettings, Settings, load_settings
from wudao.errors import WudaoError

# The default I/O retry policy (decorators need one at import); flows apply the configured one with `io(task, settings)`.
IO_RETRIES = OrchestrationSettings().io_retries
IO_RETRY_DELAYS_S = OrchestrationSettings().io_retry_delays_s


class TrainingBusy(WudaoError):
    """Another training holds the global training slot and this one was told not to wait."""


def settings_from(overrides: dict[str, Any] | None) -> Settings:
    return load_settings(**(overrides or {}))


def transient(task, task_run, state) -> bool:
    """Retry only failures that a later attempt can fix (an unreachable or throttling service)."""
    from wudao.storage import ChecksumError, StorageError
    from wudao.tracking import is_transient

    try:
        state.result()
    except ChecksumError:
        return False  # corrupted data does not heal by retrying
    except StorageError:
        return True
    except Exception as e:
        return is_transient(e)
    return False


def io(task, settings: Settings):
    """`task` with the configured retry count and backoff (decorators cannot see settings)."""
    o = settings.orchestration
    return task.with_options(retries=o.io_retries, retry_delay_seconds=list(o.io_retry_delays_s))


def ensure_training_limit(settings: Settings) -> None:
    """Create the global concurrency limit (1 slot) if the server lacks it; an existing one is left as set."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(settings.orchestration.training_limit)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=settings.orchestration.training_limit, limit=1)
                )
            except ObjectAlreadyExists:  # created by a concurrent flow in between
                pass


@contextmanager
def training_slot(settings: Settings) -> Iterator[float]:
    """Hold the global training slot while inside; yields the seconds spent waiting for it.

    Every training (a cycle's or a standalone `train` flow's) goes through here, so two triggers never train at
    once on one Prefect server, whichever worker or process runs them.
    """
    from prefect.concurrency.sync import concurrency

    o = settings.orchestration
    ensure_training_limit(settings)
    timeout = 1.0 if o.when_busy == "refuse" else o.busy_timeout_s
    started = time.monotonic()
    held = ExitStack()
    try:
        # The lease is what frees the slot when its holder is killed: the server takes it back once the holder
        # stops renewing it (Prefect's minimum, 60 s, unless set longer).
        held.enter_context(
            concurrency(o.training_limit, occupy=1, timeout_seconds=timeout, strict=True, lease_duration=o.slot_lease_s)
        )
    except TimeoutError as e:
        waited = (
            f"after waiting {o.busy_timeout_s:g} s" if o.when_busy == "wait" else "(orchestration.when_busy = refuse)"
        )
        raise TrainingBusy(f"another training holds the global slot {o.training_limit!r} {waited}") from e
    with held:
        yield time.monotonic() - started


def mark_crashed(flow_run_ids: list[str], why: str) -> list[str]:
    """Set these Prefect flow runs CRASHED when they are still RUNNING (their process is known to be dead);
    returns the ids that were changed."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    changed = []
    with get_client(sync_client=True) as client:
        for run_id in flow_run_ids:
            try:
                run = client.read_flow_run(UUID(run_id))
            except (ObjectNotFound, ValueError):
                continue
            if run.state is not None and run.state.is_running():
                client.set_flow_run_state(run.id, Crashed(message=why), force=True)
                changed.append(run_id)
    return changed


def ensure_server_setup(settings: Settings) -> dict[str, str]:
    """What the flows need on the Prefect server: the training limit and the result-storage block."""
    from flows.results import ensure_result_storage

    ensure_training_limit(settings)
    return {"training_limit": settings.orchestration.training_limit, "result_storage": ensure_result_storage(settings)}
