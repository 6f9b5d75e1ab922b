"""CogView token layout for image-caption pairs, as GLM samples.

Image codes (VQ-VAE indices 0..codebook_size-1) become token ids `code_offset + code`, with `code_offset` = the
text vocabulary size, so the model's vocabulary is text + codebook. Layouts (CogView):

    text -> image:  [ROI] caption [BASE] [BOI] codes [EOI]
    image -> text:  [BOI] codes [EOI] [ROI] caption [BASE]

The part to generate (codes, or the caption) is the one `[gMASK]` span, so the same row trains generation
with `glm_sample` and, blanked out, is the prompt for sampling codes or for CogView self-reranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wudao.data.glm import GLMBatch, Span, SpecialIds, glm_sample, stack_rows


def cogview_layout(
    caption: Sequence[int], codes: np.ndarray, ids: SpecialIds, code_offset: int, image_first: bool = False
) -> tuple[np.ndarray, Span]:
    """Tokens of one pair and the span to generate (the codes for text->image, the caption for image->text)."""
    cap = np.asarray(caption, dtype=np.int64)
    img = np.asarray(codes, dtype=np.int64).reshape(-1) + code_offset
    if image_first:
        head = np.concatenate([[ids.boi], img, [ids.eoi, ids.roi]])
        return np.concatenate([head, cap, [ids.base]]), (len(head), len(head) + len(cap))
    head = np.concatenate([[ids.roi], cap, [ids.base, ids.boi]])
    return np.concatenate([head, img, [ids.eoi]]), (len(head), len(head) + len(img))


def blank_out(tokens: np.ndarray, span: Span, mask_id: int) -> list[int]:
    """Part A for generation: the span replaced by one mask token."""
    return [*tokens[: span[0]].tolist(), mask_id, *tokens[span[1] :].tolist()]


def cogview_prompt(
    ids: SpecialIds,
    code_offset: int,
    *,
    caption: Sequence[int] = (),
    codes: np.ndarray | None = None,
    image_first: bool = False,
) -> list[int]:
    """Text->image prompt from a caption, or image->text prompt from codes (reranking), with its [gMASK]."""
    placeholder = np.zeros(1, dtype=np.int64)
    if image_first:
        if codes is None:
            raise ValueError("an image-to-text prompt needs the image codes")
        tokens, span = cogview_layout(placeholder, codes, ids, code_offset, image_first=True)
    else:
        tokens, span = cogview_layout(caption, placeholder, ids, code_offset)
    return blank_out(tokens, span, ids.gmask)


def cogview_batch(
    pairs: Sequence[tuple[Sequence[int], np.ndarray]],
    ids: SpecialIds,
    code_offset: int,
    seq_len: int,
    rng: np.random.Generator,
    image_first: bool = False,
) -> GLMBatch:
    """A document-level ([gMASK]) GLM batch of (caption ids, codes) pairs."""
    rows = []
    for caption, codes in pairs:
        tokens, span = cogview_layout(caption, codes, ids, code_offset, image_first)
        rows.append(glm_sample(tokens, [span], ids.gmask, ids, seq_len, rng))
    return stack_rows(rows, "document")
