"""Generation with a GLM model: blank filling, text continuation, image codes, cloze scoring, CogView reranking.

Every task is the same move. Part A (a prompt holding one `[MASK]` / `[sMASK]` / `[gMASK]`) is encoded once
into a KV cache; Part B starts with `[sop]` at the blank's position (block position 1, 2, …) and grows one
token at a time until `[eop]`. Cloze scoring is the exception: it knows its answers, so every prompt's Part A
and all its candidates (a prefix tree under tree attention) go through one batched forward, no cache. Token ids
come from the caller's `SpecialIds` (wudao.data.glm), never from here.
Shape suffixes: B candidates/samples, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
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


@dataclass(frozen=True)
class ClozeScore:
    sum: float
    """Σ log p(token | Part A, earlier answer tokens) over the answer's tokens and the `[eop]` that closes it."""
    mean: float
    """sum / number of scored tokens (answer tokens + 1 for `[eop]`)."""


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


@torch.no_grad()
def cloze_scores(
    model: GLMModel,
    part_a: Sequence[int],
    ids: BlankIds,
    candidates: Sequence[Sequence[int]],
    mask_pos: int | None = None,
    prompts: Prompts | None = None,
) -> list[ClozeScore]:
    """Log-probability of each candidate answer inside the blank of one Part A (GLM ClozeModel), `[eop]` included.

    One Part A with many candidates is the single-prompt case of `cloze_scores_many`.
    """
    mask = None if mask_pos is None else [mask_pos]
    return cloze_scores_many(model, [part_a], ids, [candidates], mask_pos=mask, prompts=prompts)[0]


@dataclass
class _AnswerTrie:
    """Candidates sharing prefixes packed as one Part B: node 0 is `[sop]`, every other node one answer token.

    A candidate is a path from the root; its score sums, along the path, the log-probability of each next token
    at the node before it, and of `[eop]` at its last node. Each node is computed (and projected to V) once
    however many candidates share it, which is where the time of a closed-answer probe goes.
    """

    tokens: list[int]
    """Input token of each node ([sop] first); parents come before children."""
    depth: list[int]
    """Block position of each node: 1 for [sop], 2 for an answer's first token, ..."""
    sees: np.ndarray
    """(N, N) bool: node i attends node j iff j is i or an ancestor of i (causal along the path only)."""
    score_node: np.ndarray
    """(S,) node whose output predicts a scored token; S = Σ (len(candidate) + 1)."""
    score_target: np.ndarray
    """(S,) the token it is scored against: a candidate's next token, or [eop] after its last."""
    score_candidate: np.ndarray
    """(S,) index of the candidate (in the caller's list) the term belongs to."""

    @classmethod
    def build(cls, candidates: list[tuple[int, Sequence[int]]], sop: int, eop: int) -> _AnswerTrie:
        tokens, depth, parent, children = [sop], [1], [-1], [{}]
        scored = []  # (node, target, candidate)
        for index, cand in candidates:
            node = 0
            for t in cand:
                scored.append((node, t, index))
                if t not in children[node]:
                    children[node][t] = len(tokens)
                    tokens.append(t)
                    depth.append(depth[node] + 1)
                    parent.append(node)
                    children.append({})
                node = children[node][t]
            scored.append((node, eop, index))
        sees = np.zeros((len(tokens), len(tokens)), dtype=bool)
        for i, p in enumerate(parent):  # parents come first, so their rows are complete
            if p >= 0:
                sees[i] = sees[p]
            sees[i, i] = True
        node_S, target_S, cand_S = (np.array(x, dtype=np.int64) for x in zip(*scored))
        return cls(tokens, depth, sees, node_S, target_S, cand_S)


def _tries(candidates: Sequence[Sequence[int]], sop: int, eop: int, max_nodes: int) -> list[_AnswerTrie]:
    """The candidates as tries of at most `max_nodes` nodes each (sorted first, so shared prefixes stay together)."""
    order = sorted(range(len(candidates)), key=lambda i: list(candidates[i]))
    groups, group, size = [], [], 1
    for i in order:
        if group and size + len(candidates[i]) > max_nodes:
            groups.append(group)
            group, size = [], 1
        group.append((i, candidates[i]))
        size += len(candidates[i])  # an upper bound: shared prefixes take fewer nodes
    groups.append(group)
    return [_AnswerTrie.build(g, sop, eop) for g in groups]


@torch.no_grad()
def cloze_scores_many(
    model: GLMModel,
    part_as: Sequence[Sequence[int]],
    ids: BlankIds,
    candidates: Sequence[Sequence[Sequence[int]]],
    *,
    mask_pos: Sequence[int] | None = None,
    max_tokens: int = 16384,
    max_nodes: int = 128,
    prompts: Prompts | None = None,
) -> list[list[ClozeScore]]:
    """Cloze scores of many prompts at once: `candidates[i]` are the answers for the blank of `part_as[i]`.

    Each candidate is scored as GLM does, `Part A + [sop] + candidate` against `candidate + [eop]` (without
    `[eop]` a prefix of an answer always outscores the whole answer), and the numbers equal one full forward
    per candidate. What is shared is computed once: one row per prompt holds its Part A and all its candidates as
    a trie (tree attention: a node sees Part A and its own path, nothing else), rows are sorted by length and
    packed into padded forwards of at most `max_tokens` tokens, and no KV cache is copied. Pass the same list
    object for prompts that share an answer space: its tries are built once. A trie is split into rows of at
    most `max_nodes` nodes so that attention stays small for large answer spaces.

    With a capacity-limited MoE in eval mode (dropping tokens) results depend on the batch, as with any batched
    forward; a dropless MoE (the default) is exact. `prompts` (a tuned adapter's) apply to every row.
    """
    if not part_as:
        return []
    blanks, rows = _cloze_rows(model, part_as, ids, candidates, mask_pos, max_nodes)
    length = [len(part_as[i]) + len(trie.tokens) for i, trie in rows]
    order = sorted(range(len(rows)), key=length.__getitem__)
    sums = [np.zeros(len(c)) for c in candidates]
    start = 0
    while start < len(order):
        # Sorted by length, so the chunk's last row is its longest: grow while rows x longest fits the budget.
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * length[order[stop]] <= max_tokens:
            stop += 1
        chunk = [(part_as[rows[r][0]], blanks[rows[r][0]], rows[r][1]) for r in order[start:stop]]
        for r, terms in zip(order[start:stop], _score_trie_rows(model, chunk, prompts)):
            i, trie = rows[r]
            np.add.at(sums[i], trie.score_candidate, terms)
        start = stop
    out = []
    for i, cands in enumerate(candidates):
        out.append([ClozeScore(float(s), float(s) / (len(c) + 1)) for s, c in zip(sums[i], cands)])
    return out


def _cloze_rows(
    model: GLMModel,
    part_as: Sequence[Sequence[int]],
    ids: BlankIds,
    candidates: Sequence[Sequence[Sequence[int]]],
    mask_pos: Sequence[int] | None,
    max_nodes: int,
) -> tuple[list[int], list[tuple[int, _AnswerTrie]]]:
    """Checked inputs of a cloze scoring: each prompt's blank position, and its (prompt index, trie) rows."""
    if len(candidates) != len(part_as):
        raise ValueError(f"{len(part_as)} prompts but {len(candidates)} candidate lists")
    if any(not cands for cands in candidates):  # an empty candidate is fine: it scores [eop] right after [sop]
        raise ValueError("every prompt needs candidates")
    blanks = [find_blank(a, ids) for a in part_as] if mask_pos is None else list(mask_pos)
    longest = max(len(a) + 1 + max(map(len, cands)) for a, cands in zip(part_as, candidates))
    if longest > model.cfg.max_seq_len:  # the length one candidate's own forward would have
        raise ValueError(f"a cloze row of {longest} tokens exceeds max_seq_len={model.cfg.max_seq_len}")
    tries: dict[int, list[_AnswerTrie]] = {}
    rows = []  # (prompt index, trie)
    for i, cands in enumerate(candidates):
        if id(cands) not in tries:
            tries[id(cands)] = _tries(cands, ids.sop, ids.eop, max_nodes)
        rows += [(i, trie) for trie in tries[id(cands)]]
    return blanks, rows


def cloze_score_matrix(
    model: GLMModel,
    part_as: Sequence[Sequence[int]],
    ids: BlankIds,
    candidates: Sequence[Sequence[Sequence[int]]],
    *,
    prompts: Prompts | None = None,
    max_nodes: int = 128,
) -> torch.Tensor:
    """(N, C) cloze scores as `cloze_scores_many` computes them (Σ log p of candidate + `[eop]` in the blank), as
    one differentiable forward: the logits of a verbalizer over a closed label set, for training prompts with
    cross-entropy (GLM's ClozeModel). C is the longest candidate list; shorter lists are padded with -inf."""
    blanks, rows = _cloze_rows(model, part_as, ids, candidates, None, max_nodes)
    logp_S, sizes = _trie_logprobs(model, [(part_as[i], blanks[i], trie) for i, trie in rows], prompts)
    C = max(len(c) for c in candidates)
    flat_S = torch.from_numpy(np.concatenate([i * C + trie.score_candidate for i, trie in rows])).to(logp_S.device)
    assert len(flat_S) == sum(sizes)
    scores_NC = torch.zeros(len(part_as) * C, device=logp_S.device).index_add(0, flat_S, logp_S).view(len(part_as), C)
    absent_NC = torch.arange(C)[None, :] >= torch.tensor([len(c) for c in candidates])[:, None]
    return scores_NC.masked_fill(absent_NC.to(scores_NC.device), float("-inf"))


def _score_trie_rows(
    model: GLMModel, rows: list[tuple[Sequence[int], int, _AnswerTrie]], prompts: Prompts | None = None
) -> list[np.ndarray]:
    """For rows (Part A, blank position, trie) in one padded forward: each trie's scored log-probabilities."""
    logp_S, sizes = _trie_logprobs(model, rows, prompts)
    return np.split(logp_S.detach().cpu().numpy(), np.cumsum(sizes)[:-1])


def _trie_logprobs(
    model: GLMModel, rows: list[tuple[Sequence[int], int, _AnswerTrie]], prompts: Prompts | None = None
) -> tuple[torch.Tensor, list[int]]:
    """The scored log-probabilities of all rows' tries, concatenated row by row (differentiable), and how many
    each row has."""
    device = model.tok_emb.weight.device
    R = len(rows)
    n_a = np.array([len(a) for a, _, _ in rows])
    n_b = np.array([len(trie.tokens) for _, _, trie in rows])
    T = int((n_a + n_b).max())
    # Padding: id 0 at position 0; no real query sees it (the mask below), so any valid id does.
    tokens_RT = np.zeros((R, T), dtype=np.int64)
    pos_RT = np.zeros((R, T), dtype=np.int64)
    block_RT = np.zeros((R, T), dtype=np.int64)
    # Every query sees Part A (Part A itself is bidirectional, as in GLM); a trie node also sees its own path.
    # Padding queries see Part A too, so that no softmax row is empty.
    sees_RTT = np.broadcast_to(np.arange(T) < n_a[:, None, None], (R, T, T)).copy()
    for r, (a, blank, trie) in enumerate(rows):
        b = slice(n_a[r], n_a[r] + n_b[r])
        tokens_RT[r, : n_a[r]] = a
        tokens_RT[r, b] = trie.tokens
        pos_RT[r, : n_a[r]] = np.arange(n_a[r])
        pos_RT[r, b] = blank  # GLM 2D positions: Part B sits at its blank, block positions count along the path
        block_RT[r, b] = trie.depth
        sees_RTT[r, b, b] = trie.sees
    x_RTD = model.embed(*(torch.from_numpy(a).to(device) for a in (tokens_RT, pos_RT, block_RT)), prompts)
    # GLMModel.hidden, with a tree mask in place of the Part A / causal one it builds from sep.
    mask_R1TT = torch.from_numpy(sees_RTT).to(device)[:, None]
    real_RT = torch.from_numpy(np.arange(T) < (n_a + n_b)[:, None]).to(device)  # padding is not routed (MoE)
    h_RTD, _ = model.run_blocks(x_RTD, mask_R1TT, real_BT=real_RT, prompts=prompts)
    # Every node is scored (a leaf predicts [eop]): project each once, in slices of ~4M logits so that a large
    # vocabulary does not need a (nodes, V) tensor of the whole chunk.
    in_b_RT = (np.arange(T) >= n_a[:, None]) & (np.arange(T) < (n_a + n_b)[:, None])
    h_PD = h_RTD[torch.from_numpy(in_b_RT).to(device)]  # row-major: row r's nodes start at offset[r]
    offset = np.concatenate([[0], np.cumsum(n_b)[:-1]])
    node_S = torch.from_numpy(np.concatenate([o + trie.score_node for o, (_, _, trie) in zip(offset, rows)])).to(device)
    target_S = torch.from_numpy(np.concatenate([trie.score_target for _, _, trie in rows])).to(device)
    logp_S = torch.empty(len(node_S), device=device)
    step = max(1, (1 << 22) // model.cfg.vocab_size)
    for s in range(0, h_PD.size(0), step):
        logits_PV = model.project(h_PD[s : s + step]).float()
        pick_S = ((node_S >= s) & (node_S < s + step)).nonzero().squeeze(-1)
        p_S = node_S[pick_S] - s
        # log_softmax then gather: on CPU its fused kernel is ~3x faster than logsumexp over the same logits.
        logp_S[pick_S] = logits_PV.log_softmax(-1)[p_S, target_S[pick_S]]
    return logp_S, [len(trie.score_node) for _, _, trie in rows]


def rerank(
    model: GLMModel, image_prompts: Sequence[Sequence[int]], caption: Sequence[int], ids: BlankIds
) -> tuple[int, list[float]]:
    """CogView self-reranking: score = Σ log p(caption + [eop] | image) for each candidate image; returns (best,
    scores). The same caption follows every image, so [eop] adds a term per image, not a length bias.

    Each prompt is an image-to-text Part A with a blank where the caption goes
    (`wudao.data.multimodal.cogview_prompt(..., image_first=True)`); all prompts are scored in batched forwards.
    """
    scores = [s[0].sum for s in cloze_scores_many(model, image_prompts, ids, [[caption]] * len(image_prompts))]
    return max(range(len(scores)), key=scores.__getitem__), scores
