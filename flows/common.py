"""What every flow shares: settings from the environment plus explicit overrides, and the retry rule."""

from __future__ import annotations

from typing import Any

from wudao.config import Settings, load_settings


def settings_from(overrides: dict[str, Any] | None) -> Settings:
    return load_settings(**(overrides or {}))


def transient(task, task_run, state) -> bool:
    """Retry only failures that a later attempt can fix (an unreachable or throttling service)."""
    from wudao.registry import RegistryError
    from wudao.storage import ChecksumError, StorageError

    try:
        state.result()
    except ChecksumError:
        return False
    except (StorageError, RegistryError, ConnectionError, TimeoutError):
        return True
    except Exception:
        return False
    return False
