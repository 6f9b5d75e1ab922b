"""Knowledge-checked generation: combine the KG and the model, and double-check what the model writes.

`generate_checked` takes K candidates for a prompt (a blank to fill or a text to continue): the greedy answer
and K-1 samples. It reads the
template-shaped claims each makes with the claim checker of `wudao eval kg` (`wudao.eval.kg.ClaimChecker`), and
returns the candidate with the fewest contradicted claims; ties go to the highest likelihood, log p(fill + [eop] |
prompt) under the model (GLM's cloze score, whatever sampling drew the fill). Every claim comes back annotated
supported / contradicted / unverifiable. So the answer never holds more contradictions than any other candidate
tried, the greedy answer of plain generation included -- but it can be no better than the best of the K: a model
that knows nothing about a subject guesses in all K.

When the prompt's blank stands where a KG template has [Y] and [X] is a known subject ("The capital of France is
[MASK]."), the relation is known: the blank is constrained to the KG's answers (object and aliases; the model's
likelihood picks among several) and the result says so (`constrained`). Where the KG lacks that fact, the blank is
sampled as usual and `constrained` says why it was not applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from wudao.data.glm import BlankPrompt, blank_prompt
from wudao.errors import WudaoError
from wudao.eval.kg import Claim, ClaimChecker, verdict_counts
from wudao.model import Sampling, cloze_scores, fill_blank
from wudao.serving import Generator


class CheckError(WudaoError):
    """A checked generation that cannot run as asked (the message names the fix)."""


@dataclass
class Candidate:
    text: str
    logp: float
    """log p(fill + [eop] | prompt) under the model (unfiltered by top-k/top-p/temperature)."""
    claims: list[Claim]
    generated: list[bool]
    """Per claim: whether it touches the generated part (False: the prompt says it on its own)."""
    fill: list[int] = field(default_factory=list)
    """The candidate's token ids (the blank's content, or the continuation)."""

    @property
    def contradicted(self) -> int:
        return sum(c.verdict == "contradicted" for c in self.claims)

    def summary(self) -> dict[str, Any]:
        return {"text": self.text, "logp": round(self.logp, 4), **verdict_counts(self.claims)}


@dataclass
class CheckedText:
    text: str
    claims: list[Claim]
    generated: list[bool]
    candidates: list[Candidate]
    chosen: int
    constrained: dict[str, Any] | None = None
    """None: the prompt's blank (if any) is not a known relation's [Y]. Else subject, relation, lang, `applied`,
    and the KG's `answers` (applied) or the `reason` it was not applied."""
    candidates_tried: int = field(init=False)

    def __post_init__(self) -> None:
        self.candidates_tried = len(self.candidates)

    def to_dict(self) -> dict[str, Any]:
        claims = [{**c.to_dict(), "generated": g} for c, g in zip(self.claims, self.generated)]
        return {
            "text": self.text,
            "claims": claims,
            "candidates_tried": self.candidates_tried,
            "constrained": self.constrained,
            "chosen": self.chosen,
            "candidates": [c.summary() for c in self.candidates],
        }


def select(candidates: list[Candidate]) -> int:
    """Fewest contradicted claims, then highest likelihood, then the earliest drawn."""
    return min(range(len(candidates)), key=lambda i: (candidates[i].contradicted, -candidates[i].logp, i))


def _known_blank(checker: ClaimChecker, prompt: str, token: str) -> Claim | None:
    """The claim of the prompt whose object is exactly the blank: its subject and relation are known."""
    return next((c for c in checker.claims(prompt, open_end=True) if c.object == token), None)


@torch.no_grad()
def generate_checked(
    gen: Generator,
    checker: ClaimChecker,
    prompt: str,
    *,
    candidates: int = 4,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(temperature=1.0),
    seed: int = 0,
    constrain: bool = True,
) -> CheckedText:
    """The greedy fill or continuation of `prompt` and `candidates` - 1 samples (seeded), or the KG's answers for a
    blank whose relation is known (`constrain`); return the candidate with the fewest contradicted claims."""
    if candidates < 1:
        raise CheckError(f"candidates must be at least 1, got {candidates}")
    if candidates > 1 and sampling.temperature <= 0:
        raise CheckError(
            f"{candidates} candidates need sampling: set temperature > 0 (greedy decoding draws the same "
            "candidate every time)"
        )
    blank = blank_prompt(gen.tokenizer, prompt, gen.ids)
    constrained, answers = None, []
    if blank is not None and constrain and (known := _known_blank(checker, prompt, blank.token)):
        answers = checker.answers(known.subject, known.relation, known.lang)
        constrained = {
            "subject": known.subject,
            "relation": known.relation,
            "lang": known.lang,
            "applied": bool(answers),
        }
        if answers:
            constrained["answers"] = answers
        else:
            constrained["reason"] = f"the KG has no {known.relation} of {known.subject} ({known.lang})"
    if blank is not None:
        part_a = blank.part_a
    else:
        part_a = [*gen.tokenizer.encode(prompt).ids, gen.ids.gmask]  # continuation: GLM's document-level blank
    room = gen.model.cfg.max_seq_len - len(part_a) - 1  # Part A, [sop] and the fill must fit to be scored
    if room < (max(len(gen.tokenizer.encode(blank.lead + a).ids) for a in answers) if answers else max_new_tokens):
        raise CheckError(
            f"the prompt ({len(part_a)} tokens) leaves {max(room, 0)} of the model's max_seq_len="
            f"{gen.model.cfg.max_seq_len} for the answer: shorten it or lower max_new_tokens"
        )
    if answers:
        fills = [gen.tokenizer.encode(blank.lead + a).ids for a in answers]
    else:
        # The greedy answer (what plain `wudao generate` returns) is always candidate 1, so the kept one never
        # contradicts the KG more than it; the other K-1 are sampled (seeded).
        fills = fill_blank(gen.model, part_a, gen.ids, max_new_tokens=max_new_tokens)
        if candidates > 1:
            fills += fill_blank(
                gen.model,
                part_a,
                gen.ids,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                num_samples=candidates - 1,
                generator=torch.Generator().manual_seed(seed),
            )
    scores = cloze_scores(gen.model, part_a, gen.ids, fills)
    tried = []
    for fill, score in zip(fills, scores):
        text = blank.text(gen.tokenizer.decode(fill)) if blank is not None else prompt + gen.tokenizer.decode(fill)
        tried.append(Candidate(text, score.sum, *answer_claims(checker, prompt, text, blank), fill))
    best = select(tried)
    chosen = tried[best]
    return CheckedText(chosen.text, chosen.claims, chosen.generated, tried, best, constrained)


def answer_claims(
    checker: ClaimChecker, prompt: str, text: str, blank: BlankPrompt | None
) -> tuple[list[Claim], list[bool]]:
    """The claims of `text`, an answer to `prompt` (`blank`: the prompt's blank, None for a continuation), and for
    each whether its sentence touches what the model wrote (the fill, or the continuation)."""
    # A filled blank ends where the prompt ends; a continuation's last sentence counts only once it is finished.
    claims = checker.claims(text, open_end=blank is not None)
    if blank is None:
        return claims, [c.end > len(prompt) for c in claims]
    fill_start, fill_end = len(blank.before), len(text) - len(blank.after)
    return claims, [c.start < max(fill_end, fill_start + 1) and c.end >= fill_start for c in claims]
