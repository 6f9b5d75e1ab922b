"""The GLM objective mixture, defined once: the training settings (`[train.objective]`) and the sample builder
(`wudao.data.glm`) both read it. Numpy-only and torch-free, so the settings tree can use it.

Defaults are GLM-10B's (THUDM/GLM): token spans with probability 0.5, sentence spans 0.3, else document-level
generation, 15 % of tokens masked. The platform trains with its own recipe (`TrainSettings.objective`).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["token", "sentence", "document"]


class GLMObjective(BaseModel):
    """Which blank-infilling objective a batch uses, and how its spans are drawn."""

    model_config = ConfigDict(frozen=True)

    token_prob: float = Field(0.5, ge=0.0, le=1.0)
    """Probability a batch uses token spans ([MASK]); GLM-10B 0.5. Only Part B carries a loss: a token-span step
    trains on ~mask_ratio of its tokens, a document step on ~60 %, so on a small budget the document objective
    teaches facts several times faster (bench/learning.py)."""
    sentence_prob: float = Field(0.3, ge=0.0, le=1.0)
    """Probability a batch uses sentence spans ([sMASK]); the rest is document-level generation ([gMASK])."""
    mask_ratio: float = Field(0.15, gt=0.0, lt=1.0)
    """Share of maskable tokens that token or sentence spans cover (GLM: 0.15). Only masked tokens carry a loss,
    so on a small compute budget a larger share learns more per step."""
    poisson_lambda: float = Field(3.0, gt=0.0)
    """Mean of the Poisson span-length distribution (token objective)."""
    max_span_len: int = Field(39, ge=1)
    """Span lengths are Poisson truncated to 1..max_span_len (renormalised, as GLM does)."""
    gen_min_ratio: float = Field(0.25, gt=0.0, le=1.0)
    """Document objective: the generated suffix is at least this share of the document."""

    @model_validator(mode="after")
    def _probabilities_sum_to_at_most_one(self) -> GLMObjective:
        if self.token_prob + self.sentence_prob > 1:
            raise ValueError("token_prob and sentence_prob must be ≥ 0 and sum to at most 1")
        return self

    def draw(self, rng: np.random.Generator) -> Kind:
        u = rng.random()
        if u < self.token_prob:
            return "token"
        return "sentence" if u < self.token_prob + self.sentence_prob else "document"

    def span_length_probs(self) -> np.ndarray:
        """Truncated Poisson pmf over lengths 1..max_span_len (log-space: no factorial overflow)."""
        k = np.arange(1, self.max_span_len + 1)
        logp = k * math.log(self.poisson_lambda) - np.array([math.lgamma(i + 1) for i in k])
        p = np.exp(logp - logp.max())
        return p / p.sum()


GLM_10B = GLMObjective()
"""GLM-10B's mixture: what held-out loss is measured with, so it compares across versions whatever the recipe."""
