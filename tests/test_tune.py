"""`wudao tune`: task files are read strictly (one line naming file and line), the demo task is split by country,
P-tuning of a frozen model that knows the facts beats the same model zero-shot on a new phrasing (and the majority
baseline) with < 1% of its parameters, v1 / finetune / generation tasks train, adapters round-trip through the store,
and (slow) the CLI registers an adapter in MLflow that `mlflow models serve` serves over HTTP.

The base is the smallest setup that shows the effect: a d=64, 2-layer MoE GLM that memorised which continent 40
real countries are in, in the demo corpus's three phrasings per language (cloze rows, full batch until the loss is
~0: about 150 steps, ~30 s on one core), built once per module. Each tuning run takes ~10 s.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import stack_env
from tests.test_cli import run
from tests.test_model_glm import memorise
from tests.test_model_vq import one_thread
from wudao.config import TuneSettings
from wudao.data.demo import TASK_TEMPLATES, TEMPLATES, country_facts, write_task
from wudao.data.glm import SpecialIds, blank_prompt, glm_sample, stack_rows
from wudao.data.tokenizer import MASK, train_tokenizer
from wudao.model import GLMConfig, GLMModel
from wudao.serving import mlflow_serve
from wudao.storage import LocalStore
from wudao.tune.adapter import AdapterError, Tuned, download_adapter, read_adapter, save_adapter
from wudao.tune.recipe import tune
from wudao.tune.task import TaskError, load_task


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    countries = country_facts()
    isos = sorted(countries)
    random.Random(0).shuffle(isos)
    isos = isos[:40]
    facts = [
        (lang, v["name"], v["continent"]) for iso in isos for lang, v in countries[iso].items() if "continent" in v
    ]
    texts = [t.replace("[X]", s).replace("[Y]", o) for lang, s, o in facts for t in TEMPLATES[("continent", lang)]]
    tok = train_tokenizer(texts * 2, vocab_size=800)
    ids = SpecialIds.from_tokenizer(tok)
    rows, rng = [], np.random.default_rng(0)
    for lang, subject, obj in facts:
        for template in TEMPLATES[("continent", lang)]:
            blank = blank_prompt(tok, template.replace("[X]", subject).replace("[Y]", MASK), ids)
            part_a, lead = blank.part_a, blank.lead
            m, answer = part_a.index(ids.mask), tok.encode(lead + obj).ids
            rows.append(
                glm_sample(
                    np.array(part_a[:m] + answer + part_a[m + 1 :]), [(m, m + len(answer))], ids.mask, ids, 32, rng
                )
            )
    batch = stack_rows(rows, "token").tensors()
    torch.manual_seed(0)
    model = GLMModel(
        GLMConfig(
            vocab_size=tok.get_vocab_size(), d_model=64, n_layers=2, n_heads=4, max_seq_len=48, moe_every=2, n_experts=4
        )
    )
    with one_thread():
        _, loss = memorise(model, batch, max_steps=300)
    assert loss < 0.05, "the base memorised the facts in the corpus phrasings"
    root = tmp_path_factory.mktemp("tasks")
    write_task(root, countries, isos)
    return SimpleNamespace(model=model.eval(), tok=tok, task_dir=root / "continent", countries=countries, isos=isos)


def tuned_on(base, **settings):
    with one_thread():
        return tune(
            base.model,
            base.tok,
            load_task(base.task_dir),
            TuneSettings(**settings),
            base_checkpoint_uri="test://base",
            tokenizer_version="t",
        )


def _write(folder: Path, train: str, dev: str = '{"text": "b [MASK]", "label": "y"}\n') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text(train, encoding="utf-8")
    (folder / "dev.jsonl").write_text(dev, encoding="utf-8")
    return folder


GOOD = '{"text": "a [MASK]", "label": "x"}\n{"text": "b [MASK]", "label": "y"}\n'


@pytest.mark.parametrize(
    ("train", "dev", "needle"),
    [
        (GOOD + "{broken\n", None, "train.jsonl:3: not a JSON object"),
        (GOOD + '["a list"]\n', None, "train.jsonl:3: a JSON list"),
        (
            GOOD + '{"text": "no blank", "label": "x"}\n',
            None,
            "train.jsonl:3: `text` must hold exactly one [MASK] (it holds 0)",
        ),
        (
            GOOD + '{"text": "[MASK] [MASK]", "label": "x"}\n',
            None,
            "train.jsonl:3: `text` must hold exactly one [MASK] (it holds 2)",
        ),
        (GOOD + '{"text": "a [MASK]", "label": ""}\n', None, "train.jsonl:3: `label` must be a non-empty string"),
        (
            GOOD + '{"text": "a [MASK]", "label": "x", "target": "x"}\n',
            None,
            "train.jsonl:3: give exactly one of `label`",
        ),
        (GOOD + '{"text": "a [MASK]", "target": "x"}\n', None, "train.jsonl:3: mixes `label` and `target` rows"),
        (GOOD + '{"text": "a [MASK]", "label": "x", "lang": 5}\n', None, "train.jsonl:3: `lang` must be a string"),
        (GOOD, '\n{"text": "c [MASK]", "label": "z"}\n', "dev.jsonl:2: label 'z' never occurs in train.jsonl"),
        (GOOD, '{"text": "c [MASK]", "target": "x"}\n', "dev.jsonl:1: dev rows use `target`"),
        ('{"text": "a [MASK]", "label": "x"}\n', '{"text": "c [MASK]", "label": "x"}\n', "at least two labels"),
        ("\n\n", None, "train.jsonl: no examples"),
    ],
)
def test_bad_task_lines_are_one_error_naming_file_and_line(tmp_path, train, dev, needle):
    folder = _write(tmp_path / "task", train, *([dev] if dev is not None else []))
    with pytest.raises(TaskError) as e:
        load_task(folder)
    assert needle in str(e.value) and "\n" not in str(e.value)
    (folder / "train.jsonl").write_bytes(b'{"text": "a [MASK]", "label": "\xff"}\n')
    with pytest.raises(TaskError, match="not UTF-8"):
        load_task(folder)
    with pytest.raises(TaskError, match="does not exist"):
        load_task(tmp_path / "nowhere")


def test_cli_bad_task_is_one_line_and_exit_1(tmp_path):
    folder = _write(tmp_path / "task", GOOD + "{broken\n")
    p = run("tune", str(folder), "--json", env={"WUDAO_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert p.returncode == 1 and p.stdout == ""
    assert (
        p.stderr.strip() == f"error: {folder}/train.jsonl:3: not a JSON object: one object per line, e.g. "
        '{"text": "... [MASK] ...", "label": "..."}'
    )
    assert run("tune", str(folder), "--method", "lora").returncode == 2


def test_demo_task_splits_by_country_in_both_languages(tmp_path):
    countries = country_facts()
    summary = write_task(tmp_path, countries, sorted(countries)[::3])
    task = load_task(tmp_path / "continent")
    rows = {
        split: [json.loads(line) for line in (tmp_path / "continent" / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "dev")
    }
    train_isos, dev_isos = ({r["iso"] for r in rows[s]} for s in ("train", "dev"))
    assert train_isos and dev_isos and not train_isos & dev_isos, "no country on both sides"
    assert {len(v) for v in task.labels.values()} == {summary["labels"]} and summary["labels"] >= 6
    assert set(task.labels) == {"en", "zh"} and "Which continent is" in rows["dev"][0]["text"] + rows["dev"][1]["text"]
    assert {r["text"] for r in rows["train"]} >= {
        TASK_TEMPLATES["zh"].replace("[X]", countries[i]["zh"]["name"]) for i in train_isos if "zh" in countries[i]
    }
    assert 0.1 < summary["majority_accuracy"] < 0.4
    assert "dev accuracy means something only above" in (tmp_path / "continent" / "README.md").read_text()


def test_ptuning_v2_beats_the_zero_shot_base_and_the_majority_with_under_one_percent(base):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    out = tuned_on(base)
    m = out.metrics
    print(json.dumps({k: v for k, v in m.items() if k != "seconds"}))
    cfg = base.model.cfg
    assert m["trainable_params"] == cfg.n_layers * 2 * 8 * cfg.d_model  # keys + values, 8 positions, every layer
    assert m["trainable_fraction"] < 0.01
    # Measured (seeded, one thread): dev 0.88 against zero-shot 0.44, majority 0.25, chance 0.14 over 32 dev rows.
    assert m["dev_accuracy"] >= m["base_accuracy"] + 0.25 and m["dev_accuracy"] >= m["majority_accuracy"] + 0.35
    assert all(torch.equal(v, base.model.state_dict()[k]) for k, v in before.items()), "the base is frozen"
    assert all(p.requires_grad for p in base.model.parameters()), "and handed back as it came"


def test_ptuning_v1_and_finetune_train_and_leave_the_base_alone(base):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    v1 = tuned_on(base, method="ptuning-v1", steps=200)
    assert v1.metrics["trainable_params"] == 8 * base.model.cfg.d_model
    assert np.mean(v1.history[-40:]) < np.mean(v1.history[:40]) - 0.5, "the input prompts learn"
    ft = tuned_on(base, method="finetune", steps=100)
    assert ft.metrics["trainable_fraction"] == 1.0 and set(ft.state) == set(before)
    assert ft.metrics["dev_accuracy"] >= ft.metrics["base_accuracy"] + 0.2
    assert all(torch.equal(v, base.model.state_dict()[k]) for k, v in before.items())


def test_generation_task_learns_to_fill_the_blank(base, tmp_path):
    folder = tmp_path / "gen"
    folder.mkdir()
    for split in ("train", "dev"):
        rows = [json.loads(line) for line in (base.task_dir / f"{split}.jsonl").read_text().splitlines()]
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": r["text"], "target": r["label"]}, ensure_ascii=False) + "\n" for r in rows),
            encoding="utf-8",
        )
    with one_thread():
        out = tune(
            base.model,
            base.tok,
            load_task(folder),
            TuneSettings(max_new_tokens=6),
            base_checkpoint_uri="test://base",
            tokenizer_version="t",
        )
    m = out.metrics
    assert out.spec.kind == "generation" and "chance_accuracy" not in m
    assert m["dev_accuracy"] >= m["base_accuracy"] + 0.2 and m["dev_accuracy"] > m["majority_accuracy"]


def test_adapter_round_trips_through_the_store_and_refuses_another_shape(base, tmp_path):
    out = tuned_on(base, steps=20)
    store = LocalStore(tmp_path / "objects")
    uri = save_adapter(store, "continent-ptuning-x", out.spec, out.state)
    spec, state = read_adapter(download_adapter(store, uri, tmp_path / "dl"))
    tuned = Tuned.apply(base.model, base.tok, spec, state)
    task = load_task(base.task_dir)
    texts = [ex.text for ex in task.dev]
    assert tuned.predict(texts) == tuned.classify(texts, [ex.lang for ex in task.dev]), (
        "the language is read off the text"
    )
    assert spec.metrics["dev_accuracy"] == pytest.approx(
        np.mean([p == ex.answer for p, ex in zip(tuned.predict(texts), task.dev)])
    )
    store.delete("adapters/continent-ptuning-x/manifest.json")
    with pytest.raises(AdapterError, match="incomplete"):
        download_adapter(store, uri, tmp_path / "dl2")
    other = GLMModel(GLMConfig(**{**base.model.cfg.to_dict(), "d_model": 32}))
    with pytest.raises(AdapterError, match="another shape"):
        Tuned.apply(other, base.tok, spec, state)
    with pytest.raises(AdapterError, match="exactly one"):
        tuned.predict(["no blank here"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_tunes_the_champion_registers_the_adapter_and_mlflow_serves_it(base, s3_settings, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from wudao import registry, tracking
    from wudao.data.tokenizer import tokenizer_key, tokenizer_version
    from wudao.stages import platform_store
    from wudao.storage import key_in_store
    from wudao.train.checkpoint import save_checkpoint

    # The base: the module's model as a registered @champion of the test's own model name.
    store, name = platform_store(s3_settings), s3_settings.registry.model_name
    tv = tokenizer_version(base.tok)
    store.put_bytes(tokenizer_key(tv), base.tok.to_str().encode())
    ckpt = save_checkpoint(
        store,
        "checkpoints/base/step-00000001",
        base.model,
        {"run_id": "base", "step": 1, "slice_ids": [], "tokenizer_version": tv},
    )
    run_id = tracking.begin_cycle(s3_settings, "base")
    version = registry.log_model_version(
        s3_settings, store, ckpt, tv, run_id, {"wudao.checkpoint_uri": ckpt, "wudao.tokenizer_version": tv}
    )
    client = MlflowClient(s3_settings.mlflow_tracking_uri)
    client.set_registered_model_alias(name, "champion", version)

    adapters = f"{name}-adapters"
    env = {**stack_env(s3_settings, None), "WUDAO_REGISTRY__ADAPTER_MODEL_NAME": adapters}
    p = run("tune", str(base.task_dir), "--json", env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"adapter_uri", "trainable_params", "trainable_fraction", "dev_accuracy", "base_accuracy", "steps"} <= set(r)
    assert r["trainable_fraction"] < 0.01 and r["steps"] == 300 and r["dev_accuracy"] > r["base_accuracy"]
    assert r["base_version"] == version and r["adapter_model_uri"] == f"models:/{adapters}/1"
    assert store.read_manifest(key_in_store(store, r["adapter_uri"])) is not None, "the adapter is committed"
    tags = client.get_model_version(adapters, "1").tags
    assert (tags["wudao.base_model"], tags["wudao.base_version"], tags["wudao.adapter_uri"]) == (
        name,
        version,
        r["adapter_uri"],
    )
    assert client.get_run(r["mlflow_run_id"]).data.metrics["dev_accuracy"] == pytest.approx(r["dev_accuracy"])

    dev = [json.loads(line) for line in (base.task_dir / "dev.jsonl").read_text().splitlines()]
    texts = [d["text"] for d in dev]
    mlflow.set_tracking_uri(s3_settings.mlflow_tracking_uri)
    loaded = mlflow.pyfunc.load_model(r["adapter_model_uri"])
    labels = loaded.predict(texts)
    assert np.mean([got == d["label"] for got, d in zip(labels, dev)]) == pytest.approx(r["dev_accuracy"])
    with pytest.raises(Exception, match="no labels for lang 'fr'"):  # the declared params reach the model
        loaded.predict(texts[:1], params={"lang": "fr"})

    with mlflow_serve(r["adapter_model_uri"], tmp_path / "serve.log", env=env) as url:
        answer = httpx.post(
            f"{url}/invocations",
            timeout=120,
            json={"inputs": texts[:8] + ["France"], "params": {"max_new_tokens": 4}},
        )
        assert answer.status_code == 200, answer.text
        served = answer.json()["predictions"]
        assert served[:8] == labels[:8], "served over HTTP = loaded in process"
        assert served[8].startswith("France"), "text without a blank is continued by the base"
        # Params reach the model: a label set it does not have is refused, by name.
        bad = httpx.post(f"{url}/invocations", timeout=60, json={"inputs": [texts[1]], "params": {"lang": "fr"}})
        assert bad.status_code >= 400 and "no labels for lang 'fr'" in bad.text
