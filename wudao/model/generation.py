"""Generation with a GLM model: sampling settings, blank filling, text continuation, image codes.

Every task is the same move. Part A (a prompt holding one `[MASK]` / `[sMASK]` / `[gMASK]`) is encoded once
into a KV cache; Part B starts with `[sop]` at the blank's position (block position 1, 2, …) and grows one
token at a time until `[eop]`. Cloze scoring and CogView reranking, which know their answers and need no cache,
are in wudao.model.cloze. Token ids come from the caller's `SpecialIds` (wudao.data.glm), never from here.
Shape suffixes: B samples, T tokens, A Part A tokens, D model width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from wudao.model.attention import KVCache
from wudao.model.glm import GLMModel
from wudao.model.prompts import Prompts


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


def _encode_part_a(model: GLMModel, a_1A: torch.Tensor, extra: int, prompts: Prompts | None = None) -> KVCache:
    """Run Part A (bidirectional: sep = its length) once into a fresh batch-1 cache with room for `extra` more."""
    cache = model.new_kv_cache(1, a_1A.size(1) + extra)
    model.hidden(a_1A, sep_B=torch.tensor([a_1A.size(1)], device=a_1A.device), kv_cache=cache, prompts=prompts)
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
    prompts: Prompts | None = None,
) -> list[list[int]]:
    """Generate the content of the blank in `part_a`; one token list per sample, `[eop]` not included.

    `vocab_range=(lo, hi)` restricts sampling to ids lo..hi-1 (image codes). `use_cache=False` recomputes
    the whole sequence every step (the reference the cache is tested and benchmarked against). `prompts`: a
    tuned adapter's continuous prompts, read in every pass.
    """
    mask_pos = find_blank(part_a, ids) if mask_pos is None else mask_pos
    B = num_samples
    a_1A = torch.tensor([list(part_a)], device=model.tok_emb.weight.device)
    sep_B = torch.full((B,), a_1A.size(1), device=a_1A.device)
    cache = _encode_part_a(model, a_1A, max_new_tokens + 1, prompts).repeat(B) if use_cache else None
    part_b_BT = torch.full((B, 1), ids.sop, device=a_1A.device)
    done_B = torch.zeros(B, dtype=torch.bool, device=a_1A.device)
    for step in range(max_new_tokens):
        if use_cache:
            pos_BT, block_BT = _part_b(part_b_BT[:, -1:], mask_pos, step + 1)
            logits_BV = model(part_b_BT[:, -1:], pos_BT, block_BT, sep_B, cache, prompts=prompts).logits_BTV[:, -1]
        else:
            pos_BT, block_BT = _part_b(part_b_BT, mask_pos, 1)
            a_BA = a_1A.expand(B, -1)
            a_pos_BA = torch.arange(a_BA.size(1), device=a_BA.device).expand_as(a_BA)
            h_BTD, _ = model.hidden(
                torch.cat([a_BA, part_b_BT], 1),
                torch.cat([a_pos_BA, pos_BT], 1),
                torch.cat([torch.zeros_like(a_BA), block_BT], 1),
                sep_B,
                prompts=prompts,
            )
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


def continue_text(
    model: GLMModel,
    prompt: Sequence[int],
    ids: BlankIds,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    generator: torch.Generator | None = None,
    prompts: Prompts | None = None,
) -> list[int]:
    """GLM text continuation: the prompt followed by `[gMASK]` (the document-level objective), then generate."""
    part_a = [*prompt, ids.gmask]
    return fill_blank(
        model,
        part_a,
        ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        mask_pos=len(prompt),
        generator=generator,
        prompts=prompts,
    )[0]


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
    rows = fill_blank(
        model,
        prompt,
        ids,
        max_new_tokens=n_codes,
        sampling=sampling,
        num_samples=num_samples,
        stop_at_eop=False,
        vocab_range=(code_offset, code_offset + codebook_size),
        generator=generator,
    )
    return torch.tensor(rows) - code_offset
