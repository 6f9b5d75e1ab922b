"""Object storage over S3 (boto3) and plain folders behind one interface.

Every write records the object's sha256 (S3 user metadata, or a sidecar under `.meta/` for folders) and every
whole-object read verifies it: a mismatch raises `ChecksumError`, it never returns the wrong bytes. A set of
objects (a slice's shards, a checkpoint) becomes visible to readers only when `commit()` writes its
`manifest.json`, which is always written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from wudao.errors import WudaoError

MANIFEST = "manifest.json"
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
    if parts[0] == LocalStore.META_DIR:
        raise InvalidKeyError(f"refused object key {key!r}: '{LocalStore.META_DIR}/' is reserved")
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


class LocalStore(ObjectStore):
    """A folder. Writes go to a temporary file and are renamed into place, so readers never see partial files."""

    META_DIR = ".meta"

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


class _BodyReader(io.RawIOBase):
    """botocore's StreamingBody as a real raw stream, so gzip and TextIOWrapper can read it incrementally."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


class S3Store(ObjectStore):
    """An S3 bucket (AWS, MinIO, SeaweedFS) with an optional key prefix."""

    SHA_META = "sha256"

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        multipart_threshold: int = 64 * 1024 * 1024,
        max_attempts: int = 5,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not uri.startswith("s3://"):
            raise StorageError(f"not an s3:// URI: {uri}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"no bucket in {uri}")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
            # "standard" retry mode: exponential backoff with jitter on throttling and transient errors.
            config=Config(
                retries={"max_attempts": max_attempts, "mode": "standard"}, connect_timeout=5, read_timeout=60
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=max(multipart_threshold, 5 * 1024 * 1024)
        )
        # What rebuilds this store in another process (ingest workers): a boto3 client itself cannot be pickled.
        self._init_args = {
            "uri": uri,
            "endpoint_url": endpoint_url,
            "access_key_id": access_key_id,
            "secret_access_key": secret_access_key,
            "region": region,
            "multipart_threshold": multipart_threshold,
            "max_attempts": max_attempts,
        }

    def __getstate__(self) -> dict:
        return self._init_args

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key)) if self.prefix else validate_key(key)

    @contextmanager
    def _errors(self, what: str):
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        try:
            yield
        except EndpointConnectionError as e:
            raise StorageError(
                f"cannot reach the S3 endpoint {self.endpoint_url or 'of AWS'} ({what}): start it with "
                "`wudao stack up` or set WUDAO_S3_ENDPOINT_URL"
            ) from e
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                raise StorageError(
                    f"S3 refused the credentials ({code}) for {what}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                ) from e
            if code in ("NoSuchBucket",):
                raise StorageError(
                    f"bucket {self.bucket} does not exist ({what}): run `wudao stack up` or create it"
                ) from e
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageError(f"no object {what}") from e
            raise StorageError(f"S3 error {code} for {what}: {e}") from e
        except BotoCoreError as e:
            raise StorageError(f"S3 error for {what}: {e}") from e

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        with self._errors(f"bucket {self.bucket}"):
            try:
                # head_bucket, not list_buckets: SeaweedFS's ListBuckets can return [] for existing buckets.
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                self.client.create_bucket(Bucket=self.bucket)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._upload(key, io.BytesIO(data), hashlib.sha256(data).hexdigest())

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        with open(path, "rb") as f:
            return self._upload(key, f, sha256_file(Path(path)))

    def _upload(self, key: str, f: IO[bytes], sha: str) -> ObjectInfo:
        with self._errors(self.url(key)):
            # upload_fileobj switches to multipart above the threshold; S3 makes the object visible only when the
            # whole upload completes, so a crash never leaves a partial object behind.
            self.client.upload_fileobj(
                f, self.bucket, self._key(key), ExtraArgs={"Metadata": {self.SHA_META: sha}}, Config=self.transfer
            )
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        return ObjectInfo(key=key, size=head["ContentLength"], etag=head["ETag"].strip('"'))

    def _read_all(self, key: str) -> tuple[bytes, str | None]:
        with self._errors(self.url(key)):
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read(), obj.get("Metadata", {}).get(self.SHA_META)

    def _download(self, key: str, dest: Path) -> str | None:
        with self._errors(self.url(key)):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer)
        return head.get("Metadata", {}).get(self.SHA_META)

    def open_read(self, key: str) -> IO[bytes]:
        with self._errors(self.url(key)):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        return io.BufferedReader(_BodyReader(body), buffer_size=_CHUNK)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = join_key(self.prefix, prefix) if self.prefix else prefix
        if self.prefix and not prefix:
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors(f"listing {self.uri}/{prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(key=obj["Key"][strip:], size=obj["Size"], etag=obj["ETag"].strip('"'))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(self.url(key)):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def delete(self, key: str) -> None:
        with self._errors(self.url(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


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
