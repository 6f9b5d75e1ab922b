"""Prefect result storage in the platform object store, so a flow's and its tasks' results outlive the worker.

The block holds where the store is (URI, endpoint, key prefix) but no credentials: those come from the environment
of whoever reads or writes (AWS_* / secret files / the local stack), so no secret is stored in Prefect's database.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem

from wudao.storage import join_key


@lru_cache(maxsize=8)
def _store(storage_uri: str, endpoint: str | None):
    from wudao.config import load_settings
    from wudao.stages import platform_store

    return platform_store(load_settings(storage_uri=storage_uri, s3_endpoint_url=endpoint))


class ObjectStoreResults(WritableFileSystem):
    """Flow and task results as objects under `prefix/` of the platform store (checksummed like every object)."""

    _block_type_name = "WuDao Object Store Results"
    _block_type_slug = "wudao-object-store-results"

    storage_uri: str
    """The platform store (`s3://bucket[/prefix]` or a folder)."""
    s3_endpoint_url: str | None = None
    prefix: str = "prefect-results"

    def _resolve_path(self, path: str) -> Path:
        # Prefect makes result keys relative to this; keys are plain names, so the root is empty.
        return Path(path)

    def _key(self, path: str) -> str:
        return join_key(self.prefix, str(path))

    async def aread_path(self, path: str) -> bytes:
        return _store(self.storage_uri, self.s3_endpoint_url).get_bytes(self._key(path))

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return _store(self.storage_uri, self.s3_endpoint_url).get_bytes(self._key(path))

    async def awrite_path(self, path: str, content: bytes) -> str:
        _store(self.storage_uri, self.s3_endpoint_url).put_bytes(self._key(path), content)
        return path

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        _store(self.storage_uri, self.s3_endpoint_url).put_bytes(self._key(path), content)
        return path


BLOCK_NAME = "wudao"
RESULTS = f"{ObjectStoreResults._block_type_slug}/{BLOCK_NAME}"
"""What flows and tasks name as their `result_storage`; `ensure_result_storage` creates it on the server."""

PERSIST = {"persist_result": True, "result_storage": RESULTS, "result_serializer": "json"}
"""Flow/task options: results persisted as JSON (never pickle: results are read back by other processes)."""


def ensure_result_storage(settings) -> str:
    """Create (or update) the result-storage block on the current Prefect server; idempotent."""
    ObjectStoreResults(
        storage_uri=settings.storage_uri,
        s3_endpoint_url=settings.s3_endpoint_url,
        prefix=settings.orchestration.result_prefix,
    ).save(BLOCK_NAME, overwrite=True)
    return RESULTS
