"""GLM autoregressive blank infilling: turn rows of packed documents into Part A / Part B training samples.

A row is a flat token array of documents separated by `[EOS]`. Spans are chosen inside documents (never
over an `[EOS]` or `[PAD]`) by one of three objectives, drawn once per batch as GLM does:

- token:    spans of Poisson(λ=3) length truncated to 1..39, ≥ 1 token apart, until 15 % of tokens; `[MASK]`
- sentence: whole sentences until ≥ 15 % of tokens; `[sMASK]`
- document: a suffix of each document, length uniform in [0.25·len, len]; `[gMASK]`

Part A is the row with every span replaced by its mask token; Part B holds, for each span in shuffled order,
input `[sop] + span` and target `span + [eop]`. Part B tokens take the position of their span's mask and block
positions 1..len+1; loss only on Part B. Part A is bidirectional over the whole row, across documents, as
in GLM's packing: a span never leaves its document, but the context may. Shape suffixes: B rows, T tokens.

From a flat token stream: cut rows of about 0.9·seq_len tokens, then
`build_glm_batch(rows, SpecialIds.from_tokenizer(tok), seq_len, rng, sentence_ends=sentence_end_ids(tok))`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from wudao.data.tokenizer import BASE, BOI, CLS, EOI, EOP, EOS, GMASK, MASK, PAD, ROI, SMASK, SOP
from wudao.model.objective import GLMObjective, Kind

Span = tuple[int, int]  # [start, end) in the source row

SENTENCE_END_CHARS = ".?!;:。？！；…"


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the reserved tokens, filled from the tokenizer by the caller (`SpecialIds.from_tokenizer`)."""

    pad: int
    eos: int
    cls: int
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    boi: int
    eoi: int
    roi: int
    base: int

    def __post_init__(self) -> None:
        # GLM's released tokenizer once mapped [eop] and [gMASK] to one id; training then silently breaks.
        values = [getattr(self, f.name) for f in fields(self)]
        if len(set(values)) != len(values):
            raise ValueError(f"special token ids must be distinct: {self}")

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        """From anything with `token_to_id(str) -> int | None` (a `tokenizers.Tokenizer`)."""
        names = dict(
            pad=PAD,
            eos=EOS,
            cls=CLS,
            mask=MASK,
            smask=SMASK,
            gmask=GMASK,
            sop=SOP,
            eop=EOP,
            boi=BOI,
            eoi=EOI,
            roi=ROI,
            base=BASE,
        )
        ids = {k: tok.token_to_id(v) for k, v in names.items()}
        if None in ids.values():
            raise ValueError(f"tokenizer lacks special tokens {[names[k] for k, v in ids.items() if v is None]}")
        return cls(**ids)

    def mask_for(self, kind: Kind) -> int:
        return {"token": self.mask, "sentence": self.smask, "document": self.gmask}[kind]


def sentence_end_ids(tok) -> frozenset[int]:
    """Ids of tokens that end a sentence: the text ends in one of .?!;: 。？！；… (spaces aside) or has a newline.

    A full-width mark that BPE never merged is split over byte tokens and cannot be recognised token by token;
    a tokenizer trained on Chinese text has them as tokens.
    """
    out = set()
    for token_id in tok.get_vocab().values():
        text = tok.decode([token_id])
        if "\n" in text or text.rstrip(" ").endswith(tuple(SENTENCE_END_CHARS)):
            out.add(token_id)
    return frozenset(out)


@dataclass(frozen=True)
class BlankPrompt:
    """A prompt holding a blank, encoded as the model saw blanks in training.

    Byte-level BPE attaches a space to the following word, so a trained span is " Paris", never "Paris" after a
    lone " " token: the space before the blank moves out of Part A into the answer (`lead`).
    """

    part_a: list[int]
    """Token ids: the text before the blank (without that space), the blank token, the text after."""
    before: str
    """The text before the blank, without the space that moved into the answer."""
    lead: str
    """" " when a space preceded the blank (it belongs to the answer), else ""."""
    after: str
    token: str
    """The blank token: `[MASK]`, `[sMASK]` or `[gMASK]`."""

    def text(self, answer: str) -> str:
        """The prompt with the blank replaced by `answer` (decoded fill tokens carry their own leading space)."""
        return self.before + answer + self.after


def blank_prompt(tok, text: str, ids: SpecialIds) -> BlankPrompt | None:
    """The first blank of `text` (any of `[MASK]`, `[sMASK]`, `[gMASK]`), or None when it has none."""
    found = [(text.find(t), t) for t in (MASK, SMASK, GMASK) if t in text]
    if not found:
        return None
    at, token = min(found)
    before, after = text[:at], text[at + len(token) :]
    lead = " " if before.endswith(" ") else ""
    before = before[: len(before) - len(lead)]
    blank = {MASK: ids.mask, SMASK: ids.smask, GMASK: ids.gmask}[token]
    return BlankPrompt(tok.encode(before).ids + [blank] + tok.encode(after).ids, before, lead, after, token)


@dataclass
class GLMBatch:
    """One padded batch, numpy on the host; `tensors()` gives exactly the keywords of `GLMModel.loss`."""

    input_ids_BT: np.ndarray
    position_ids_BT: np.ndarray
    block_position_ids_BT: np.ndarray
    target_ids_BT: np.ndarray
    loss_mask_BT: np.ndarray
    """True on Part B positions (the only ones with a loss)."""
    sep_B: np.ndarray
    """Part A length per row: attention is bidirectional over [0, sep) and causal after."""
    real_BT: np.ndarray
    """False on [PAD] positions (row tails, and padding inside packed rows): MoE layers do not route them."""
    kind: Kind

    def tensors(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        names = (
            "input_ids_BT",
            "position_ids_BT",
            "block_position_ids_BT",
            "target_ids_BT",
            "loss_mask_BT",
            "sep_B",
            "real_BT",
        )
        return {n: torch.from_numpy(getattr(self, n)).to(device) for n in names}


def document_bounds(tokens: np.ndarray, ids: SpecialIds) -> list[Span]:
    """Maximal runs of maskable tokens: everything but [EOS] (document separator) and [PAD]."""
    maskable = (tokens != ids.eos) & (tokens != ids.pad)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], maskable.astype(np.int8), [0]])))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]


def _target(bounds: list[Span], ratio: float) -> int:
    return math.ceil(ratio * sum(e - s for s, e in bounds))


def token_spans(n: int, bounds: list[Span], rng: np.random.Generator, obj: GLMObjective) -> list[Span]:
    """Poisson-length spans until the mask ratio is reached, placed at random free places, ≥ 1 token apart."""
    target = _target(bounds, obj.mask_ratio)
    probs = obj.span_length_probs()
    lengths: list[int] = []
    while sum(lengths) < target:
        lengths.append(int(rng.choice(len(probs), p=probs)) + 1)
    free = np.zeros(n, dtype=bool)
    for s, e in bounds:
        free[s:e] = True
    spans = []
    for length in sorted(lengths, reverse=True):  # longest first: they are the hardest to fit
        window = np.concatenate([[0], np.cumsum(free)])
        starts = np.flatnonzero(window[length:] - window[:-length] == length)
        if len(starts) == 0:
            continue  # no room left for this length; a shorter one may still fit
        s = int(rng.choice(starts))
        spans.append((s, s + length))
        free[max(0, s - 1) : s + length + 1] = False  # the span plus one token of gap on each side
    return sorted(spans)


def sentence_spans(
    tokens: np.ndarray, bounds: list[Span], rng: np.random.Generator, obj: GLMObjective, end_ids: Iterable[int]
) -> list[Span]:
    """Whole sentences (ending in a token of `end_ids`, or at the document end) in random order until ≥ ratio."""
    is_end = np.isin(tokens, np.fromiter(end_ids, dtype=np.int64))
    sentences = []
    for s, e in bounds:
        cuts = [int(i) + 1 for i in np.flatnonzero(is_end[s:e]) + s if i + 1 < e]
        starts = [s, *cuts]
        sentences += list(zip(starts, [*cuts, e]))
    target, covered, chosen = _target(bounds, obj.mask_ratio), 0, []
    for i in rng.permutation(len(sentences)):
        if covered >= target:
            break
        chosen.append(sentences[i])
        covered += sentences[i][1] - sentences[i][0]
    return sorted(chosen)


def document_spans(bounds: list[Span], rng: np.random.Generator, obj: GLMObjective) -> list[Span]:
    """A suffix of every document, of length uniform in [⌈ratio·len⌉, len]."""
    spans = []
    for s, e in bounds:
        length = int(rng.integers(max(1, math.ceil(obj.gen_min_ratio * (e - s))), e - s + 1))
        spans.append((e - length, e))
    return spans


def glm_sample(
    tokens: np.ndarray, spans: Sequence[Span], mask_id: int, ids: SpecialIds, seq_len: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Part A + shuffled Part B for sorted, non-overlapping `spans`, padded to `seq_len` (one row of GLMBatch).

    The result has len(tokens) + 2·len(spans) tokens (a mask in Part A and a [sop] in Part B per span); spans
    that do not fit in `seq_len` are dropped at random, whole, rather than truncated.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    spans = list(spans)
    if len(tokens) > seq_len:
        raise ValueError(f"a source row of {len(tokens)} tokens cannot fit seq_len={seq_len}")
    while spans and len(tokens) + 2 * len(spans) > seq_len:
        spans.pop(int(rng.integers(len(spans))))
    part_a, mask_pos, prev = [], [], 0
    for s, e in spans:
        part_a.append(tokens[prev:s])
        mask_pos.append(sum(len(p) for p in part_a))
        part_a.append(np.array([mask_id]))
        prev = e
    part_a.append(tokens[prev:])
    a = np.concatenate(part_a)
    sep = len(a)
    row = {k: np.zeros(seq_len, dtype=np.int64) for k in ("input", "position", "block", "target")}
    row["input"][:] = ids.pad
    row["target"][:] = ids.pad
    row["input"][:sep] = a
    row["position"][:sep] = np.arange(sep)
    loss = np.zeros(seq_len, dtype=bool)
    at = sep
    for i in rng.permutation(len(spans)):
        (s, e), n = spans[i], spans[i][1] - spans[i][0] + 1
        row["input"][at : at + n] = np.concatenate([[ids.sop], tokens[s:e]])
        row["target"][at : at + n] = np.concatenate([tokens[s:e], [ids.eop]])
        row["position"][at : at + n] = mask_pos[i]
        row["block"][at : at + n] = np.arange(1, n + 1)
        loss[at : at + n] = True
        at += n
    return {
        "input_ids_BT": row["input"],
        "position_ids_BT": row["position"],
        "block_position_ids_BT": row["block"],
        "target_ids_BT": row["target"],
        "loss_mask_BT": loss,
        "sep_B": np.int64(sep),
        "real_BT": row["input"] != ids.pad,
    }


def choose_spans(
    tokens: np.ndarray,
    kind: Kind,
    ids: SpecialIds,
    rng: np.random.Generator,
    objective: GLMObjective = GLMObjective(),
    sentence_ends: Iterable[int] = (),
) -> list[Span]:
    """The spans of one objective in one row (sorted, non-overlapping, inside documents)."""
    bounds = document_bounds(tokens, ids)
    if kind == "token":
        return token_spans(len(tokens), bounds, rng, objective)
    if kind == "sentence":
        return sentence_spans(tokens, bounds, rng, objective, sentence_ends)
    return document_spans(bounds, rng, objective)


def stack_rows(rows: Sequence[dict[str, np.ndarray]], kind: Kind) -> GLMBatch:
    return GLMBatch(**{k: np.stack([r[k] for r in rows]) for k in rows[0]}, kind=kind)


def build_glm_batch(
    rows: Sequence[np.ndarray] | np.ndarray,
    ids: SpecialIds,
    seq_len: int,
    rng: np.random.Generator,
    objective: GLMObjective = GLMObjective(),
    sentence_ends: Iterable[int] = (),
    kind: Kind | None = None,
) -> GLMBatch:
    """GLM batch from rows of packed documents (each a token array, documents separated by [EOS]).

    One objective is drawn for the whole batch unless `kind` is given. Rows of about 0.9·seq_len tokens
    leave room for the mask and [sop] tokens (2 per span); spans that still do not fit are dropped.
    """
    kind = objective.draw(rng) if kind is None else kind
    sentence_ends = frozenset(sentence_ends)
    out = []
    for tokens in rows:
        tokens = np.asarray(tokens, dtype=np.int64)
        spans = choose_spans(tokens, kind, ids, rng, objective, sentence_ends)
        out.append(glm_sample(tokens, spans, ids.mask_for(kind), ids, seq_len, rng))
    return stack_rows(out, kind)
