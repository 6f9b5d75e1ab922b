"""KG fact checks: closed-answer cloze probing scores answer + [eop] (so a prefix no longer beats the answer), the
batched trie scorer == the naive one-forward-per-candidate scorer, chance and majority baselines on a hand-made KG,
--slice filtering (library and CLI), a model that memorised the facts scores P@1 >= 0.9 in both languages while a
fresh one is near chance, and bad KG lines are reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_cli import run
from tests.test_model_glm import IDS, memorise, tiny
from tests.test_model_vq import one_thread
from wudao.data.demo import TEMPLATES, country_facts
from wudao.data.glm import SpecialIds, glm_sample, stack_rows
from wudao.data.tokenizer import train_tokenizer
from wudao.eval.kg import _cloze_inputs, answer_spaces, evaluate_kg, naive_cloze_sums, parse_kg
from wudao.model import GLMConfig, GLMModel, cloze_scores
from wudao.model.cloze import cloze_scores_many


def small_kg(n: int = 24):
    """Real capital facts in English and Chinese, with the demo templates."""
    facts, templates = [], []
    rows = [(iso, v) for iso, v in sorted(country_facts().items()) if "zh" in v and "capital" in v["zh"]][:n]
    for _, langs in rows:
        for lang in ("en", "zh"):
            facts.append(
                {"subject": langs[lang]["name"], "relation": "capital", "object": langs[lang]["capital"], "lang": lang}
            )
    for lang in ("en", "zh"):
        templates += [{"relation": "capital", "lang": lang, "template": t} for t in TEMPLATES[("capital", lang)][:1]]
    return "\n".join(json.dumps(f, ensure_ascii=False) for f in facts), "\n".join(
        json.dumps(t, ensure_ascii=False) for t in templates
    )


@pytest.fixture(scope="module")
def kg_and_tokenizer():
    facts_text, templates_text = small_kg()
    kg = parse_kg(facts_text, templates_text)
    texts = [
        t.replace("[X]", f.subject).replace("[Y]", f.object)
        for f in kg.facts
        for t in kg.templates[(f.relation, f.lang)]
    ]
    return kg, train_tokenizer(texts * 3, vocab_size=700)


def _model(tok) -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(
        GLMConfig(
            vocab_size=tok.get_vocab_size(), d_model=96, n_layers=2, n_heads=4, max_seq_len=48, moe_every=2, n_experts=4
        )
    )


def test_bad_lines_are_counted_not_fatal():
    facts = (
        '{"subject": "France", "relation": "capital", "object": "Paris", "lang": "en"}\n{broken\n'
        '{"subject": "X", "relation": "tallest_building", "object": "Y", "lang": "en"}\n{"subject": "A"}\n'
    )
    templates = (
        '{"relation": "capital", "lang": "en", "template": "The capital of [X] is [Y]."}\n'
        '{"relation": "capital", "lang": "en", "template": "no slots"}\nnot json\n'
    )
    kg = parse_kg(facts, templates)
    assert len(kg.facts) == 1
    assert dict(kg.problems) == {
        "malformed_fact_line": 2,
        "relation_without_template": 1,
        "template_without_x_and_y": 1,
        "malformed_template_line": 1,
    }


def test_hostile_lines_are_counted_not_fatal():
    deep = "[" * 200_000 + "]" * 200_000  # json.loads: RecursionError
    facts = "\n".join(
        [
            deep,
            '{"subject": "Fr\\ud800nce", "relation": "capital", "object": "Paris", "lang": "en"}',
            '{"subject": "Peru", "relation": "capital", "object": "Lima", "lang": "en"}',
        ]
    )
    templates = "\n".join(
        [
            deep,
            '{"relation": "capital", "lang": "en", "template": "The capital of [X] is [Y]."}',
            '{"relation": "capital", "lang": "en", "template": "Bad \\udfff [X] [Y]"}',
            '{"relation": ["a"], "lang": "en", "template": "[X] [Y]"}',
        ]
    )
    kg = parse_kg(facts, templates)
    assert [f.subject for f in kg.facts] == ["Peru"]
    assert dict(kg.problems) == {"malformed_fact_line": 1, "invalid_unicode": 2, "malformed_template_line": 2}


@pytest.mark.parametrize("variant", [{}, {"layer_order": "sandwich", "pb_relax": True}])
def test_batched_scorer_equals_naive(kg_and_tokenizer, variant):
    """All prompts of both languages in one call, with budgets small enough to force several forwards and answer
    spaces split over several tries; every score equals one full forward per candidate."""
    kg, tok = kg_and_tokenizer
    ids = SpecialIds.from_tokenizer(tok)
    torch.manual_seed(0)
    model = GLMModel(
        GLMConfig(
            vocab_size=tok.get_vocab_size(),
            d_model=32,
            n_layers=2,
            n_heads=4,
            max_seq_len=48,
            moe_every=2,
            n_experts=4,
            **variant,
        )
    ).eval()
    spaces = answer_spaces(kg)
    prompts, candidates = [], []
    for fact in kg.facts[:6] + kg.facts[-6:]:
        part_a, lead = _cloze_inputs(kg.templates[(fact.relation, fact.lang)][0], fact.subject, tok, ids)
        prompts.append(part_a)
        candidates.append([tok.encode(lead + o).ids for o in spaces[(fact.relation, fact.lang)]])
    assert {f.lang for f in kg.facts[:6] + kg.facts[-6:]} == {"en", "zh"}
    with torch.no_grad(), one_thread():  # hundreds of tiny forwards: 2 threads on a shared box stall
        batched = cloze_scores_many(model, prompts, ids, candidates, max_tokens=300, max_nodes=16)
        naive = [naive_cloze_sums(model, a, ids, c) for a, c in zip(prompts, candidates)]
        single = cloze_scores(model, prompts[0], ids, candidates[0])
    for got, want in zip(batched, naive):
        assert torch.allclose(torch.tensor([s.sum for s in got]), torch.tensor(want), atol=1e-4)
    assert torch.allclose(torch.tensor([s.sum for s in single]), torch.tensor(naive[0]), atol=1e-4)
    assert all(s.mean == pytest.approx(s.sum / (len(c) + 1)) for s, c in zip(batched[0], candidates[0]))


def test_eop_is_scored_so_the_whole_answer_beats_its_prefixes():
    """GLM appends [eop] to every cloze answer. Without it log p(prefix) >= log p(answer) always; with it a model
    that learned the answer [50, 60, 70] ranks it above [50] and [50, 60]."""
    part_a, answer = [12, 13, IDS.mask, 20, 21], [50, 60, 70]
    rows = [glm_sample(np.array([12, 13, *answer, 20, 21]), [(2, 5)], IDS.mask, IDS, 16, np.random.default_rng(0))]
    batch = stack_rows(rows, "token").tensors()
    model = tiny(vocab_size=80).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    with one_thread():  # tiny steps: thread hand-offs would cost more than the arithmetic
        for _ in range(150):
            out = model.loss(**batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    model.eval()
    candidates = [answer[:1], answer[:2], answer]
    with torch.no_grad():
        scores = [s.sum for s in cloze_scores(model, part_a, IDS, candidates)]
        # One full forward of [sop] + answer: log p of each answer token, then of [eop] after each prefix.
        inp = torch.tensor([part_a + [IDS.sop, *answer]])
        pos = torch.tensor([list(range(5)) + [2] * 4])
        blk = torch.tensor([[0] * 5 + [1, 2, 3, 4]])
        logp_TV = model(inp, pos, blk, torch.tensor([5])).logits_BTV[0, 5:].log_softmax(-1)
    token_logp = [float(logp_TV[t, answer[t]]) for t in range(3)]
    eop_logp = [float(logp_TV[t, IDS.eop]) for t in range(1, 4)]  # [eop] after 1, 2, 3 answer tokens
    for n in (1, 2, 3):
        assert scores[n - 1] == pytest.approx(sum(token_logp[:n]) + eop_logp[n - 1], abs=1e-4)
    without_eop = [sum(token_logp[:n]) for n in (1, 2, 3)]
    assert without_eop[0] > without_eop[2], "the bias [eop] removes: a prefix sums fewer negative terms"
    assert scores[2] > scores[1] and scores[2] > scores[0], scores


HAND_FACTS = [  # (subject, relation, object, lang, first_slice)
    ("A", "capital", "Xa", "en", "slice-01"),
    ("B", "capital", "Yb", "en", "slice-01"),
    ("C", "capital", "Zc", "en", "slice-01"),
    ("D", "continent", "Asia", "en", "slice-01"),
    ("E", "continent", "Asia", "en", "slice-01"),
    ("F", "continent", "Asia", "en", "slice-01"),
    ("G", "continent", "Europe", "en", "slice-02"),
    ("GG", "continent", "Europe", "en", "slice-02"),
    ("甲", "continent", "亚洲", "zh", "slice-01"),
    ("乙", "continent", "欧洲", "zh", "slice-01"),
]
HAND_TEMPLATES = [
    ("capital", "en", "The capital of [X] is [Y]."),
    ("continent", "en", "[X] is in [Y]."),
    ("continent", "zh", "[X]位于[Y]。"),
]


@pytest.fixture(scope="module")
def hand_kg():
    facts = "\n".join(
        json.dumps(dict(zip(("subject", "relation", "object", "lang", "first_slice"), f)), ensure_ascii=False)
        for f in HAND_FACTS
    )
    templates = "\n".join(
        json.dumps({"relation": r, "lang": lang, "template": t}, ensure_ascii=False) for r, lang, t in HAND_TEMPLATES
    )
    kg = parse_kg(facts, templates)
    texts = [
        t.replace("[X]", f.subject).replace("[Y]", f.object)
        for f in kg.facts
        for t in kg.templates[(f.relation, f.lang)]
    ]
    tok = train_tokenizer(texts * 5, vocab_size=300)
    torch.manual_seed(0)
    model = GLMModel(
        GLMConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=1, n_heads=2, max_seq_len=32, moe_every=0)
    )
    return kg, tok, model, facts, templates


def test_chance_and_majority_are_macro_averaged_like_p_at_1(hand_kg):
    """By hand. Per fact (chance, majority): capital: 3 objects all tied -> (1/3, 1/3) each; continent/en: Asia 3,
    Europe 2 -> Asia facts (1/2, 1), Europe facts (1/2, 0); continent/zh: 2 tied -> (1/2, 1/2). Means over the
    facts of a relation, then over relations."""
    kg, tok, model, _, _ = hand_kg
    r = evaluate_kg(model, tok, kg, claim_subjects=2, max_new_tokens=4, bootstrap=10)
    assert r.n_facts == 10
    assert r.chance == pytest.approx((1 / 3 + 1 / 2) / 2)  # micro would be (3/3 + 7/2) / 10
    assert r.majority == pytest.approx((1 / 3 + (3 * 1 + 2 * 0 + 2 * 0.5) / 7) / 2)
    assert r.by_relation["capital"]["chance"] == pytest.approx(1 / 3) and r.by_relation["capital"][
        "majority"
    ] == pytest.approx(1 / 3)
    assert r.by_relation["continent"]["majority"] == pytest.approx(4 / 7)
    assert r.by_language["en"]["majority"] == pytest.approx((1 / 3 + 3 / 5) / 2)
    assert r.by_language["zh"]["chance"] == pytest.approx(1 / 2) and r.by_language["zh"]["majority"] == pytest.approx(
        1 / 2
    )
    assert r.by_slice["slice-01"]["majority"] == pytest.approx((1 / 3 + 4 / 5) / 2)
    assert r.by_slice["slice-02"]["chance"] == pytest.approx(1 / 2) and r.by_slice["slice-02"]["majority"] == 0.0
    for g in [*r.by_relation.values(), *r.by_language.values(), *r.by_slice.values()]:
        assert {"p_at_1", "chance", "majority", "mrr", "n_facts"} <= set(g)
    d = r.to_dict()
    assert d["chance"] == r.chance and d["majority"] == r.majority and "per_fact" not in d


def test_slice_filter_keeps_first_slice_and_majority_uses_the_whole_kg(hand_kg):
    kg, tok, model, _, _ = hand_kg
    r = evaluate_kg(model, tok, kg, slice_id="slice-02", claim_subjects=2, max_new_tokens=4, bootstrap=10)
    assert r.n_facts == 2 and {f["subject"] for f in r.per_fact} == {"G", "GG"} and set(r.by_slice) == {"slice-02"}
    assert r.slice_id == "slice-02" and r.to_dict()["slice_id"] == "slice-02"
    # Europe is the slice's only object, but Asia is the KG's most common: the majority baseline gets 0 here.
    assert r.majority == 0.0 and r.chance == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="slice-01, slice-02"):
        evaluate_kg(model, tok, kg, slice_id="slice-00001")


def test_cli_unknown_slice_is_one_line_with_the_known_ids(hand_kg, tmp_path):
    _, _, _, facts, templates = hand_kg
    (tmp_path / "kg").mkdir()
    (tmp_path / "kg" / "facts.jsonl").write_text(facts, encoding="utf-8")
    (tmp_path / "kg" / "templates.jsonl").write_text(templates, encoding="utf-8")
    p = run(
        "eval",
        "kg",
        "--kg",
        str(tmp_path / "kg"),
        "--slice",
        "slice-09",
        "--json",
        env={"WUDAO_HOME": str(tmp_path / "home")},
        cwd=tmp_path,
    )
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr
    last = [line for line in p.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and "slice-09" in last and "slice-01, slice-02" in last


def test_human_output_puts_p_at_1_beside_chance_and_majority(hand_kg, capsys):
    from wudao.cli import _render_kg

    kg, tok, model, _, _ = hand_kg
    r = evaluate_kg(model, tok, kg, claim_subjects=2, max_new_tokens=4, bootstrap=10)
    _render_kg({"model": "m", "kg": "k", **r.to_dict()})
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"P@1 {r.p_at_1:.2f} (chance 0.42, majority 0.45)"), first


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
    with one_thread():
        memorise(model, batch)
        report = evaluate_kg(model, tok, kg, claim_subjects=4, bootstrap=300)
    assert report.p_at_1 >= 0.9 and report.mrr >= 0.9
    assert set(report.by_language) == {"en", "zh"} and all(v["p_at_1"] >= 0.85 for v in report.by_language.values())
    assert report.ci95[0] > fresh.ci95[1], "learning is visible beyond the bootstrap interval"
    assert report.n_facts == len(kg.facts) and len(report.per_fact) == len(kg.facts)
    assert set(report.claims) >= {"supported", "contradicted", "unverifiable", "supported_rate"}
