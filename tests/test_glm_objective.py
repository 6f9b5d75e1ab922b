"""GLM sample construction: spans stay inside documents, 2D positions, Part B targets, determinism, each objective."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from wudao.data.glm import (
    GLMBatch,
    GLMObjective,
    SpecialIds,
    build_glm_batch,
    document_bounds,
    glm_sample,
    sentence_end_ids,
)
from wudao.data.multimodal import cogview_batch, cogview_layout, cogview_prompt
from wudao.data.tokenizer import train_tokenizer

TEXTS = [
    "The capital of France is Paris. Paris lies on the Seine! Is it big? Yes; very.",
    "法国的首都是巴黎。巴黎很大！它在塞纳河边。",
    "A second document: with a colon, and a line\nthat breaks here.",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 3, vocab_size=320)


@pytest.fixture(scope="module")
def ids(tok):
    return SpecialIds.from_tokenizer(tok)


def packed_row(tok, ids, repeat: int = 2) -> np.ndarray:
    """Documents separated by [EOS], as a packed shard row holds them."""
    out: list[int] = []
    for _ in range(repeat):
        for t in TEXTS:
            out += tok.encode(t).ids + [ids.eos]
    return np.array(out, dtype=np.int64)


def part_b_blocks(batch: GLMBatch, b: int) -> list[tuple[int, int]]:
    """[start, end) of every Part B block of row b (a block starts where the block position is 1)."""
    blk, n = batch.block_position_ids_BT[b], int(batch.sep_B[b] + batch.loss_mask_BT[b].sum())
    starts = [t for t in range(int(batch.sep_B[b]), n) if blk[t] == 1]
    return list(zip(starts, [*starts[1:], n]))


def spans_of(batch: GLMBatch, b: int) -> list[tuple[int, list[int]]]:
    """(mask position in Part A, span tokens) for every Part B span of row b, in Part B order."""
    inp, pos = batch.input_ids_BT[b], batch.position_ids_BT[b]
    return [(int(pos[s]), inp[s + 1 : e].tolist()) for s, e in part_b_blocks(batch, b)]


def reconstruct(batch: GLMBatch, b: int, ids: SpecialIds) -> list[int]:
    """The source row, rebuilt by putting every Part B span back at its mask's position in Part A."""
    part_a = batch.input_ids_BT[b, : batch.sep_B[b]].tolist()
    by_pos = dict(spans_of(batch, b))
    masks = {ids.mask, ids.smask, ids.gmask}
    assert {i for i, t in enumerate(part_a) if t in masks} == set(by_pos), "one Part B span per mask token"
    out: list[int] = []
    for i, t in enumerate(part_a):
        out += by_pos[i] if i in by_pos else [t]
    return out


def test_special_ids_from_tokenizer_are_distinct(tok, ids):
    assert ids.mask == tok.token_to_id("[MASK]") and ids.eop == tok.token_to_id("[eop]")
    with pytest.raises(ValueError, match="distinct"):
        SpecialIds(**{**ids.__dict__, "eop": ids.gmask})


def test_sentence_end_ids(tok):
    ends = sentence_end_ids(tok)
    for ch in [".", "!", "?", ";", ":", "。", "！", "\n"]:
        if len(tok.encode(ch).ids) == 1:  # a mark left as raw bytes by BPE has no token of its own
            assert tok.encode(ch).ids[0] in ends, ch
    assert tok.encode("。").ids[0] in ends
    assert tok.encode("Paris").ids[-1] not in ends


@pytest.mark.parametrize("kind", ["token", "sentence", "document"])
def test_sample_invariants(tok, ids, kind):
    rows = [packed_row(tok, ids), packed_row(tok, ids, repeat=1)]
    seq_len = int(len(rows[0]) * 1.4)
    rng = np.random.default_rng(0)
    batch = build_glm_batch(rows, ids, seq_len, rng, sentence_ends=sentence_end_ids(tok), kind=kind)
    assert batch.kind == kind and batch.input_ids_BT.shape == (2, seq_len)
    mask_id = ids.mask_for(kind)
    for b, row in enumerate(rows):
        sep = int(batch.sep_B[b])
        inp, tgt = batch.input_ids_BT[b], batch.target_ids_BT[b]
        loss, blk, pos = batch.loss_mask_BT[b], batch.block_position_ids_BT[b], batch.position_ids_BT[b]
        assert reconstruct(batch, b, ids) == row.tolist()
        # Part A: positions 0..sep-1, block 0, no loss, only this objective's mask token.
        assert (pos[:sep] == np.arange(sep)).all() and (blk[:sep] == 0).all() and not loss[:sep].any()
        assert not np.isin(inp[:sep], [m for m in (ids.mask, ids.smask, ids.gmask) if m != mask_id]).any()
        # Part B: [sop] + span -> span + [eop]; the loss covers exactly Part B, padding follows.
        n_b = int(loss.sum())
        assert loss[sep : sep + n_b].all() and (inp[sep + n_b :] == ids.pad).all()
        for s, e in part_b_blocks(batch, b):
            assert inp[s] == ids.sop and (tgt[s : e - 1] == inp[s + 1 : e]).all() and tgt[e - 1] == ids.eop
            assert (blk[s:e] == np.arange(1, e - s + 1)).all() and (pos[s:e] == pos[s]).all()
        # Every span lies inside one document: no [EOS] in it.
        for mask_pos, span in spans_of(batch, b):
            assert span and ids.eos not in span and inp[mask_pos] == mask_id


def test_token_spans_lengths_gaps_and_ratio(tok, ids):
    row = packed_row(tok, ids, repeat=4)
    maskable = sum(e - s for s, e in document_bounds(row, ids))
    for seed in range(5):
        batch = build_glm_batch([row], ids, 2 * len(row), np.random.default_rng(seed), kind="token")
        part_a = batch.input_ids_BT[0, : batch.sep_B[0]]
        spans = spans_of(batch, 0)
        assert all(1 <= len(s) <= 39 for _, s in spans)
        assert sum(len(s) for _, s in spans) >= math.ceil(0.15 * maskable)
        mask_at = np.flatnonzero(part_a == ids.mask)
        assert (np.diff(mask_at) >= 2).all(), "spans are at least one token apart"


def test_sentence_spans_are_whole_sentences(tok, ids):
    ends = sentence_end_ids(tok)
    row = packed_row(tok, ids)
    maskable = sum(e - s for s, e in document_bounds(row, ids))
    batch = build_glm_batch([row], ids, 2 * len(row), np.random.default_rng(3), sentence_ends=ends, kind="sentence")
    part_a = batch.input_ids_BT[0, : batch.sep_B[0]].tolist()
    spans = spans_of(batch, 0)
    assert sum(len(s) for _, s in spans) >= math.ceil(0.15 * maskable)
    for mask_pos, span in spans:
        before = part_a[mask_pos - 1] if mask_pos > 0 else ids.eos
        assert before in ends | {ids.eos, ids.smask}, "a sentence starts a document or follows a sentence end"
        after = part_a[mask_pos + 1] if mask_pos + 1 < len(part_a) else ids.eos
        assert span[-1] in ends or after == ids.eos, "a sentence ends with its end token or the document"


def test_document_objective_masks_a_suffix_of_every_document(tok, ids):
    row = packed_row(tok, ids)
    bounds = document_bounds(row, ids)
    batch = build_glm_batch([row], ids, 2 * len(row), np.random.default_rng(4), kind="document")
    spans = spans_of(batch, 0)
    assert len(spans) == len(bounds)
    part_a = batch.input_ids_BT[0, : batch.sep_B[0]]
    assert (part_a[np.flatnonzero(part_a == ids.gmask) + 1] == ids.eos).all(), "the blank runs to the document end"
    lengths = sorted(len(s) for _, s in spans)
    docs = sorted(e - s for s, e in bounds)
    assert all(math.ceil(0.25 * d) <= n <= max(docs) for n, d in zip(lengths, docs))


def test_deterministic_given_a_seed_and_objective_mixture(tok, ids):
    rows = [packed_row(tok, ids)] * 2
    a, b, c = (build_glm_batch(rows, ids, 400, np.random.default_rng(s)) for s in (7, 7, 8))
    for name in ("input_ids_BT", "position_ids_BT", "block_position_ids_BT", "target_ids_BT", "loss_mask_BT", "sep_B"):
        assert (getattr(a, name) == getattr(b, name)).all()
    assert (a.input_ids_BT != c.input_ids_BT).any()
    rng = np.random.default_rng(0)
    counts = Counter(GLMObjective().draw(rng) for _ in range(4000))
    assert counts["token"] / 4000 == pytest.approx(0.5, abs=0.03)
    assert counts["sentence"] / 4000 == pytest.approx(0.3, abs=0.03)
    assert counts["document"] / 4000 == pytest.approx(0.2, abs=0.03)
    assert GLMObjective(token_prob=1.0, sentence_prob=0.0).draw(rng) == "token"


def test_spans_that_do_not_fit_are_dropped_whole(ids):
    tokens = np.arange(100, 120)
    spans = [(0, 2), (4, 6), (8, 10), (12, 14)]
    row = glm_sample(tokens, spans, ids.mask, ids, seq_len=24, rng=np.random.default_rng(0))
    assert int(row["loss_mask_BT"].sum()) == 2 * 3, "20 tokens + 2 per span fit 2 spans in 24"
    with pytest.raises(ValueError):
        glm_sample(tokens, [], ids.mask, ids, seq_len=10, rng=np.random.default_rng(0))


def test_tensors_are_the_loss_keywords(tok, ids):
    batch = build_glm_batch([packed_row(tok, ids)], ids, 400, np.random.default_rng(0))
    t = batch.tensors()
    assert set(t) == {
        "input_ids_BT",
        "position_ids_BT",
        "block_position_ids_BT",
        "sep_B",
        "target_ids_BT",
        "loss_mask_BT",
        "real_BT",
    }
    assert t["loss_mask_BT"].dtype.is_floating_point is False and t["input_ids_BT"].dtype.itemsize == 8
    # real_BT marks exactly the non-padding positions (what MoE layers route), and there is padding to mark.
    assert (t["real_BT"] == (t["input_ids_BT"] != ids.pad)).all() and not t["real_BT"].all()


def test_cogview_layout_and_prompt(ids):
    caption, codes, offset = [200, 201, 202], np.arange(16).reshape(4, 4), 1000
    tokens, (s, e) = cogview_layout(caption, codes, ids, offset)
    assert tokens.tolist() == [ids.roi, *caption, ids.base, ids.boi, *range(1000, 1016), ids.eoi]
    assert tokens[s:e].tolist() == list(range(1000, 1016))
    assert cogview_prompt(ids, offset, caption=caption) == [ids.roi, *caption, ids.base, ids.boi, ids.gmask, ids.eoi]
    back = cogview_prompt(ids, offset, codes=codes, image_first=True)
    assert back == [ids.boi, *range(1000, 1016), ids.eoi, ids.roi, ids.gmask, ids.base]
    batch = cogview_batch([(caption, codes)], ids, offset, 32, np.random.default_rng(0))
    sep = int(batch.sep_B[0])
    assert batch.input_ids_BT[0, :sep].tolist() == cogview_prompt(ids, offset, caption=caption)
    assert batch.target_ids_BT[0, sep : sep + 17].tolist() == [*range(1000, 1016), ids.eop]
