"""The training mixture: the new slice, replay of earlier slices, and image-caption pairs, as GLM samples.

Every sample is a pure function of (seed, global sample index) and every step's objective of (seed, step), so
a resumed run continues at exactly the next sample, on any number of processes: rank r of W takes samples
`step * batch_size + r * batch_size / W + j`. The loader's whole state is therefore the step counter.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from wudao.data.glm import GLMBatch, GLMObjective, SpecialIds, choose_spans, glm_sample, stack_rows
from wudao.data.multimodal import cogview_layout
from wudao.data.slices import SliceTokens

IMAGE = "image"


def pngs_to_tensor(pngs: list[bytes], size: int) -> torch.Tensor:
    """(N, 3, size, size) floats in [0, 1]."""
    from PIL import Image

    arrays = [
        np.asarray(Image.open(io.BytesIO(p)).convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
        for p in pngs
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class ImagePairs:
    """Caption token ids and VQ codes of image-caption pairs (codes are computed once per run)."""

    captions: list[list[int]]
    codes_NHW: np.ndarray
    code_offset: int | None = None
    """First image-code token id (the text vocabulary size); `train` fills it in from the run's tokenizer."""


class MixtureLoader:
    """GLM batches for given steps and ranks; see the module docstring for the determinism contract."""

    def __init__(
        self,
        new: SliceTokens,
        old: list[SliceTokens],
        *,
        ids: SpecialIds,
        sentence_ends: frozenset[int],
        seq_len: int,
        seed: int,
        replay_fraction: float,
        slice_weights: dict[str, float],
        objective: GLMObjective,
        image_ratio: float = 0.0,
        images: ImagePairs | None = None,
        image_seq_len: int | None = None,
    ):
        old = [s for s in old if len(s.tokens) > 0]
        self.images = images if images is not None and len(images.captions) else None
        if len(new.tokens) == 0:
            # A slice of images only: its text steps replay the earlier slices; without any, every step is an image.
            if old:
                new, old = old[-1], old[:-1]
            elif self.images is not None:
                image_ratio = 1.0
            else:
                raise ValueError(f"slice {new.slice_id} has no training tokens and no images (is there a VQ model?)")
        self.new, self.old = new, old
        self.ids, self.sentence_ends, self.seq_len, self.seed = ids, sentence_ends, seq_len, seed
        self.replay = replay_fraction if self.old else 0.0
        weights = np.array([slice_weights.get(s.slice_id, 1.0) for s in self.old], dtype=np.float64)
        self.old_p = weights / weights.sum() if len(weights) else weights
        self.objective = objective
        self.image_ratio = image_ratio if self.images is not None else 0.0
        self.image_seq_len = image_seq_len or seq_len
        # Source rows leave room for the mask and [sop] tokens that GLM adds (2 per span, a span being
        # poisson_lambda tokens on average): 0.85 of seq_len at GLM's 15 %, shorter rows for larger mask ratios.
        share = min(0.85, 0.95 / (1 + 2 * objective.mask_ratio / objective.poisson_lambda))
        self.row_len = max(8, int(seq_len * share))

    def row_tokens(self, kind: str) -> int:
        """Length of every row of a step of `kind` (image steps may use their own length)."""
        return self.image_seq_len if kind == IMAGE else self.seq_len

    def step_kind(self, step: int) -> str:
        rng = np.random.default_rng([self.seed, 1, step])
        if rng.random() < self.image_ratio:
            return IMAGE
        return self.objective.draw(rng)

    def source_of(self, index: int) -> str:
        """Which slice sample `index` of a text step reads (exposed so tests can check the replay share)."""
        rng = np.random.default_rng([self.seed, 2, index])
        if rng.random() < self.replay:
            return self.old[int(rng.choice(len(self.old), p=self.old_p))].slice_id
        return self.new.slice_id

    def _text_row(self, index: int, kind: str) -> dict[str, np.ndarray]:
        source_id = self.source_of(index)
        src = self.new if source_id == self.new.slice_id else next(s for s in self.old if s.slice_id == source_id)
        rng = np.random.default_rng([self.seed, 3, index])
        start = int(rng.integers(len(src.tokens)))
        tokens = src.tokens[(start + np.arange(self.row_len)) % len(src.tokens)].astype(np.int64)
        spans = choose_spans(tokens, kind, self.ids, rng, self.objective, self.sentence_ends)
        return glm_sample(tokens, spans, self.ids.mask_for(kind), self.ids, self.seq_len, rng)

    def _image_row(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 4, index])
        i = int(rng.integers(len(self.images.captions)))
        budget = self.image_seq_len - self.images.codes_NHW[i].size - 8
        caption = self.images.captions[i][: max(1, budget)]
        # Both directions, as CogView: caption -> image, and image -> caption (used for self-reranking).
        tokens, span = cogview_layout(
            caption, self.images.codes_NHW[i], self.ids, self.images.code_offset, image_first=bool(rng.random() < 0.5)
        )
        return glm_sample(tokens, [span], self.ids.gmask, self.ids, self.image_seq_len, rng)

    def batch(self, step: int, indices: range) -> GLMBatch:
        kind = self.step_kind(step)
        rows = [self._image_row(i) if kind == IMAGE else self._text_row(i, kind) for i in indices]
        return stack_rows(rows, kind)


def sample_indices(step: int, batch_size: int, rank: int, world: int, micro: int) -> list[range]:
    """The micro-batches (ranges of global sample indices) that `rank` processes at `step`."""
    per_rank = batch_size // world
    first = step * batch_size + rank * per_rank
    return [range(first + m, first + min(m + micro, per_rank)) for m in range(0, per_rank, micro)]
