"""Knowledge-graph fact checks: closed-answer cloze probing with GLM blank filling, and claim checking of
generated text.

Cloze (LAMA / BEAR / KAMEL): for each fact and each template of its relation and language, the object's place
becomes one `[MASK]`, and *every* object of that relation in that language (the closed answer space) is scored by
the log-probability of its tokens and a closing `[eop]` inside the blank -- multi-token objects natively, through
GLM's Part B; without `[eop]` a prefix of an answer would always outscore the whole answer. All (fact, template,
candidate) rows are scored in a few padded forwards. Ranking is by the summed log-probability (GLM's ClozeModel
default); the per-token mean is reported too. Metrics are macro-averaged over relations, and so are the two
baselines reported beside P@1: uniform chance (1 / answer space) and majority (always the most common object).

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

from wudao.data.formats import encodable
from wudao.data.glm import SpecialIds, blank_prompt
from wudao.data.tokenizer import MASK
from wudao.model import GLMModel, continue_text
from wudao.model.cloze import cloze_scores_many

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
            hash(key)
        except (ValueError, KeyError, TypeError, RecursionError):
            problems["malformed_template_line"] += 1
            continue
        if not all(encodable(v) for v in (template, *key) if isinstance(v, str)):
            problems["invalid_unicode"] += 1
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
            fact = Fact(
                str(row["subject"]),
                str(row["relation"]),
                str(row["object"]),
                str(row["lang"]),
                [str(a) for a in row.get("aliases") or []],
                row.get("first_slice"),
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            problems["malformed_fact_line"] += 1
            continue
        if not all(encodable(v) for v in (fact.subject, fact.relation, fact.object, fact.lang, *fact.aliases)):
            problems["invalid_unicode"] += 1
            continue
        if (fact.relation, fact.lang) not in templates:
            problems["relation_without_template"] += 1
            continue
        facts.append(fact)
    return KG(facts, dict(templates), problems)


def _cloze_inputs(template: str, subject: str, tokenizer, ids: SpecialIds) -> tuple[list[int], str]:
    """Part A token ids with one [MASK] where [Y] is, and the text that precedes an object in context.

    Byte-level BPE attaches a space to the following word, so "is [Y]" must score " Paris", not "Paris": the
    space before [Y] moves into the candidates (`wudao.data.glm.blank_prompt`, as generation encodes blanks).
    """
    blank = blank_prompt(tokenizer, template.replace("[X]", subject).replace("[Y]", MASK), ids)
    return blank.part_a, blank.lead


@dataclass
class KGReport:
    p_at_1: float
    chance: float
    """P@1 of guessing uniformly in each fact's answer space (1 / |answer space|), averaged as p_at_1 is."""
    majority: float
    """P@1 of always answering the most common object of the relation and language (counted over all KG facts;
    when objects tie, the expected P@1 of picking one of them at random), averaged as p_at_1 is."""
    mrr: float
    n_facts: int
    slice_id: str | None
    """The `first_slice` the probed facts were restricted to; None = every slice."""
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


def facts_of_slice(kg: KG, slice_id: str | None) -> list[Fact]:
    """The facts whose `first_slice` is `slice_id` (all facts for None); an unknown id is one clear error."""
    if slice_id is None:
        return list(kg.facts)
    facts = [f for f in kg.facts if f.first_slice == slice_id]
    if not facts:
        known = sorted({f.first_slice for f in kg.facts if f.first_slice is not None})
        listing = f"the KG knows {', '.join(known)}" if known else "the KG's facts carry no first_slice"
        raise ValueError(f"no KG facts with first_slice {slice_id!r}: {listing}")
    return facts


def answer_spaces(kg: KG) -> dict[tuple[str, str], list[str]]:
    """The closed answer space of each (relation, lang): its distinct objects over the whole KG, in KG order."""
    spaces: dict[tuple[str, str], dict[str, None]] = defaultdict(dict)
    for f in kg.facts:
        spaces[(f.relation, f.lang)][f.object] = None
    return {k: list(v) for k, v in spaces.items()}


def majority_objects(kg: KG) -> dict[tuple[str, str], set[str]]:
    """The most common object(s) of each (relation, lang) over the whole KG; several when tied."""
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for f in kg.facts:
        counts[(f.relation, f.lang)][f.object] += 1
    return {k: {o for o, n in c.items() if n == max(c.values())} for k, c in counts.items()}


@torch.no_grad()
def evaluate_kg(
    model: GLMModel,
    tokenizer,
    kg: KG,
    *,
    limit: int | None = None,
    seed: int = 0,
    claim_subjects: int = 20,
    max_new_tokens: int = 24,
    bootstrap: int = 1000,
    slice_id: str | None = None,
    max_tokens: int = 16384,
) -> KGReport:
    """Cloze-probe the facts (of `slice_id`'s `first_slice` only, if given) and check generated claims.

    Every (fact, template, candidate) row of the probe is scored in a few batched forwards (`cloze_scores_many`,
    at most `max_tokens` tokens each). The baselines beside P@1 use the same closed answer spaces and averaging.
    """
    model.eval()
    ids = SpecialIds.from_tokenizer(tokenizer)
    problems = Counter(kg.problems)
    rng = np.random.default_rng(seed)
    pool = facts_of_slice(kg, slice_id)
    facts = pool
    if limit is not None and limit < len(facts):
        facts = [facts[i] for i in sorted(rng.choice(len(facts), limit, replace=False))]
    spaces, majority = answer_spaces(kg), majority_objects(kg)

    # Candidates depend only on (relation, lang) and the space before [Y]: encode each answer space once.
    encoded: dict[tuple[str, str, str], list[list[int]]] = {}
    probes: list[tuple[int, list[int], tuple[str, str, str]]] = []  # (fact index, Part A, candidates key)
    for k, fact in enumerate(facts):
        for template in kg.templates[(fact.relation, fact.lang)]:
            part_a, lead = _cloze_inputs(template, fact.subject, tokenizer, ids)
            key = (fact.relation, fact.lang, lead)
            if key not in encoded:
                encoded[key] = [tokenizer.encode(lead + obj).ids for obj in spaces[key[:2]]]
            if any(len(c) == 0 for c in encoded[key]) or len(tokenizer.encode(fact.subject).ids) == 0:
                problems["untokenizable"] += 1
                continue
            if len(part_a) + 1 + max(map(len, encoded[key])) > model.cfg.max_seq_len:
                problems["longer_than_model_context"] += 1
                continue
            probes.append((k, part_a, key))
    scored = cloze_scores_many(
        model, [p[1] for p in probes], ids, [encoded[p[2]] for p in probes], max_tokens=max_tokens
    )

    by_fact: dict[int, list[tuple[int, list]]] = defaultdict(list)  # fact index -> (gold rank, scores) per template
    for (k, _, _), result in zip(probes, scored):
        fact = facts[k]
        sums = np.array([r.sum for r in result])
        gold = spaces[(fact.relation, fact.lang)].index(fact.object)
        by_fact[k].append((int((sums > sums[gold]).sum()) + 1, result))
    per_fact = []
    for k, templates in sorted(by_fact.items()):
        fact, space = facts[k], spaces[(facts[k].relation, facts[k].lang)]
        gold, ranks = space.index(fact.object), [rank for rank, _ in templates]
        tops = Counter(space[int(np.argmax([r.sum for r in result]))] for _, result in templates)
        top_set = majority[(fact.relation, fact.lang)]
        per_fact.append(
            {
                "subject": fact.subject,
                "relation": fact.relation,
                "object": fact.object,
                "lang": fact.lang,
                "first_slice": fact.first_slice,
                "p_at_1": float(np.mean([r == 1 for r in ranks])),
                "rr": float(np.mean([1 / r for r in ranks])),
                "answer_space": len(space),
                "chance": 1 / len(space),
                # Tied most common objects: the expected P@1 of picking one of them at random.
                "majority": 1 / len(top_set) if fact.object in top_set else 0.0,
                "gold_sum": float(np.mean([result[gold].sum for _, result in templates])),
                "gold_mean": float(np.mean([result[gold].mean for _, result in templates])),
                "top": tops.most_common(1)[0][0],  # the answer ranked first by the most templates
            }
        )

    def summary(rows: list[dict]) -> dict:
        """Macro average over relations (mean over facts within a relation, then over relations)."""
        by_rel = defaultdict(list)
        for r in rows:
            by_rel[r["relation"]].append(r)

        def macro(field: str) -> float:
            return float(np.mean([np.mean([r[field] for r in v]) for v in by_rel.values()])) if rows else 0.0

        return {
            "p_at_1": macro("p_at_1"),
            "chance": macro("chance"),
            "majority": macro("majority"),
            "mrr": macro("rr"),
            "n_facts": len(rows),
        }

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
    claims = check_claims(model, tokenizer, kg, ids, rng, claim_subjects, max_new_tokens, facts=pool)
    return KGReport(
        p_at_1=overall["p_at_1"],
        chance=overall["chance"],
        majority=overall["majority"],
        mrr=overall["mrr"],
        n_facts=overall["n_facts"],
        slice_id=slice_id,
        by_relation=group("relation"),
        by_language=group("lang"),
        by_slice=group("first_slice"),
        ci95=ci95,
        claims=claims,
        problems=dict(problems),
        per_fact=per_fact,
    )


VERDICTS = ("supported", "contradicted", "unverifiable")
_ENDS = ".。!！?？;；\n"
"""Characters that end a sentence."""
_NOT_IN_OBJECT = _ENDS + ",，"
"""A claimed object never holds one of these (unless it is a KG object, "St. John's"): "Paris, a big city" is not
read as an object, and a sentence end never is."""
_SENTENCE_START = r"(?:^|(?<=[.。!！?？;；:：\n]))\s*"


@dataclass(frozen=True)
class Claim:
    """One template-shaped sentence of a text: (subject, relation, object) judged against the KG."""

    claim: str
    """The sentence as written."""
    subject: str
    relation: str
    object: str
    lang: str
    verdict: str
    """supported (the KG holds this object or an alias), contradicted (it holds others), unverifiable (it holds no
    object for this subject and relation)."""
    start: int
    end: int
    """Character span of the sentence in the text."""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("claim", "subject", "relation", "object", "lang", "verdict")}


class ClaimChecker:
    """The claims a text makes about KG subjects, FActScore-style: a claim is a sentence that is one of the KG's
    templates with [X] = a subject of the template's language and [Y] = anything up to the template's next text.

    A claim starts where a sentence starts (so "Guinea's capital is" is not read inside "Equatorial Guinea's
    capital is"), and its object holds no sentence end or comma unless it is one of the KG's own objects.
    """

    def __init__(self, kg: KG) -> None:
        self.kg = kg
        self._known: dict[tuple[str, str, str], dict[str, None]] = defaultdict(dict)
        dotted: dict[tuple[str, str], set[str]] = defaultdict(set)
        for f in kg.facts:
            for name in (f.object, *f.aliases):
                self._known[(f.subject, f.relation, f.lang)][name] = None
                if any(c in _NOT_IN_OBJECT for c in name):
                    dotted[(f.relation, f.lang)].add(name)
        self._dotted = {k: "|".join(re.escape(n) for n in sorted(v, key=len, reverse=True)) for k, v in dotted.items()}
        # Longest first: where one subject holds another ("Niger" in "Nigeria"), the templates' text tells them apart.
        self._subjects = sorted({(f.subject, f.lang) for f in kg.facts}, key=lambda s: -len(s[0]))
        self._patterns: dict[tuple[str, str, bool], re.Pattern] = {}

    def answers(self, subject: str, relation: str, lang: str) -> list[str]:
        """What the KG says (objects, then aliases), in KG order; [] when it says nothing."""
        return list(self._known.get((subject, relation, lang), {}))

    def judge(self, subject: str, relation: str, lang: str, obj: str) -> str:
        truth = self._known.get((subject, relation, lang))
        return "unverifiable" if not truth else "supported" if obj in truth else "contradicted"

    def _pattern(self, template: str, subject: str, relation: str, lang: str, open_end: bool) -> re.Pattern:
        key = (template, subject, open_end)
        if key not in self._patterns:
            before, after = template.replace("[X]", subject).split("[Y]")
            obj = f"[^{re.escape(_NOT_IN_OBJECT)}]+?"
            if dotted := self._dotted.get((relation, lang)):
                obj = f"(?:{dotted})|{obj}"
            tail = re.escape(after) if after else f"(?=[{re.escape(_ENDS)}])"
            if open_end and after and after[-1] in _ENDS:  # a prompt's own end may stand for the final mark
                tail = re.escape(after[:-1]) + f"(?:{re.escape(after[-1])}|$)"
            elif open_end and not after:
                tail = f"(?=[{re.escape(_ENDS)}]|$)"
            self._patterns[key] = re.compile(f"{_SENTENCE_START}(?P<claim>{re.escape(before)}(?P<obj>{obj}){tail})")
        return self._patterns[key]

    def claims(self, text: str, *, open_end: bool = False) -> list[Claim]:
        """Every template-shaped claim in `text`, in order. `open_end`: the text's end is a real end (a prompt, a
        finished answer), so a final sentence may lack its mark; otherwise (text cut at a token limit) it may not."""
        found = []
        for subject, lang in self._subjects:
            if subject not in text:
                continue
            for (relation, tlang), templates in self.kg.templates.items():
                if tlang != lang:
                    continue
                for template in templates:
                    for m in self._pattern(template, subject, relation, lang, open_end).finditer(text):
                        obj = m.group("obj").strip()
                        found.append(
                            Claim(
                                m.group("claim"),
                                subject,
                                relation,
                                obj,
                                lang,
                                self.judge(subject, relation, lang, obj),
                                m.start("claim"),
                                m.end("claim"),
                            )
                        )
        return sorted(found, key=lambda c: (c.start, c.end))


def verdict_counts(claims: list[Claim]) -> dict[str, int]:
    return {v: sum(c.verdict == v for c in claims) for v in VERDICTS}


def check_claims(
    model: GLMModel,
    tokenizer,
    kg: KG,
    ids: SpecialIds,
    rng: np.random.Generator,
    n_subjects: int,
    max_new_tokens: int,
    facts: list[Fact] | None = None,
) -> dict[str, float | int]:
    """Generate from `<subject>` for sampled subjects (of `facts`, default all); judge every template-shaped claim
    of the text (`ClaimChecker`) against the whole KG."""
    checker = ClaimChecker(kg)
    subjects = sorted({(f.subject, f.lang) for f in (kg.facts if facts is None else facts)})
    if n_subjects and len(subjects) > n_subjects:
        subjects = [subjects[i] for i in sorted(rng.choice(len(subjects), n_subjects, replace=False))]
    counts = Counter()
    for subject, _ in subjects:
        text = subject + tokenizer.decode(continue_text(model, tokenizer.encode(subject).ids, ids, max_new_tokens))
        counts.update(verdict_counts(checker.claims(text)))
    total = sum(counts.values())
    rates = {f"{k}_rate": (counts[k] / total if total else 0.0) for k in VERDICTS}
    return {"claims": total, "subjects": len(subjects), **{k: counts[k] for k in VERDICTS}, **rates}


def naive_cloze_sums(model: GLMModel, part_a: list[int], ids: SpecialIds, candidates: list[list[int]]) -> list[float]:
    """The reference scorer: one full forward per candidate (Part A + [sop] + candidate), no sharing, no batching;
    scored against candidate + [eop] as GLM does."""
    mask_pos = part_a.index(ids.mask) if ids.mask in part_a else part_a.index(ids.gmask)
    out = []
    for cand in candidates:
        inp, target = part_a + [ids.sop] + cand, cand + [ids.eop]
        n_a, n_b = len(part_a), len(target)
        pos = list(range(n_a)) + [mask_pos] * n_b
        block = [0] * n_a + list(range(1, n_b + 1))
        logits = model(torch.tensor([inp]), torch.tensor([pos]), torch.tensor([block]), torch.tensor([n_a])).logits_BTV[
            0
        ]
        logp = logits[n_a:].float().log_softmax(-1).gather(-1, torch.tensor(target)[:, None]).sum()
        out.append(float(logp))
    return out
