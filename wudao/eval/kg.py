"""Knowledge-graph fact checks: closed-answer cloze probing with GLM blank filling, and claim checking of
generated text.

Cloze (LAMA / BEAR / KAMEL): for each fact and each template of its relation and language, the object's place
becomes one `[MASK]`, and *every* object of that relation in that language (the closed answer space) is scored by
the log-probability of its tokens inside the blank -- multi-token objects natively, through GLM's Part B. Part A
is encoded once and shared by all candidates (KV cache). Ranking is by the summed log-probability (GLM's
ClozeModel default); the per-token mean is reported too. Metrics are macro-averaged over relations.

Claims (FActScore-style): for sampled subjects the model continues a short prompt; sentences that match a relation
template with the subject yield (subject, relation, object) claims, judged supported / contradicted /
unverifiable against the KG.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from wudao.data.glm import SpecialIds
from wudao.model import GLMModel, cloze_scores, continue_text

KG_FACTS, KG_TEMPLATES = "facts.jsonl", "templates.jsonl"


@dataclass
class Fact:
    subject: str
    relation: str
    object: str
    lang: str
    aliases: list[str] = field(default_factory=list)
    first_slice: str | None = None


@dataclass
class KG:
    facts: list[Fact]
    templates: dict[tuple[str, str], list[str]]
    problems: Counter = field(default_factory=Counter)
    """Named reasons for lines and facts that cannot be used (reported, never fatal)."""


def parse_kg(facts_text: str, templates_text: str) -> KG:
    problems: Counter = Counter()
    templates: dict[tuple[str, str], list[str]] = defaultdict(list)
    for line in templates_text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            template, key = row["template"], (row["relation"], row["lang"])
        except (ValueError, KeyError, TypeError):
            problems["malformed_template_line"] += 1
            continue
        if not isinstance(template, str) or template.count("[X]") != 1 or template.count("[Y]") != 1:
            problems["template_without_x_and_y"] += 1
            continue
        templates[key].append(template)
    facts = []
    for line in facts_text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            fact = Fact(str(row["subject"]), str(row["relation"]), str(row["object"]), str(row["lang"]),
                        [str(a) for a in row.get("aliases") or []], row.get("first_slice"))  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            problems["malformed_fact_line"] += 1
            continue
        if (fact.relation, fact.lang) not in templates:
            problems["relation_without_template"] += 1
            continue
        facts.append(fact)
    return KG(facts, dict(templates), problems)


def _cloze_inputs(template: str, subject: str, tokenizer, ids: SpecialIds) -> tuple[list[int], str]:
    """Part A token ids with one [MASK] where [Y] is, and the text that precedes an object in context.

    Byte-level BPE attaches a space to the following word, so "is [Y]" must score " Paris", not "Paris": the
    space before [Y] moves into the candidates.
    """
    before, after = template.replace("[X]", subject).split("[Y]")
    lead = " " if before.endswith(" ") else ""
    part_a = tokenizer.encode(before.rstrip(" ")).ids + [ids.mask] + tokenizer.encode(after).ids
    return part_a, lead


@dataclass
class KGReport:
    p_at_1: float
    mrr: float
    n_facts: int
    by_relation: dict[str, dict]
    by_language: dict[str, dict]
    by_slice: dict[str, dict]
    ci95: list[float]
    """Bootstrap 95% interval of P@1 (facts resampled)."""
    claims: dict[str, float | int]
    problems: dict[str, int]
    per_fact: list[dict]

    def to_dict(self, with_facts: bool = False) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "per_fact"}
        if with_facts:
            out["per_fact"] = self.per_fact
        return out


@torch.no_grad()
def evaluate_kg(model: GLMModel, tokenizer, kg: KG, *, limit: int | None = None, seed: int = 0,
                claim_subjects: int = 20, max_new_tokens: int = 24, bootstrap: int = 1000) -> KGReport:  # fmt: skip
    model.eval()
    ids = SpecialIds.from_tokenizer(tokenizer)
    problems = Counter(kg.problems)
    rng = np.random.default_rng(seed)
    facts = list(kg.facts)
    if limit is not None and limit < len(facts):
        facts = [facts[i] for i in sorted(rng.choice(len(facts), limit, replace=False))]
    answer_space: dict[tuple[str, str], list[str]] = defaultdict(list)
    for f in kg.facts:
        if f.object not in answer_space[(f.relation, f.lang)]:
            answer_space[(f.relation, f.lang)].append(f.object)

    per_fact = []
    for fact in facts:
        space = answer_space[(fact.relation, fact.lang)]
        ranks, scores = [], {}
        for template in kg.templates[(fact.relation, fact.lang)]:
            part_a, lead = _cloze_inputs(template, fact.subject, tokenizer, ids)
            candidates = [tokenizer.encode(lead + obj).ids for obj in space]
            if any(len(c) == 0 for c in candidates) or len(tokenizer.encode(fact.subject).ids) == 0:
                problems["untokenizable"] += 1
                continue
            result = cloze_scores(model, part_a, ids, candidates)
            sums = np.array([r.sum for r in result])
            gold = space.index(fact.object)
            ranks.append(int((sums > sums[gold]).sum()) + 1)
            scores = {"gold_sum": float(sums[gold]), "gold_mean": result[gold].mean,
                      "top": space[int(sums.argmax())]}  # fmt: skip
        if not ranks:
            continue
        per_fact.append({"subject": fact.subject, "relation": fact.relation, "object": fact.object, "lang": fact.lang,
                         "first_slice": fact.first_slice, "p_at_1": float(np.mean([r == 1 for r in ranks])),
                         "rr": float(np.mean([1 / r for r in ranks])), "answer_space": len(space), **scores})  # fmt: skip

    def summary(rows: list[dict]) -> dict:
        """Macro average over relations of per-fact P@1 and reciprocal rank."""
        by_rel = defaultdict(list)
        for r in rows:
            by_rel[r["relation"]].append(r)
        p1 = float(np.mean([np.mean([r["p_at_1"] for r in v]) for v in by_rel.values()])) if rows else 0.0
        mrr = float(np.mean([np.mean([r["rr"] for r in v]) for v in by_rel.values()])) if rows else 0.0
        chance = float(np.mean([1 / r["answer_space"] for r in rows])) if rows else 0.0
        return {"p_at_1": p1, "mrr": mrr, "n_facts": len(rows), "chance": chance}

    def group(key: str) -> dict[str, dict]:
        groups = defaultdict(list)
        for r in per_fact:
            if r[key] is not None:
                groups[r[key]].append(r)
        return {k: summary(v) for k, v in sorted(groups.items())}

    overall = summary(per_fact)
    boot = []
    if per_fact:
        for _ in range(bootstrap):
            sample = [per_fact[i] for i in rng.integers(len(per_fact), size=len(per_fact))]
            boot.append(summary(sample)["p_at_1"])
    ci95 = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else [0.0, 0.0]
    claims = check_claims(model, tokenizer, kg, ids, rng, claim_subjects, max_new_tokens)
    return KGReport(overall["p_at_1"], overall["mrr"], overall["n_facts"], group("relation"),
                    group("lang"), group("first_slice"), ci95, claims, dict(problems), per_fact)  # fmt: skip


def check_claims(model: GLMModel, tokenizer, kg: KG, ids: SpecialIds, rng: np.random.Generator, n_subjects: int,
                 max_new_tokens: int) -> dict[str, float | int]:  # fmt: skip
    """Generate from `<subject>` for sampled subjects; judge every template-shaped claim about the subject."""
    known: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for f in kg.facts:
        known[(f.subject, f.relation, f.lang)].update([f.object, *f.aliases])
    subjects = sorted({(f.subject, f.lang) for f in kg.facts})
    if n_subjects and len(subjects) > n_subjects:
        subjects = [subjects[i] for i in sorted(rng.choice(len(subjects), n_subjects, replace=False))]
    counts = Counter()
    for subject, lang in subjects:
        text = subject + tokenizer.decode(continue_text(model, tokenizer.encode(subject).ids, ids, max_new_tokens))
        for (relation, tlang), templates in kg.templates.items():
            if tlang != lang:
                continue
            for template in templates:
                before, after = (re.escape(p) for p in template.replace("[X]", subject).split("[Y]"))
                stop = re.escape(after[:1]) if after else r"[.。,，;；!！?？\n]"
                for m in re.finditer(before + r"(.+?)(?=" + (stop or "$") + ")", text):
                    claimed = m.group(1).strip()
                    truth = known.get((subject, relation, lang))
                    if not truth:
                        counts["unverifiable"] += 1
                    elif claimed in truth:
                        counts["supported"] += 1
                    else:
                        counts["contradicted"] += 1
    total = sum(counts.values())
    rates = {f"{k}_rate": (counts[k] / total if total else 0.0) for k in ("supported", "contradicted", "unverifiable")}
    return {"claims": total, "subjects": len(subjects), **{k: counts[k] for k in ("supported", "contradicted", "unverifiable")}, **rates}


def naive_cloze_sums(model: GLMModel, part_a: list[int], ids: SpecialIds, candidates: list[list[int]]) -> list[float]:
    """The reference scorer: one full forward per candidate (Part A + [sop] + candidate), no sharing."""
    mask_pos = part_a.index(ids.mask) if ids.mask in part_a else part_a.index(ids.gmask)
    out = []
    for cand in candidates:
        inp = part_a + [ids.sop] + cand[:-1]
        n_a, n_b = len(part_a), len(cand)
        pos = list(range(n_a)) + [mask_pos] * n_b
        block = [0] * n_a + list(range(1, n_b + 1))
        logits = model(torch.tensor([inp]), torch.tensor([pos]), torch.tensor([block]), torch.tensor([n_a])).logits_BTV[0]
        logp = logits[n_a:].float().log_softmax(-1).gather(-1, torch.tensor(cand)[:, None]).sum()
        out.append(float(logp))
    return out
