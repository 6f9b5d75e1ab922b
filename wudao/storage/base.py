"""What every object store shares: the `ObjectStore` interface (checksummed reads and writes, manifests that
commit a set of objects), the errors it raises, `ObjectInfo`, and the key helpers (`validate_key`, `join_key`,
`sha256_file`)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from wudao.errors import WudaoError

MANIFEST = "manifest.json"
META_DIR = ".meta"
"""Folder of a `LocalStore` that holds the checksum sidecars (reserved: no key may start with it)."""
_CHUNK = 1024 * 1024


class StorageError(WudaoError):
    """A storage operation failed; the message names the object and, where known, the fix."""


class ChecksumError(StorageError):
    """The bytes read do not match the sha256 recorded when they were written."""


class InvalidKeyError(StorageError, ValueError):
    """A key that could escape the store's root (`..`, absolute, backslash, NUL) or is reserved."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    """S3 ETag, or `<mtime_ns>-<size>` for folders: changes whenever the object does."""


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise InvalidKeyError."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidKeyError(f"refused object key {key!r}: keys are relative POSIX paths")
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts) or any(p == "" for p in parts[:-1]):
        raise InvalidKeyError(f"refused object key {key!r}: '.', '..' and empty segments are not allowed")
    if parts[0] == META_DIR:
        raise InvalidKeyError(f"refused object key {key!r}: '{META_DIR}/' is reserved")
    return key


def join_key(*parts: str) -> str:
    return posixpath.join(*[p.strip("/") for p in parts if p])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ObjectStore(ABC):
    """Keys are relative POSIX paths under the store's root (bucket + optional prefix, or a folder)."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    @abstractmethod
    def put_file(self, key: str, path: Path) -> ObjectInfo: ...

    @abstractmethod
    def _read_all(self, key: str) -> tuple[bytes, str | None]:
        """Bytes of the object and the sha256 recorded at write time (None when written by someone else)."""

    @abstractmethod
    def _download(self, key: str, dest: Path) -> str | None:
        """Copy the object to `dest`; return the recorded sha256."""

    @abstractmethod
    def open_read(self, key: str) -> IO[bytes]:
        """A streaming, unverified reader (for raw inputs too large to hold in memory)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{validate_key(key)}"

    def get_bytes(self, key: str) -> bytes:
        data, recorded = self._read_all(validate_key(key))
        if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
            raise ChecksumError(f"checksum mismatch reading {self.url(key)}: the object changed after it was written")
        return data

    def get_file(self, key: str, dest: Path) -> Path:
        """Download to `dest` atomically, verifying the checksum before the file appears."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            recorded = self._download(validate_key(key), tmp)
            if recorded is not None and sha256_file(tmp) != recorded:
                raise ChecksumError(
                    f"checksum mismatch reading {self.url(key)}: the object changed after it was written"
                )
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def put_json(self, key: str, obj: Any) -> ObjectInfo:
        return self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in self.list(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    def commit(self, prefix: str, manifest: dict[str, Any]) -> str:
        """Write `prefix/manifest.json` last: the set under `prefix` is visible only once this returns."""
        key = join_key(prefix, MANIFEST)
        self.put_json(key, manifest)
        return self.url(prefix)

    def read_manifest(self, prefix: str) -> dict[str, Any] | None:
        """The committed manifest under `prefix`, or None when the set was never committed."""
        key = join_key(prefix, MANIFEST)
        return self.get_json(key) if self.exists(key) else None
