"""Knowledge-checked generation (`wudao generate --check-facts`): the kept candidate never holds more contradicted
claims than another candidate tried (ties: the highest likelihood, recomputed here independently), every claim is
annotated as the KG says, a blank whose relation the KG knows takes the KG's answer (and says so), and the claim
reader finds template-shaped sentences only where they start a sentence.

The model is a tiny GLM trained for a few seconds on made-up facts written in the KG's templates, so it writes
template-shaped sentences with objects it half remembers: candidates differ in what they claim.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_cli import run
from wudao.checked import CheckError, generate_checked, select
from wudao.data.glm import SpecialIds, blank_prompt, glm_sample, stack_rows
from wudao.data.tokenizer import train_tokenizer
from wudao.eval.kg import ClaimChecker, naive_cloze_sums, parse_kg
from wudao.model import GLMConfig, GLMModel, Sampling
from wudao.serving import Generator

TEMPLATES = [
    {"relation": "capital", "lang": "en", "template": "The capital of [X] is [Y]."},
    {"relation": "capital", "lang": "en", "template": "[Y] is the capital city of [X]."},
    {"relation": "continent", "lang": "en", "template": "[X] is located in [Y]."},
    {"relation": "capital", "lang": "zh", "template": "[X]的首都是[Y]。"},
]
# Made-up countries: nothing here is true of the world, all of it is true of this KG.
COUNTRIES = {
    "Borduria": ("Szohod", "Europa"),
    "Syldavia": ("Klow", "Europa"),
    "Zubrowka": ("Lutz", "Europa"),
    "Genovia": ("Pyrus", "Europa"),
    "Wakanda": ("Birnin", "Afrika"),
    "Elbonia": ("Mudville", "Asya"),
    "Latveria": ("Doomstadt", "Europa"),
    "Freedonia": ("Fredonia", "Amerika"),
}
ZH = {"Borduria": ("博尔杜里亚", "索霍德"), "Syldavia": ("锡尔达维亚", "克洛")}
UNKNOWN_CAPITAL = "Qumran"  # in the KG (its continent), but the KG holds no capital for it


def kg_lines() -> tuple[str, str]:
    facts = []
    for name, (capital, continent) in COUNTRIES.items():
        facts.append(
            {
                "subject": name,
                "relation": "capital",
                "object": capital,
                "lang": "en",
                **({"aliases": ["Szohod City"]} if name == "Borduria" else {}),
            }
        )
        facts.append({"subject": name, "relation": "continent", "object": continent, "lang": "en"})
    for name, capital in ZH.values():
        facts.append({"subject": name, "relation": "capital", "object": capital, "lang": "zh"})
    facts.append({"subject": UNKNOWN_CAPITAL, "relation": "continent", "object": "Asya", "lang": "en"})
    lines = [json.dumps(f, ensure_ascii=False) for f in facts]
    return "\n".join(lines), "\n".join(json.dumps(t, ensure_ascii=False) for t in TEMPLATES)


def documents() -> list[str]:
    docs = []
    for name, (capital, continent) in COUNTRIES.items():
        docs.append(f"{name} is located in {continent}. The capital of {name} is {capital}.")
        docs.append(f"{capital} is the capital city of {name}. {name} is located in {continent}.")
    docs += [f"{name}的首都是{capital}。" for name, capital in ZH.values()]
    return docs


@pytest.fixture(scope="module")
def trained():
    """(Generator, ClaimChecker): a d=48 GLM after 150 steps on the documents above, blank and continuation
    objectives; it writes template sentences, with objects it half remembers."""
    tok = train_tokenizer(documents() * 4, vocab_size=400)
    ids = SpecialIds.from_tokenizer(tok)
    torch.manual_seed(0)
    model = GLMModel(
        GLMConfig(
            vocab_size=tok.get_vocab_size(), d_model=48, n_layers=2, n_heads=2, max_seq_len=64, moe_every=2, n_experts=2
        )
    )
    rng = np.random.default_rng(0)
    encoded = [np.array(tok.encode(d).ids) for d in documents()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(150):
            kind = "document" if step % 2 else "token"
            rows = []
            for tokens in encoded:
                if kind == "document":  # continue after the first few tokens
                    cut = int(rng.integers(1, 4))
                    rows.append(glm_sample(tokens, [(cut, len(tokens))], ids.gmask, ids, 64, rng))
                else:
                    start = int(rng.integers(0, len(tokens) - 2))
                    rows.append(glm_sample(tokens, [(start, start + 2)], ids.mask, ids, 64, rng))
            loss = model.loss(**stack_rows(rows, kind).tensors()).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return Generator.create(model, tok), ClaimChecker(parse_kg(*kg_lines()))


def test_claims_are_sentences_that_match_a_template():
    checker = ClaimChecker(parse_kg(*kg_lines()))
    text = (
        "Borduria is located in Europa. Klow is the capital city of Borduria. The capital of Syldavia is Klow, "
        "a city. Old Borduria is located in Asya. 博尔杜里亚的首都是索霍德。The capital of Qumran is Ur."
    )
    got = [(c.subject, c.relation, c.object, c.verdict) for c in checker.claims(text)]
    assert got == [
        ("Borduria", "continent", "Europa", "supported"),
        ("Borduria", "capital", "Klow", "contradicted"),
        ("博尔杜里亚", "capital", "索霍德", "supported"),
        ("Qumran", "capital", "Ur", "unverifiable"),
    ]
    # "Old Borduria ..." does not start with the template (no claim about Borduria); "Klow, a city" is no object.
    assert checker.claims(text)[1].claim == "Klow is the capital city of Borduria."
    # A text cut at the token limit makes no claim from its unfinished last sentence, a prompt's end may.
    assert checker.claims("The capital of Genovia is Pyr") == []
    assert [c.object for c in checker.claims("The capital of Genovia is Pyrus", open_end=True)] == ["Pyrus"]
    assert checker.answers("Borduria", "capital", "en") == ["Szohod", "Szohod City"]


def test_kept_candidate_has_fewest_contradictions_then_highest_likelihood(trained):
    gen, checker = trained
    prompts = [*list(COUNTRIES)[:4], "The capital of Wakanda is", "博尔杜里亚"]
    differs = 0
    for seed, prompt in enumerate(prompts):
        r = generate_checked(
            gen, checker, prompt, candidates=5, max_new_tokens=20, sampling=Sampling(temperature=1.0), seed=seed
        )
        assert r.candidates_tried == 5 and r.constrained is None
        assert r.candidates[0].text == gen.text(prompt, 20), "candidate 1 is the greedy answer of plain generation"
        counts = [c.contradicted for c in r.candidates]
        chosen = r.candidates[r.chosen]
        assert chosen.contradicted == min(counts), f"{prompt!r}: kept {chosen.contradicted} of {counts}"
        assert r.text == chosen.text and r.claims == chosen.claims
        part_a = [*gen.tokenizer.encode(prompt).ids, gen.ids.gmask]
        for cand in r.candidates:
            # The annotation is the checker's reading of the candidate's own text, and the likelihood is real.
            assert [c.to_dict() for c in cand.claims] == [c.to_dict() for c in checker.claims(cand.text)]
            assert cand.text == prompt + gen.tokenizer.decode(cand.fill)
            with torch.no_grad():
                expected = naive_cloze_sums(gen.model, part_a, gen.ids, [cand.fill])[0]
            assert cand.logp == pytest.approx(expected, abs=1e-3)
        tied = [c.logp for c in r.candidates if c.contradicted == chosen.contradicted]
        assert chosen.logp == max(tied)
        differs += len(set(counts)) > 1 and counts[0] > min(counts)
    # Not vacuous: for some prompts the greedy answer contradicts the KG more than the kept one.
    assert differs >= 2, "candidates never differed in contradictions: the model is not writing claims"


def test_select_prefers_fewer_contradictions_over_likelihood():
    from wudao.checked import Candidate
    from wudao.eval.kg import Claim

    def claim(verdict):
        return Claim("s", "X", "capital", "o", "en", verdict, 0, 1)

    cands = [
        Candidate("a", -1.0, [claim("contradicted")], [True]),
        Candidate("b", -9.0, [claim("supported")], [True]),
        Candidate("c", -5.0, [], []),
        Candidate("d", -5.0, [claim("unverifiable")], [True]),
    ]
    assert select(cands) == 2  # 0 contradictions: c and d tie on likelihood, b is less likely; c came first
    assert select(cands[:2]) == 1


def test_blank_of_a_known_relation_takes_the_kg_answer(trained):
    gen, checker = trained
    r = generate_checked(gen, checker, "The capital of Borduria is [MASK].", candidates=4, seed=0)
    assert r.constrained["applied"] and r.constrained["answers"] == ["Szohod", "Szohod City"]
    blank = blank_prompt(gen.tokenizer, "The capital of Borduria is [MASK].", gen.ids)
    with torch.no_grad():
        sums = naive_cloze_sums(
            gen.model, blank.part_a, gen.ids, [gen.tokenizer.encode(" " + a).ids for a in r.constrained["answers"]]
        )
    assert r.text == f"The capital of Borduria is {r.constrained['answers'][int(np.argmax(sums))]}."
    assert [(c.relation, c.verdict) for c in r.claims] == [("capital", "supported")] and r.generated == [True]
    assert r.candidates_tried == 2
    zh = generate_checked(gen, checker, "博尔杜里亚的首都是[MASK]。", candidates=1)
    assert zh.text == "博尔杜里亚的首都是索霍德。" and zh.claims[0].verdict == "supported"

    # Not constrained: the KG lacks the fact (said why), or the caller turned it off; both sample K candidates.
    free = generate_checked(gen, checker, f"The capital of {UNKNOWN_CAPITAL} is [MASK].", candidates=3, seed=1)
    assert free.constrained["applied"] is False and UNKNOWN_CAPITAL in free.constrained["reason"]
    assert free.candidates_tried == 3 and all(c.verdict == "unverifiable" for c in free.claims)
    off = generate_checked(gen, checker, "The capital of Borduria is [MASK].", candidates=3, seed=1, constrain=False)
    assert off.constrained is None and off.candidates_tried == 3


def test_bad_requests_are_one_clear_error(trained):
    gen, checker = trained
    with pytest.raises(CheckError, match="temperature > 0"):
        generate_checked(gen, checker, "Borduria", candidates=3, sampling=Sampling(temperature=0.0))
    with pytest.raises(CheckError, match="max_seq_len"):
        generate_checked(gen, checker, "Borduria", candidates=2, max_new_tokens=80)


def test_cli_check_facts_json_and_usage(trained, tmp_path):
    from wudao.data.tokenizer import tokenizer_key, tokenizer_version
    from wudao.storage import open_store
    from wudao.train.checkpoint import save_checkpoint

    gen, _ = trained
    store = open_store(str(tmp_path / "objects"))
    version = tokenizer_version(gen.tokenizer)
    store.put_bytes(tokenizer_key(version), gen.tokenizer.to_str().encode())
    uri = save_checkpoint(
        store, "checkpoints/tiny/step-00000150", gen.model, {"tokenizer_version": version, "step": 150}
    )
    facts, templates = kg_lines()
    (tmp_path / "kg").mkdir()
    (tmp_path / "kg" / "facts.jsonl").write_text(facts, encoding="utf-8")
    (tmp_path / "kg" / "templates.jsonl").write_text(templates, encoding="utf-8")
    env = {"WUDAO_HOME": str(tmp_path / "home"), "WUDAO_STORAGE_URI": str(tmp_path / "objects")}

    p = run(
        "generate",
        "--model",
        uri,
        "--text",
        "The capital of Borduria is [MASK].",
        "--check-facts",
        "--kg",
        str(tmp_path / "kg"),
        "--json",
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["text"] in ("The capital of Borduria is Szohod.", "The capital of Borduria is Szohod City.")
    assert out["claims"][0] == {
        "claim": out["text"],
        "subject": "Borduria",
        "relation": "capital",
        "object": out["text"][27:-1],
        "lang": "en",
        "verdict": "supported",
        "generated": True,
    }
    assert out["constrained"]["applied"] and out["candidates_tried"] == 2
    p = run(
        "generate",
        "--model",
        uri,
        "--text",
        "Syldavia",
        "--check-facts",
        "--kg",
        str(tmp_path / "kg"),
        "--candidates",
        "3",
        "--max-new-tokens",
        "16",
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Syldavia") and "candidates tried: 3" in p.stdout

    usage = [
        ["--text", "x", "--check-facts"],  # no KG anywhere
        ["--text", "x", "--check-facts", "--kg", "k", "--candidates", "3", "--temperature", "0"],
        ["--image-prompt", "x", "--out", "x.png", "--check-facts", "--kg", "k"],
    ]
    for args in usage:
        p = run("generate", *args, "--json", env=env, cwd=tmp_path)
        assert p.returncode == 2 and p.stdout == "" and p.stderr.strip().startswith("error: "), (args, p.stderr)
    p = run(
        "generate",
        "--model",
        uri,
        "--text",
        "x",
        "--check-facts",
        "--kg",
        str(tmp_path / "nokg"),
        "--json",
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 1 and p.stdout == "" and "does not exist" in p.stderr and "Traceback" not in p.stderr
