"""Ingest: incremental listing, named quarantine reasons, frozen tokenizer, shards committed by manifest."""

from __future__ import annotations

import gzip
import json

import pytest

from wudao.catalog import QuarantineRecord
from wudao.data.ingest import IngestError
from wudao.stages import catalog, platform_store, run_ingest


def _write_source(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "doc.txt").write_text("The capital of France is Paris. 法国的首都是巴黎。", encoding="utf-8")
    rows = [{"text": f"Document number {i} talks about rivers and mountains."} for i in range(40)]
    rows.append({"text": rows[0]["text"]})  # exact duplicate
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"title": "no text field"}) + "\n")
        f.write(json.dumps({"text": "   "}) + "\n")
    with gzip.open(root / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"压缩文件里的第{i}篇文档。"}) + "\n")
    (root / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xc3\x28")
    (root / "image.png").write_bytes(b"\x89PNG not yet supported here")


def test_ingest_counts_everything_and_is_incremental(local_settings, tmp_path):
    src = tmp_path / "raw"
    _write_source(src)
    report = run_ingest(local_settings, str(src))
    assert report["slice_id"] == "slice-00001"
    assert report["objects_new"] == 4 and report["objects_skipped_unsupported"] == 1
    assert report["documents_accepted"] == 1 + 40 + 10
    assert report["duplicates_exact"] == 1
    assert report["quarantine_reasons"] == {"malformed_json": 1, "missing_text": 1, "empty_text": 1, "not_utf8": 1}
    assert report["quarantined"] == 4
    assert report["tokens"] > 0 and report["shards"] >= 1

    store = platform_store(local_settings)
    manifest = store.read_manifest("slices/slice-00001")
    assert manifest["tokenizer_version"] == report["tokenizer_version"]
    assert sum(s["documents"] for s in manifest["shards"]) == report["documents_accepted"]
    cat = catalog(local_settings)
    with cat.session() as s:
        assert s.query(QuarantineRecord).count() == 4

    again = run_ingest(local_settings, str(src))
    assert again["objects_new"] == 0 and again["slice_id"] is None

    (src / "new.txt").write_text("A new document arrives the next day.")
    (src / "doc.txt").write_text("The capital of Japan is Tokyo.")  # changed object: read again
    third = run_ingest(local_settings, str(src))
    assert third["objects_new"] == 2 and third["slice_id"] == "slice-00002"
    assert third["tokenizer_version"] == report["tokenizer_version"], "the tokenizer is frozen after the first slice"


def test_missing_source_is_a_clear_error(local_settings, tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        run_ingest(local_settings, str(tmp_path / "nowhere"))


def test_ingest_from_s3_source_into_s3(s3_settings, s3_store, tmp_path):
    for i in range(3):
        s3_store.put_bytes(f"raw/part-{i}.jsonl", "\n".join(json.dumps({"text": f"S3 document {i}-{j}."}) for j in range(20)).encode())
    report = run_ingest(s3_settings, f"{s3_store.uri}/raw")
    assert report["objects_new"] == 3 and report["documents_accepted"] == 60
    assert s3_store.read_manifest(f"slices/{report['slice_id']}") is not None
    assert run_ingest(s3_settings, f"{s3_store.uri}/raw")["objects_new"] == 0
