"""`LocalStore`: an object store in a plain folder, with sha256 sidecars under `.meta/` and atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from wudao.storage.base import (
    _CHUNK,
    META_DIR,
    ObjectInfo,
    ObjectStore,
    StorageError,
    sha256_file,
    validate_key,
)


class LocalStore(ObjectStore):
    """A folder. Writes go to a temporary file and are renamed into place, so readers never see partial files."""

    META_DIR = META_DIR

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _meta(self, key: str) -> Path:
        return self.root / self.META_DIR / f"{key}.sha256"

    def _write_atomic(self, path: Path, write) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _put(self, key: str, write, sha: str) -> ObjectInfo:
        path = self._path(key)
        # The checksum goes first: a crash between the two leaves an orphan sidecar, never an unverifiable object.
        self._write_atomic(self._meta(key), lambda f: f.write(sha.encode()))
        self._write_atomic(path, write)
        return self._info(key, path)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, lambda f: f.write(data), hashlib.sha256(data).hexdigest())

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, _CHUNK)

        return self._put(key, copy, sha256_file(Path(path)))

    def _recorded(self, key: str) -> str | None:
        meta = self._meta(key)
        return meta.read_text().strip() if meta.exists() else None

    def _read_all(self, key: str) -> tuple[bytes, str | None]:
        try:
            return self._path(key).read_bytes(), self._recorded(key)
        except FileNotFoundError as e:
            raise StorageError(f"no object {self.url(key)}") from e

    def _download(self, key: str, dest: Path) -> str | None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError as e:
            raise StorageError(f"no object {self.url(key)}") from e
        return self._recorded(key)

    def open_read(self, key: str) -> IO[bytes]:
        return open(self._path(key), "rb")

    def local_path(self, key: str) -> Path:
        """The file behind `key` (reads that need random access use it in place)."""
        return self._path(key)

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(key=key, size=st.st_size, etag=f"{st.st_mtime_ns}-{st.st_size}")

    def _walk(self, prefix: str) -> Iterator[tuple[str, list[str], list[str]]]:
        """os.walk below `prefix` (links not followed), skipping the checksum folder; dirnames sorted in place."""
        base = self.root / prefix.rstrip("/") if prefix else self.root
        start = base if base.is_dir() else base.parent
        for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
            rel_dir = Path(dirpath).relative_to(self.root)
            if rel_dir.parts[:1] == (self.META_DIR,):
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not (rel_dir == Path(".") and d == self.META_DIR))
            yield dirpath, dirnames, filenames

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for dirpath, _, filenames in self._walk(prefix):
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(".") or path.is_symlink():
                    continue  # temporaries of in-flight writes, and links that may point outside the root
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield self._info(key, path)

    def skipped(self, prefix: str = "") -> Iterator[tuple[ObjectInfo, str]]:
        """What `list` leaves out, with why: dot-files (`hidden_file`) and symbolic links to files or folders
        (`skipped_link`, never followed: they may point outside the root). The etag comes from the entry
        itself (lstat), so an ingest can record them as seen and count them once."""
        for dirpath, dirnames, filenames in self._walk(prefix):
            links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
            for name in sorted(links + filenames):
                path = Path(dirpath) / name
                reason = "skipped_link" if path.is_symlink() else "hidden_file" if name.startswith(".") else None
                key = path.relative_to(self.root).as_posix()
                if reason and key.startswith(prefix):
                    st = path.lstat()
                    yield ObjectInfo(key=key, size=0, etag=f"{reason}-{st.st_mtime_ns}-{st.st_size}"), reason

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._meta(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`, and the temporaries (`.name.xxxx`) a write killed mid-way left
        there: `list` never shows them, so nothing else would ever remove them."""
        n = super().delete_prefix(prefix)
        for obj, reason in list(self.skipped(prefix)):
            if reason == "hidden_file":
                (self.root / obj.key).unlink(missing_ok=True)
        return n
