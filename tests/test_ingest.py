"""Ingest on real bad input: every quarantine reason, incremental reruns, dedup against earlier slices, a kill -9
mid-slice, and the same results on SQLite and PostgreSQL catalogs."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wudao.catalog import QuarantineRecord
from wudao.data.ingest import IngestError
from wudao.stages import catalog, platform_store, run_ingest

EN_DOC = (
    "The river flows through the old town and the bridge over it was built of stone in the twelfth century. "
    "Every spring the water rises and the market moves up the hill, where the merchants sell bread and cloth."
)
ZH_DOC = "这条河流穿过古老的城镇，河上的石桥建于十二世纪。每年春天河水上涨，集市就搬到山上，商人们在那里卖面包和布匹。"


ZH_DOCS = [
    "北京的秋天天气晴朗，香山的红叶吸引了许多游客前来观赏拍照。",
    "这家小饭馆的饺子皮薄馅大，每天中午门口都排着长长的队伍。",
    "研究人员发现，每天坚持散步半小时可以明显改善睡眠质量。",
    "图书馆新到了一批科幻小说，孩子们放学后争着去借阅。",
    "长江是中国最长的河流，流经多个省份，最后注入东海。",
    "他用了三年时间学习钢琴，终于在毕业晚会上演奏了一首完整的曲子。",
    "春节前夕，火车站里挤满了回家过年的人们，大家脸上都带着笑容。",
    "这座桥建成以后，两岸居民往来只需要十分钟，比以前方便多了。",
    "老师提醒同学们，做实验之前一定要认真阅读安全说明。",
    "夏天的傍晚，湖边的柳树下常常坐着下棋聊天的老人。",
]


def _en(i: int) -> str:
    return f"Story {i}: the traveller number {i} walked along the river for {i + 3} days and wrote about each village in a small book."


def _png(path: Path, size=(32, 24), color=(200, 30, 30)) -> None:
    Image.new("RGB", size, color).save(path)


def build_bad_corpus(root: Path, outside: Path) -> None:
    """One object or record for every quarantine reason, next to good data of every format."""
    root.mkdir(parents=True)
    (root / "good.txt").write_text(EN_DOC + "\nContact: alice@example.com", encoding="utf-8")
    (root / "zh.txt").write_text("漢語" + ZH_DOC, encoding="utf-8")  # traditional chars get converted
    (root / "invalid.txt").write_bytes(b"\xff\xfe broken \xc3\x28 bytes")  # invalid_utf8
    lines = [json.dumps({"text": _en(i)}) for i in range(30)]
    lines += [
        "{not json",
        json.dumps({"title": "no text"}),
        json.dumps({"text": "   "}),  # malformed, missing, empty
        json.dumps({"text": "buy now buy now cheap cheap !!!! $$$ ### ### ###"}),  # low_quality
        json.dumps({"text": _en(0)}),
    ]  # exact duplicate
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(root / "zh.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in ZH_DOCS:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    (root / "broken.jsonl.gz").write_bytes(
        gzip.compress(b"")[:10] + b"\x00garbage that does not inflate"
    )  # corrupt_archive
    pq.write_table(
        pa.table({"text": [_en(100 + i) for i in range(5)] + [None]}), root / "table.parquet"
    )  # + missing_text
    (root / "bad.parquet").write_bytes(b"PAR1 this is not parquet")  # corrupt_archive
    (root / "notes.docx").write_bytes(b"PK\x03\x04")  # unsupported_type
    _png(root / "cat.png")
    (root / "cat.txt").write_text("一只红色的猫 a red cat", encoding="utf-8")
    _png(root / "lonely.png")  # missing_caption
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "broken.txt").write_text("a broken picture")  # corrupt_image (a pair, so it is decoded)
    Image.new("L", (3000, 3000)).save(root / "huge.png")
    (root / "huge.txt").write_text("a very large picture")  # image_too_large (limit set low in the test)
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val").mkdir()
    _png(coco / "val" / "1.png", color=(10, 200, 10))
    (coco / "annotations" / "captions_val.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],  # 2.png: missing_image
                "annotations": [
                    {"id": 1, "image_id": 1, "caption": "a green square"},
                    {"id": 2, "image_id": 2, "caption": "gone"},
                ],
            }
        )
    )
    outside.write_text(EN_DOC.replace("river", "secret"))
    (root / "link.txt").symlink_to(outside)  # never followed


@pytest.fixture
def ingest_settings(local_settings):
    return local_settings.model_copy(
        update={
            "ingest": local_settings.ingest.model_copy(
                update={"image_max_pixels": 1_000_000, "batch_objects": 3, "vocab_size": 600}
            )
        }
    )


def test_bad_corpus_counts_every_reason(ingest_settings, tmp_path):
    src = tmp_path / "raw"
    build_bad_corpus(src, tmp_path / "outside.txt")
    r = run_ingest(ingest_settings, str(src))
    assert r["slice_id"] == "slice-00001"
    assert r["quarantine_reasons"] == {
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_text": 2,
        "empty": 1,
        "low_quality": 1,
        "unsupported_type": 1,
        "corrupt_archive": 2,
        "corrupt_image": 1,
        "image_too_large": 1,
        "missing_image": 1,
        "missing_caption": 1,
        "skipped_link": 1,
    }
    assert r["quarantined"] == sum(r["quarantine_reasons"].values())
    assert r["duplicates_exact"] == 1
    assert r["documents_accepted"] == 2 + 30 + 10 + 5
    assert r["languages"] == {"en": 36, "zh": 11}
    assert r["low_quality_rules"] == {"en_word_count": 1}
    assert r["images_accepted"] == 2 and r["captions"] == 2
    assert r["objects_seen"] == r["objects_new"] == 19, "the symlink is counted (never followed)"

    store = platform_store(ingest_settings)
    manifest = store.read_manifest("slices/slice-00001")
    assert {s["split"] for s in manifest["shards"]} >= {"train", "images"}
    quarantine = store.get_json("slices/slice-00001/quarantine.json")
    assert {(q["key"], q["reason"]) for q in quarantine} >= {
        ("docs.jsonl", "malformed_json"),
        ("notes.docx", "unsupported_type"),
    }
    cat = catalog(ingest_settings)
    with cat.session() as s:
        assert s.query(QuarantineRecord).count() == r["quarantined"]

    tokens = _all_text(store, manifest)
    assert "<EMAIL>" in tokens and "alice@example.com" not in tokens, "PII is scrubbed"
    assert "汉语" in tokens and "漢語" not in tokens, "traditional Chinese becomes simplified"
    assert "secret" not in tokens

    again = run_ingest(ingest_settings, str(src))
    assert again["objects_new"] == 0 and again["slice_id"] is None and again["quarantined"] == 0


def test_hostile_input_is_quarantined_by_name_never_a_crash(ingest_settings, tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "good.txt").write_text(EN_DOC, encoding="utf-8")
    deep = "[" * 200_000 + "]" * 200_000  # json.loads: RecursionError
    lines = [deep, json.dumps({"text": "fine until \ud800 here"}), json.dumps({"text": _en(1)})]
    (src / "hostile.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (src / os.fsdecode(b"name-\xff\xfe.txt")).write_text(EN_DOC.replace("river", "lake"), encoding="utf-8")
    (src / ".DS_Store").write_bytes(b"\x00\x01")
    coco = src / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val").mkdir()
    _png(coco / "val" / "1.png")
    _png(coco / "val" / "one.png", color=(0, 0, 200))
    (coco / "annotations" / "captions_val.json").write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "1.png"},
                    {"id": "one", "file_name": "one.png"},
                    {"id": 3, "file_name": 3},
                ],
                "annotations": [
                    {"image_id": 1, "caption": "a red square"},
                    {"image_id": "one", "caption": "a blue square"},
                    {"image_id": 1, "caption": "bad \ud800 caption"},
                ],
            }
        )
    )  # mixed id types, a file name that is not a string, a lone surrogate
    (src / "deep" / "annotations").mkdir(parents=True)
    (src / "deep" / "annotations" / "captions_val.json").write_text(deep)

    r = run_ingest(ingest_settings, str(src))
    assert r["slice_id"] == "slice-00001" and r["images_accepted"] == 2
    assert r["quarantine_reasons"] == {"malformed_json": 3, "invalid_unicode": 2, "invalid_name": 1, "hidden_file": 1}
    assert r["documents_accepted"] == 2
    with catalog(ingest_settings).session() as s:
        assert s.query(QuarantineRecord).count() == r["quarantined"] == 7
        names = {q.object_key for q in s.query(QuarantineRecord).filter_by(reason="invalid_name")}
    assert names == {"name-\\udcff\\udcfe.txt"}, "the bad bytes are named, not lost"
    again = run_ingest(ingest_settings, str(src))
    assert again["slice_id"] is None and again["objects_new"] == 0
    assert again["quarantine_reasons"] == {"invalid_name": 1}, "a name that cannot be stored is reported every time"


def _all_text(store, manifest) -> str:
    import numpy as np

    from wudao.data.tokenizer import load_tokenizer, tokenizer_key

    tok = load_tokenizer(store.get_bytes(tokenizer_key(manifest["tokenizer_version"])))
    parts = []
    for shard in manifest["shards"]:
        if shard["split"] in ("train", "heldout"):
            ids = np.frombuffer(
                store.get_bytes(f"slices/{manifest['slice_id']}/{shard['name']}.bin"), dtype=manifest["dtype"]
            )
            parts.append(tok.decode(ids.tolist(), skip_special_tokens=False))
    return "".join(parts)


def test_near_duplicate_of_an_earlier_slice_is_caught(local_settings, tmp_path):
    first, second = tmp_path / "day1", tmp_path / "day2"
    first.mkdir()
    second.mkdir()
    (first / "a.txt").write_text(EN_DOC)
    (first / "b.txt").write_text(ZH_DOC)
    (second / "a-copy.txt").write_text(EN_DOC.replace("twelfth", "thirteenth"))  # one word changed
    (second / "b-copy.txt").write_text(ZH_DOC.replace("面包", "馒头"))
    (second / "fresh.txt").write_text(_en(7) + " " + _en(8))
    r1 = run_ingest(local_settings, str(first))
    r2 = run_ingest(local_settings, str(second))
    assert r1["documents_accepted"] == 2
    assert r2["duplicates_near"] == 2 and r2["documents_accepted"] == 1


def test_changed_object_is_read_again(local_settings, tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "doc.txt").write_text(EN_DOC)
    run_ingest(local_settings, str(src))
    time.sleep(0.01)
    (src / "doc.txt").write_text(_en(1) + " " + _en(2))
    r = run_ingest(local_settings, str(src))
    assert r["objects_new"] == 1 and r["documents_accepted"] == 1


def test_missing_source_and_bad_slice_name(local_settings, tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        run_ingest(local_settings, str(tmp_path / "nowhere"))
    (tmp_path / "raw").mkdir()
    with pytest.raises(IngestError, match="invalid slice name"):
        run_ingest(local_settings, str(tmp_path / "raw"), slice_name="../x")


def _big_source(root: Path, files: int = 120) -> None:
    root.mkdir(parents=True)
    for i in range(files):
        rows = [json.dumps({"text": f"{_en(i * 50 + j)} Chapter {j} of file {i} ends here."}) for j in range(25)]
        (root / f"part-{i:04d}.jsonl").write_text("\n".join(rows) + "\n")


def _env(home: Path, objects: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "AWS_"))}
    env.update(
        {
            "WUDAO_HOME": str(home),
            "WUDAO_STORAGE_URI": str(objects),
            "WUDAO_INGEST__BATCH_OBJECTS": "2",
            "WUDAO_INGEST__SHARD_TOKENS": "2000",
            "WUDAO_INGEST__TOKENIZER_SAMPLE_BYTES": "20000",
            "WUDAO_INGEST__VOCAB_SIZE": "600",
        }
    )
    return env


def test_kill_9_mid_slice_then_rerun_gives_the_same_slice(tmp_path):
    src = tmp_path / "raw"
    _big_source(src)
    wudao = str(Path(sys.executable).parent / "wudao")
    crashed_objects = tmp_path / "crashed-objects"
    env = _env(tmp_path / "crashed-home", crashed_objects)
    proc = subprocess.Popen(
        [wudao, "ingest", str(src), "--json"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shard_dir = crashed_objects / "slices" / "slice-00001"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (shard_dir.exists() and len(list(shard_dir.glob("train-*.bin"))) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (shard_dir / "train-00000.bin").exists(), "the kill came after some shards were uploaded"
    assert not (shard_dir / "manifest.json").exists(), "nothing is visible before the commit"

    rerun = subprocess.run([wudao, "ingest", str(src), "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    clean_env = _env(tmp_path / "clean-home", tmp_path / "clean-objects")
    clean = subprocess.run(
        [wudao, "ingest", str(src), "--json"], env=clean_env, capture_output=True, text=True, timeout=300
    )
    a, b = json.loads(rerun.stdout), json.loads(clean.stdout)
    assert a["slice_id"] == b["slice_id"] == "slice-00001"
    assert a["objects_new"] == b["objects_new"] == 120
    manifest_a = json.loads((shard_dir / "manifest.json").read_text())
    manifest_b = json.loads((tmp_path / "clean-objects" / "slices" / "slice-00001" / "manifest.json").read_text())
    manifest_a.pop("source"), manifest_b.pop("source")
    assert manifest_a == manifest_b, "the rerun finishes the same slice with the same content"


def test_sqlite_and_postgresql_catalogs_agree(local_settings, postgres_url, tmp_path):
    from sqlalchemy import create_engine, text

    src = tmp_path / "raw"
    build_bad_corpus(src, tmp_path / "outside.txt")
    db = f"wudao_ingest_{os.getpid()}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {db}"))
    admin.dispose()
    pg = local_settings.model_copy(
        update={"catalog_url": postgres_url.rsplit("/", 1)[0] + f"/{db}", "storage_uri": str(tmp_path / "pg-objects")}
    )
    from wudao.catalog import upgrade

    upgrade(pg.catalog_url)
    reports = [run_ingest(s, str(src)).to_dict() for s in (local_settings, pg)]
    for r in reports:
        r.pop("manifest_uri")
    assert reports[0] == reports[1]


def test_text_without_letters_is_other_language_every_time():
    """lingua scores letterless text 0 for every language, in an arbitrary order: it must not become zh or en."""
    from wudao.config import CleanSettings
    from wudao.data.clean import Cleaner

    cleaner = Cleaner(CleanSettings())
    assert cleaner.languages(["...", "!!", "#### ....", "12345"]) == ["other"] * 4
    assert cleaner.languages([EN_DOC, ZH_DOC]) == ["en", "zh"]


def _fresh_pg_db(postgres_url: str, name: str) -> str:
    from sqlalchemy import create_engine, text

    from wudao.catalog import upgrade

    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    return url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_ingests_of_different_sources_at_once_both_land_whole(backend, tmp_path, request):
    """Two ingests started together: one waits for the other (catalog lock); both slices are whole and each
    holds its own source's text (before, they shared a slice id and one overwrote the other's shards)."""
    words = {"a": "amber", "b": "cobalt"}
    texts = {
        "a": lambda i: f"{_en(i)} The amber lantern number {i} glowed all night.",
        "b": lambda i: (
            f"Report {i}: the cobalt engineers measured {i * 7 + 3} bridges across the northern valley, "
            f"and every crossing went into ledger {i}."
        ),
    }
    for name in words:
        (tmp_path / name).mkdir()
        rows = [json.dumps({"text": texts[name](i)}) for i in range(60)]
        (tmp_path / name / "docs.jsonl").write_text("\n".join(rows) + "\n")
    env = _env(tmp_path / "home", tmp_path / "objects")
    if backend == "postgresql":
        env["WUDAO_CATALOG_URL"] = _fresh_pg_db(request.getfixturevalue("postgres_url"), f"wudao_race_{os.getpid()}")
    wudao = str(Path(sys.executable).parent / "wudao")
    procs = [
        subprocess.Popen(
            [wudao, "ingest", str(tmp_path / n), "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in words
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert any("waiting for another ingest" in err for _, err in outs), "the two really overlapped"
    reports = {n: json.loads(out) for n, (out, _) in zip(words, outs)}
    assert sorted(r["slice_id"] for r in reports.values()) == ["slice-00001", "slice-00002"]
    from wudao.storage import LocalStore

    store = LocalStore(tmp_path / "objects")
    for name, r in reports.items():
        manifest = store.read_manifest(f"slices/{r['slice_id']}")
        assert manifest["source"] == r["source"] == str((tmp_path / name).resolve())
        text = _all_text(store, manifest)
        other = words["b" if name == "a" else "a"]
        assert words[name] in text and other not in text, "a slice holds its own source's documents only"
        assert r["documents_accepted"] + r["duplicates_near"] == 60 and r["duplicates_exact"] == 0

    # The same source twice at once: one ingests it, the other finds nothing new (before: a raw IntegrityError).
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "c.txt").write_text(ZH_DOC, encoding="utf-8")
    procs = [
        subprocess.Popen(
            [wudao, "ingest", str(tmp_path / "c"), "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    same = sorted((json.loads(out)["objects_new"], json.loads(out)["slice_id"] or "") for out, _ in outs)
    assert same == [(0, ""), (1, "slice-00003")]


def test_a_missing_s3_source_leaves_no_trace_in_the_catalog(s3_settings):
    from wudao.catalog import Source

    with pytest.raises(IngestError, match="cannot list source s3://no-such-bucket-wudao"):
        run_ingest(s3_settings, "s3://no-such-bucket-wudao/raw")
    with catalog(s3_settings).session() as s:
        assert s.query(Source).count() == 0
