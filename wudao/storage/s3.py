"""`S3Store`: an object store in an S3 bucket (AWS, MinIO, SeaweedFS), the sha256 kept in user metadata. It
pickles as its constructor arguments, so ingest workers in other processes rebuild their own boto3 client."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from wudao.storage.base import (
    _CHUNK,
    ObjectInfo,
    ObjectStore,
    StorageError,
    join_key,
    sha256_file,
    validate_key,
)


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
