"""Object storage over S3 (boto3) and plain folders behind one interface.

Every write records the object's sha256 (S3 user metadata, or a sidecar under `.meta/` for folders) and every
whole-object read verifies it: a mismatch raises `ChecksumError`, it never returns the wrong bytes. A set of
objects (a slice's shards, a checkpoint) becomes visible to readers only when `commit()` writes its
`manifest.json`, which is always written last.

The interface and its helpers live in `base`, the two stores in `local` and `s3`; this module opens the
right one for a URI (`open_store`, `store_from_settings`) and re-exports every public name.
"""

from __future__ import annotations

from typing import Any

from wudao.storage.base import (
    MANIFEST,
    ChecksumError,
    InvalidKeyError,
    ObjectInfo,
    ObjectStore,
    StorageError,
    join_key,
    sha256_file,
    validate_key,
)
from wudao.storage.local import LocalStore
from wudao.storage.s3 import S3Store

__all__ = [
    "MANIFEST",
    "ChecksumError",
    "InvalidKeyError",
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "join_key",
    "key_in_store",
    "open_store",
    "sha256_file",
    "store_from_settings",
    "validate_key",
]


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region: str = "us-east-1",
    **kwargs: Any,
) -> ObjectStore:
    """An `S3Store` for `s3://…`, else a `LocalStore` for a folder path (or `file://` URI)."""
    if uri.startswith("s3://"):
        return S3Store(
            uri,
            endpoint_url=endpoint_url,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            region=region,
            **kwargs,
        )
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported storage URI {uri!r}: use s3://bucket[/prefix] or a local folder")
    return LocalStore(uri.removeprefix("file://"))


def store_from_settings(settings, uri: str | None = None) -> ObjectStore:
    """The store at `uri` (default: the platform's own storage) with the settings' endpoint and credentials."""

    def secret(value):
        return value.get_secret_value() if value is not None else None

    return open_store(
        uri or settings.storage_uri,
        endpoint_url=settings.s3_endpoint_url,
        access_key_id=secret(settings.aws_access_key_id),
        secret_access_key=secret(settings.aws_secret_access_key),
        region=settings.aws_region,
    )


def key_in_store(store: ObjectStore, uri: str) -> str | None:
    """The key of `uri` inside `store`, or None when `uri` points elsewhere."""
    root = store.uri.rstrip("/") + "/"
    return validate_key(uri[len(root) :]) if uri.startswith(root) else None
