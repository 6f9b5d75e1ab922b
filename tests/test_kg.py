"""KG fact checks: closed-answer cloze probing (shared-prefix scorer == naive scorer), a model that memorised the
facts scores P@1 >= 0.9 in both languages while a fresh one is near chance, and bad KG lines are reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wudao.data.demo import TEMPLATES, country_facts
from wudao.data.glm import SpecialIds, glm_sample, stack_rows
from wudao.data.tokenizer import train_tokenizer
from wudao.eval.kg import _cloze_inputs, evaluate_kg, naive_cloze_sums, parse_kg
from wudao.model import GLMConfig, GLMModel, cloze_scores


def small_kg(n: int = 24):
    """Real capital facts in English and Chinese, with the demo templates."""
    facts, templates = [], []
    rows = [(iso, v) for iso, v in sorted(country_facts().items()) if "zh" in v and "capital" in v["zh"]][:n]
    for _, langs in rows:
        for lang in ("en", "zh"):
            facts.append({"subject": langs[lang]["name"], "relation": "capital", "object": langs[lang]["capital"], "lang": lang})
    for lang in ("en", "zh"):
        templates += [{"relation": "capital", "lang": lang, "template": t} for t in TEMPLATES[("capital", lang)][:1]]
    return "\n".join(json.dumps(f, ensure_ascii=False) for f in facts), "\n".join(json.dumps(t, ensure_ascii=False) for t in templates)


@pytest.fixture(scope="module")
def kg_and_tokenizer():
    facts_text, templates_text = small_kg()
    kg = parse_kg(facts_text, templates_text)
    texts = [t.replace("[X]", f.subject).replace("[Y]", f.object) for f in kg.facts for t in kg.templates[(f.relation, f.lang)]]
    return kg, train_tokenizer(texts * 3, vocab_size=700)


def _model(tok) -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(GLMConfig(vocab_size=tok.get_vocab_size(), d_model=96, n_layers=2, n_heads=4, max_seq_len=48,
                              moe_every=2, n_experts=4))  # fmt: skip


def test_bad_lines_are_counted_not_fatal():
    facts = '{"subject": "France", "relation": "capital", "object": "Paris", "lang": "en"}\n{broken\n' \
            '{"subject": "X", "relation": "tallest_building", "object": "Y", "lang": "en"}\n{"subject": "A"}\n'  # fmt: skip
    templates = '{"relation": "capital", "lang": "en", "template": "The capital of [X] is [Y]."}\n' \
                '{"relation": "capital", "lang": "en", "template": "no slots"}\nnot json\n'  # fmt: skip
    kg = parse_kg(facts, templates)
    assert len(kg.facts) == 1
    assert dict(kg.problems) == {"malformed_fact_line": 2, "relation_without_template": 1, "template_without_x_and_y": 1,
                                 "malformed_template_line": 1}  # fmt: skip


def test_shared_prefix_scorer_equals_naive(kg_and_tokenizer):
    kg, tok = kg_and_tokenizer
    ids = SpecialIds.from_tokenizer(tok)
    model = _model(tok).eval()
    space = {f.lang: [g.object for g in kg.facts if g.lang == f.lang] for f in kg.facts}
    for fact in (kg.facts[0], kg.facts[1]):  # one English, one Chinese
        part_a, lead = _cloze_inputs(kg.templates[("capital", fact.lang)][0], fact.subject, tok, ids)
        candidates = [tok.encode(lead + o).ids for o in space[fact.lang]]
        with torch.no_grad():
            shared = [s.sum for s in cloze_scores(model, part_a, ids, candidates)]
            naive = naive_cloze_sums(model, part_a, ids, candidates)
        assert np.allclose(shared, naive, atol=1e-4)


def test_memorised_facts_score_high_fresh_model_near_chance(kg_and_tokenizer):
    kg, tok = kg_and_tokenizer
    ids = SpecialIds.from_tokenizer(tok)
    fresh = evaluate_kg(_model(tok), tok, kg, claim_subjects=4, bootstrap=300)
    assert fresh.p_at_1 < 0.3 and fresh.ci95[0] <= 1 / 24 + 0.05, "an untrained model is near chance"

    rng = np.random.default_rng(0)
    rows = []
    for f in kg.facts:
        for template in kg.templates[(f.relation, f.lang)]:
            part_a, lead = _cloze_inputs(template, f.subject, tok, ids)
            head = part_a[: part_a.index(ids.mask)]
            obj = tok.encode(lead + f.object).ids
            tokens = np.array(head + obj + part_a[part_a.index(ids.mask) + 1 :])
            rows.append(glm_sample(tokens, [(len(head), len(head) + len(obj))], ids.mask, ids, 48, rng))
    batch = stack_rows(rows, "token").tensors()
    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(400):
            out = model.loss(**batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            if out.lm_loss.item() < 0.01:
                break
        report = evaluate_kg(model, tok, kg, claim_subjects=4, bootstrap=300)
    finally:
        torch.set_num_threads(threads)
    assert report.p_at_1 >= 0.9 and report.mrr >= 0.9
    assert set(report.by_language) == {"en", "zh"} and all(v["p_at_1"] >= 0.85 for v in report.by_language.values())
    assert report.ci95[0] > fresh.ci95[1], "learning is visible beyond the bootstrap interval"
    assert report.n_facts == len(kg.facts) and len(report.per_fact) == len(kg.facts)
    assert set(report.claims) >= {"supported", "contradicted", "unverifiable", "supported_rate"}
