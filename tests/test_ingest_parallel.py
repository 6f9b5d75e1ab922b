"""Ingest in worker processes gives the slice one process gives, byte for byte, and dedup stays exact across workers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_ingest import EN_DOC, ZH_DOCS, _en
from wudao.stages import platform_store, run_ingest


def _settings(base, tmp_path: Path, name: str, workers: int):
    ingest = base.ingest.model_copy(
        update={
            "workers": workers,
            "batch_objects": 3,
            "shard_tokens": 3000,
            "vocab_size": 600,
            "tokenizer_sample_bytes": 6000,
        }
    )
    return base.model_copy(
        update={
            "home": tmp_path / name,
            "storage_uri": str(tmp_path / name / "objects"),
            "catalog_url": f"sqlite:///{tmp_path / name / 'catalog.db'}",
            "ingest": ingest,
        }
    )


def _corpus(root: Path, files: int, offset: int = 0) -> None:
    """Several batches of English and Chinese documents (batch_objects=3), with duplicates across files."""
    root.mkdir(parents=True)
    for i in range(files):
        rows = [{"text": f"{_en(offset + i * 40 + j)} It was the {j}th stop of file {i}."} for j in range(20)]
        rows += [{"text": ZH_DOCS[(i + j) % len(ZH_DOCS)] + f"第{offset + i}卷第{j}页。"} for j in range(5)]
        rows.append({"text": _en(offset)})  # the same document in every file: exact duplicates across batches
        (root / f"part-{i:03d}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")


def _slice_files(settings, slice_id: str) -> dict[str, bytes]:
    store = platform_store(settings)
    return {o.key: store.get_bytes(o.key) for o in store.list(f"slices/{slice_id}/")}


def test_two_workers_give_the_slices_one_process_gives(local_settings, tmp_path):
    """First slice (tokenizer trained on its first documents, so early batches come back as text) and second slice
    (tokenizer known, workers tokenize): reports, manifests and every shard byte are the same."""
    _corpus(tmp_path / "day1", 10)
    _corpus(tmp_path / "day2", 10, offset=5000)
    results = {}
    for workers in (1, 2):
        s = _settings(local_settings, tmp_path, f"w{workers}", workers)
        reports = [run_ingest(s, str(tmp_path / day)).to_dict() for day in ("day1", "day2")]
        results[workers] = [(r, _slice_files(s, r["slice_id"])) for r in reports]
    for reports in results.values():
        for r, _ in reports:
            r.pop("manifest_uri")  # names the store's own folder
    for (one, files_one), (two, files_two) in zip(results[1], results[2]):
        assert one == two
        assert files_one.keys() == files_two.keys() and len(files_one) >= 5
        assert files_one == files_two
    first = results[1][0][0]
    assert first["duplicates_exact"] == 9, "one copy of the shared document kept, the other nine counted"
    assert first["shards"] >= 3 and results[1][1][0]["tokens"] > 0


def test_near_duplicates_read_by_different_workers_count_once(local_settings, tmp_path):
    """Two near-copies in different batches (read by different worker processes at the same time): one is kept, the
    other counted as exactly one near duplicate, as in one process."""
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(6):  # batch_objects=3: a.txt..c.txt in one batch, d.txt..f.txt in the next
        (src / f"{'abcdef'[i]}.txt").write_text(_en(100 + i) + " " + _en(200 + i))
    (src / "a.txt").write_text(EN_DOC)
    (src / "f.txt").write_text(EN_DOC.replace("twelfth", "thirteenth"))
    reports = [run_ingest(_settings(local_settings, tmp_path, f"w{w}", w), str(src)) for w in (2, 1)]
    for r in reports:
        assert (r["duplicates_near"], r["duplicates_exact"], r["documents_accepted"]) == (1, 0, 5)


def test_s3_source_is_read_by_worker_processes(s3_settings, tmp_path):
    """Workers rebuild the S3 store from its settings (a boto3 client cannot cross a process boundary)."""
    store = platform_store(s3_settings)
    for i in range(7):
        store.put_bytes(f"raw/doc-{i}.txt", (_en(300 + i) + " " + _en(400 + i)).encode())
    s = s3_settings.model_copy(
        update={"ingest": s3_settings.ingest.model_copy(update={"workers": 2, "batch_objects": 2})}
    )
    report = run_ingest(s, f"{s3_settings.storage_uri}/raw")
    assert report["documents_accepted"] == 7 and report["slice_id"]


def test_default_workers_are_one_per_core_when_memory_allows(local_settings):
    import os

    import psutil

    from wudao.data.ingest import WORKER_MEMORY_BYTES, effective_workers

    assert effective_workers(local_settings.ingest.model_copy(update={"workers": 3})) == 3
    cores = len(os.sched_getaffinity(0))
    default = effective_workers(local_settings.ingest.model_copy(update={"workers": None}))
    assert 1 <= default <= cores
    if psutil.virtual_memory().available >= cores * WORKER_MEMORY_BYTES:
        assert default == cores
