"""Demo data: real facts, slices that each add new facts, KG and MS-COCO layouts, deterministic per seed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from wudao.data.demo import write_demo


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path):
    a = write_demo(tmp_path / "a", slices=3, seed=7, images=4)
    write_demo(tmp_path / "b", slices=3, seed=7, images=4)
    write_demo(tmp_path / "c", slices=3, seed=8, images=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert len(a["slices"]) == 3 and a["documents"] > 0


def test_slices_bring_new_facts_in_both_languages(demo_dir):
    facts = [json.loads(line) for line in (demo_dir / "kg" / "facts.jsonl").read_text().splitlines()]
    by_slice: dict[str, set] = {}
    for f in facts:
        by_slice.setdefault(f["first_slice"], set()).add((f["subject"], f["relation"], f["lang"]))
    assert sorted(by_slice) == ["slice-01", "slice-02", "slice-03"]
    assert not by_slice["slice-01"] & by_slice["slice-02"], "each slice adds facts the others do not have"
    assert {f["lang"] for f in facts} == {"en", "zh"}
    known = {(f["subject"], f["relation"], f["object"]) for f in facts}
    assert ("France", "capital", "Paris") in known
    assert ("法国", "capital", "巴黎") in known
    assert ("Japan", "continent", "Asia") in known


def test_kg_templates_and_corpus_agree(demo_dir):
    templates = [json.loads(line) for line in (demo_dir / "kg" / "templates.jsonl").read_text().splitlines()]
    assert all("[X]" in t["template"] and "[Y]" in t["template"] for t in templates)
    docs = [json.loads(line) for line in (demo_dir / "corpus" / "slice-01" / "zh.jsonl").read_text().splitlines()]
    assert docs and all(d["lang"] == "zh" and d["text"] for d in docs)


def test_coco_layout(demo_dir):
    captions = json.loads((demo_dir / "coco" / "annotations" / "captions_val2017.json").read_text())
    files = {img["file_name"] for img in captions["images"]}
    assert files == {p.name for p in (demo_dir / "coco" / "val2017").glob("*.png")}
    ids = {img["id"] for img in captions["images"]}
    assert all(a["image_id"] in ids for a in captions["annotations"])
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in a["caption"]) for a in captions["annotations"])


def test_every_fact_is_stated_in_every_template_of_its_relation(demo_dir):
    """Paraphrase coverage: the probe asks each fact in every template, and a small LM recalls a fact in a
    phrasing it has read it in (one fixed phrasing is memorised but hard to extract)."""
    templates: dict[tuple[str, str], list[str]] = {}
    for line in (demo_dir / "kg" / "templates.jsonl").read_text().splitlines():
        t = json.loads(line)
        templates.setdefault((t["relation"], t["lang"]), []).append(t["template"])
    text = "\n".join(
        json.loads(line)["text"]
        for lang in ("en", "zh")
        for line in (demo_dir / "corpus" / "slice-01" / f"{lang}.jsonl").read_text().splitlines()
    )
    facts = [json.loads(line) for line in (demo_dir / "kg" / "facts.jsonl").read_text().splitlines()]
    slice1 = [f for f in facts if f["first_slice"] == "slice-01"]
    assert len(slice1) > 100
    for f in slice1:
        for t in templates[(f["relation"], f["lang"])]:
            sentence = t.replace("[X]", f["subject"]).replace("[Y]", f["object"])
            assert sentence in text, f"{sentence!r} is not in slice-01"
