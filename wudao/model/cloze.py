"""Cloze scoring with a GLM model (GLM's ClozeModel), and CogView reranking built on it.

Generation (wudao.model.generation) grows Part B from a KV cache; cloze scoring knows its answers, so every
prompt's Part A and all its candidates (a prefix tree under tree attention) go through one batched forward, no
cache. `cloze_scores` / `cloze_scores_many` score the candidates of one / many prompts, `cloze_score_matrix` is the
same scores as one differentiable (N, C) forward (a verbalizer for prompt tuning), `rerank` is CogView's
self-reranking. Token ids come from the caller's `SpecialIds` (wudao.data.glm), never from here.
Shape suffixes: R packed rows, T tokens, D model width, P trie nodes, S scored terms, V vocabulary, N prompts,
C candidates per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wudao.model.generation import BlankIds, find_blank
from wudao.model.glm import GLMModel
from wudao.model.prompts import Prompts


@dataclass(frozen=True)
class ClozeScore:
    sum: float
    """Σ log p(token | Part A, earlier answer tokens) over the answer's tokens and the `[eop]` that closes it."""
    mean: float
    """sum / number of scored tokens (answer tokens + 1 for `[eop]`)."""


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
