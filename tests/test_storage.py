"""Object storage round trips on both back ends: a folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os

import pytest

from wudao.storage import ChecksumError, InvalidKeyError, LocalStore, S3Store, StorageError, key_in_store, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    return request.getfixturevalue("s3_store")


def test_bytes_files_listing_and_delete(store, tmp_path):
    store.put_bytes("a/one.txt", b"one")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4096))
    info = store.put_file("a/b/two.bin", src)
    assert info.size == 4096
    store.put_bytes("other/three", b"3")

    assert store.get_bytes("a/one.txt") == b"one"
    assert store.get_file("a/b/two.bin", tmp_path / "out" / "two.bin").read_bytes() == src.read_bytes()
    assert sorted(o.key for o in store.list("a/")) == ["a/b/two.bin", "a/one.txt"]
    assert store.exists("other/three") and not store.exists("missing")
    store.delete("other/three")
    assert not store.exists("other/three")
    assert store.delete_prefix("a/") == 2
    assert list(store.list("a/")) == []


def test_etag_changes_when_object_changes(store):
    first = store.put_bytes("x", b"version one")
    second = store.put_bytes("x", b"version two, longer")
    assert first.etag != second.etag
    assert [o.etag for o in store.list("x")] == [second.etag]


def test_commit_writes_manifest_last_and_uncommitted_sets_are_invisible(store):
    store.put_bytes("sets/s1/part-0", b"data")
    assert store.read_manifest("sets/s1") is None
    uri = store.commit("sets/s1", {"parts": ["part-0"]})
    assert store.read_manifest("sets/s1") == {"parts": ["part-0"]}
    assert key_in_store(store, uri) == "sets/s1"


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "a//b", "a\\b", "", "a/./b", "x\x00y"])
def test_refuses_unsafe_keys(store, key):
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"nope")
    with pytest.raises(InvalidKeyError):
        store.get_bytes(key)


def test_local_checksum_mismatch_is_an_error(tmp_path):
    store = LocalStore(tmp_path / "objects")
    store.put_bytes("k", b"original")
    (tmp_path / "objects" / "k").write_bytes(b"tampered")
    with pytest.raises(ChecksumError):
        store.get_bytes("k")
    with pytest.raises(ChecksumError):
        store.get_file("k", tmp_path / "dest")
    assert not (tmp_path / "dest").exists(), "a failed verification must not leave the file behind"


def test_s3_checksum_mismatch_is_an_error(s3_store):
    s3_store.put_bytes("k", b"original")
    recorded = hashlib.sha256(b"original").hexdigest()
    # Another writer replaces the bytes but the recorded checksum stays: the read must notice.
    s3_store.client.put_object(
        Bucket=s3_store.bucket, Key=s3_store._key("k"), Body=b"tampered", Metadata={"sha256": recorded}
    )
    with pytest.raises(ChecksumError):
        s3_store.get_bytes("k")


def test_s3_multipart_upload_round_trip(s3_settings, tmp_path):
    store = open_store(
        s3_settings.storage_uri,
        endpoint_url=s3_settings.s3_endpoint_url,
        access_key_id=s3_settings.aws_access_key_id.get_secret_value(),
        secret_access_key=s3_settings.aws_secret_access_key.get_secret_value(),
        multipart_threshold=5 * 1024 * 1024,
    )
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024 + 123))
    info = store.put_file("big/blob.bin", big)
    assert "-" in info.etag, "an upload above the threshold is multipart (its ETag has a part count)"
    assert info.size == big.stat().st_size
    out = store.get_file("big/blob.bin", tmp_path / "back.bin")
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()


def test_unreachable_endpoint_is_one_clear_error():
    store = S3Store(
        "s3://bucket", endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b", max_attempts=1
    )
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        store.exists("k")


def test_wrong_credentials_are_named(s3_settings):
    store = S3Store(
        s3_settings.storage_uri,
        endpoint_url=s3_settings.s3_endpoint_url,
        access_key_id="WRONG",
        secret_access_key="wrong",
        max_attempts=1,
    )
    with pytest.raises(StorageError, match="credentials"):
        store.get_bytes("anything")


def test_local_listing_skips_links_out_of_the_root(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "real.txt").write_text("ok")
    (root / "link.txt").symlink_to(outside)
    assert [o.key for o in LocalStore(root).list()] == ["real.txt"]


def test_unsupported_uri_scheme():
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_store("gs://bucket/x")
