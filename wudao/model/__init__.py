"""Model architecture only: no I/O, no MLflow, no Prefect. Imports nothing from the rest of `wudao`."""

from wudao.model.attention import KVCache
from wudao.model.generation import (
    ClozeScore,
    Sampling,
    cloze_scores,
    continue_text,
    fill_blank,
    rerank,
    sample_image_codes,
)
from wudao.model.glm import GLMAux, GLMConfig, GLMLoss, GLMModel, GLMOutput
from wudao.model.moe import MoE, MoEStats
from wudao.model.vq import VQVAE, VQConfig, VQOutput

__all__ = [
    "ClozeScore", "GLMAux", "GLMConfig", "GLMLoss", "GLMModel", "GLMOutput", "KVCache", "MoE", "MoEStats",
    "Sampling", "VQConfig", "VQOutput", "VQVAE",
    "cloze_scores", "continue_text", "fill_blank", "rerank", "sample_image_codes",
]  # fmt: skip
