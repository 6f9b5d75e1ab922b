"""Generation with a GLM model: blank filling, text continuation, image codes, cloze scoring, CogView reranking.

Every task is the same move. Part A (a prompt holding one `[MASK]` / `[sMASK]` / `[gMASK]`) is encoded once
into a KV cache; Part B starts with `[sop]` at the blank's position (block position 1, 2, …) and grows one
token at a time until `[eop]`. Token ids come from the caller's `SpecialIds` (wudao.data.glm), never from here.
Shape suffixes: B candidates/samples, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from wudao.model.attention import KVCache
from wudao.model.glm import GLMModel


class BlankIds(Protocol):
    """The special ids generation needs (satisfied by `wudao.data.glm.SpecialIds`)."""

    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose probability reaches top_p; 1 = all."""


@dataclass(frozen=True)
class ClozeScore:
    sum: float
    """Σ log p(answer token | Part A, earlier answer tokens) inside the blank."""
    mean: float
    """sum / number of answer tokens (length-normalised)."""


def filter_logits(logits_BV: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p; removed tokens get -inf."""
    logits_BV = logits_BV.float() / sampling.temperature
    if 0 < sampling.top_k < logits_BV.size(-1):
        kth_B1 = logits_BV.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_BV, idx_BV = logits_BV.sort(-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the most likely one always stays).
        drop_BV = (cum_BV - sorted_BV.softmax(-1)) >= sampling.top_p
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, idx_BV, drop_BV), float("-inf"))
    return logits_BV


def pick(logits_BV: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    if sampling.temperature <= 0:
        return logits_BV.argmax(-1)
    probs_BV = filter_logits(logits_BV, sampling).softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def find_blank(part_a: Sequence[int], ids: BlankIds) -> int:
    """Position of the first mask token of any kind in Part A."""
    masks = {ids.mask, ids.smask, ids.gmask}
    for i, t in enumerate(part_a):
        if t in masks:
            return i
    raise ValueError("Part A holds no [MASK] / [sMASK] / [gMASK] token")


def _part_b(tokens_BT: torch.Tensor, mask_pos: int, first_block_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM 2D positions of Part B tokens: all at the blank's position, block positions counting from 1."""
    B, T = tokens_BT.shape
    pos_BT = torch.full((B, T), mask_pos, device=tokens_BT.device)
    block_BT = torch.arange(first_block_pos, first_block_pos + T, device=tokens_BT.device).expand(B, T)
    return pos_BT, block_BT


def _encode_part_a(model: GLMModel, a_1A: torch.Tensor, extra: int) -> KVCache:
    """Run Part A (bidirectional: sep = its length) once into a fresh batch-1 cache with room for `extra` more."""
    cache = model.new_kv_cache(1, a_1A.size(1) + extra)
    model.hidden(a_1A, sep_B=torch.tensor([a_1A.size(1)], device=a_1A.device), kv_cache=cache)
    return cache


@torch.no_grad()
def fill_blank(
    model: GLMModel,
    part_a: Sequence[int],
    ids: BlankIds,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    num_samples: int = 1,
    mask_pos: int | None = None,
    stop_at_eop: bool = True,
    vocab_range: tuple[int, int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Generate the content of the blank in `part_a`; one token list per sample, `[eop]` not included.

    `vocab_range=(lo, hi)` restricts sampling to ids lo..hi-1 (image codes). `use_cache=False` recomputes
    the whole sequence every step (the reference the cache is tested and benchmarked against).
    """
    mask_pos = find_blank(part_a, ids) if mask_pos is None else mask_pos
    B = num_samples
    a_1A = torch.tensor([list(part_a)], device=model.tok_emb.weight.device)
    sep_B = torch.full((B,), a_1A.size(1), device=a_1A.device)
    cache = _encode_part_a(model, a_1A, max_new_tokens + 1).repeat(B) if use_cache else None
    part_b_BT = torch.full((B, 1), ids.sop, device=a_1A.device)
    done_B = torch.zeros(B, dtype=torch.bool, device=a_1A.device)
    for step in range(max_new_tokens):
        if use_cache:
            pos_BT, block_BT = _part_b(part_b_BT[:, -1:], mask_pos, step + 1)
            logits_BV = model(part_b_BT[:, -1:], pos_BT, block_BT, sep_B, cache).logits_BTV[:, -1]
        else:
            pos_BT, block_BT = _part_b(part_b_BT, mask_pos, 1)
            a_BA = a_1A.expand(B, -1)
            a_pos_BA = torch.arange(a_BA.size(1), device=a_BA.device).expand_as(a_BA)
            h_BTD, _ = model.hidden(torch.cat([a_BA, part_b_BT], 1), torch.cat([a_pos_BA, pos_BT], 1),
                                    torch.cat([torch.zeros_like(a_BA), block_BT], 1), sep_B)  # fmt: skip
            logits_BV = model.project(h_BTD[:, -1])  # only the last position is needed
        if vocab_range is not None:
            keep_V = torch.zeros(logits_BV.size(-1), dtype=torch.bool, device=logits_BV.device)
            keep_V[vocab_range[0] : vocab_range[1]] = True
            logits_BV = logits_BV.masked_fill(~keep_V, float("-inf"))
        next_B = pick(logits_BV, sampling, generator)
        part_b_BT = torch.cat([part_b_BT, next_B[:, None]], 1)
        if stop_at_eop:
            done_B |= next_B == ids.eop
            if bool(done_B.all()):
                break
    out = []
    for row in part_b_BT[:, 1:].tolist():
        out.append(row[: row.index(ids.eop)] if stop_at_eop and ids.eop in row else row)
    return out


def continue_text(model: GLMModel, prompt: Sequence[int], ids: BlankIds, max_new_tokens: int,
                  sampling: Sampling = Sampling(), generator: torch.Generator | None = None) -> list[int]:  # fmt: skip
    """GLM text continuation: the prompt followed by `[gMASK]` (the document-level objective), then generate."""
    part_a = [*prompt, ids.gmask]
    return fill_blank(model, part_a, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                      mask_pos=len(prompt), generator=generator)[0]  # fmt: skip


def sample_image_codes(
    model: GLMModel,
    prompt: Sequence[int],
    ids: BlankIds,
    *,
    n_codes: int,
    code_offset: int,
    codebook_size: int,
    sampling: Sampling = Sampling(temperature=1.0, top_k=100),
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Codes (num_samples, n_codes) in 0..codebook_size-1 for a text-to-image prompt holding the `[gMASK]`
    (see `wudao.data.multimodal.cogview_prompt`); only image-code ids can be sampled, exactly n_codes of them."""
    rows = fill_blank(model, prompt, ids, max_new_tokens=n_codes, sampling=sampling, num_samples=num_samples,
                      stop_at_eop=False, vocab_range=(code_offset, code_offset + codebook_size),
                      generator=generator)  # fmt: skip
    return torch.tensor(rows) - code_offset


@torch.no_grad()
def cloze_scores(
    model: GLMModel,
    part_a: Sequence[int],
    ids: BlankIds,
    candidates: Sequence[Sequence[int]],
    mask_pos: int | None = None,
) -> list[ClozeScore]:
    """Log-probability of each candidate answer inside the blank (GLM ClozeModel), Part A encoded once.

    The Part A cache is copied to every candidate; candidates are padded to one length and the padding is
    causal-after every real token, so it changes nothing that is scored.
    """
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("every candidate needs at least one token")
    mask_pos = find_blank(part_a, ids) if mask_pos is None else mask_pos
    B, M = len(candidates), max(len(c) for c in candidates)
    a_1A = torch.tensor([list(part_a)], device=model.tok_emb.weight.device)
    cache = _encode_part_a(model, a_1A, M).repeat(B)
    target_BT = torch.full((B, M), ids.eop, device=a_1A.device)
    valid_BT = torch.zeros(B, M, dtype=torch.bool, device=a_1A.device)
    for b, c in enumerate(candidates):
        target_BT[b, : len(c)] = torch.tensor(list(c))
        valid_BT[b, : len(c)] = True
    # Input = [sop] + answer without its last token: the prediction at step t is scored against answer[t].
    input_BT = torch.cat([torch.full((B, 1), ids.sop, device=a_1A.device), target_BT[:, :-1]], 1)
    pos_BT, block_BT = _part_b(input_BT, mask_pos, 1)
    sep_B = torch.full((B,), a_1A.size(1), device=a_1A.device)
    logits_BTV = model(input_BT, pos_BT, block_BT, sep_B, cache).logits_BTV
    logp_BT = logits_BTV.float().log_softmax(-1).gather(-1, target_BT[..., None]).squeeze(-1) * valid_BT
    sums = logp_BT.sum(1).tolist()
    return [ClozeScore(s, s / len(c)) for s, c in zip(sums, candidates)]


def rerank(
    model: GLMModel, image_prompts: Sequence[Sequence[int]], caption: Sequence[int], ids: BlankIds
) -> tuple[int, list[float]]:
    """CogView self-reranking: score = Σ log p(caption | image) for each candidate image; returns (best, scores).

    Each prompt is an image-to-text Part A with a blank where the caption goes
    (`wudao.data.multimodal.cogview_prompt(..., image_first=True)`).
    """
    scores = [cloze_scores(model, p, ids, [caption])[0].sum for p in image_prompts]
    return max(range(len(scores)), key=scores.__getitem__), scores
