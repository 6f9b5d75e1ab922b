"""The shape of a GLM, defined once: the settings tree (`[model]` in wudao.toml, `WUDAO_MODEL__*`) and the model
both read it. Torch-free, so configuration never imports torch.

`GLMShape` is what a user chooses (with the platform's defaults: a small MoE model that learns the demo on a
laptop CPU); `GLMConfig` adds what the platform derives (the vocabulary) and the rarely changed internals.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GLMShape(BaseModel):
    """Shape of a GLM trained from scratch (a continued model keeps its parent's shape). See wudao/model/glm.py."""

    model_config = ConfigDict(frozen=True)

    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block; must divide d_model."""
    max_seq_len: int = 128
    """Longest sequence (Part A + Part B) the absolute position table covers."""
    layer_order: Literal["pre", "sandwich"] = "pre"
    """`pre` (x + f(LN(x))) or CogView's `sandwich` (x + LN(f(LN(x)))), which keeps deep or bf16 training stable.
    Small fp32 models learn faster with `pre` (bench/learning.py: 300 steps, loss 1.65 vs 1.99)."""
    pb_relax: bool = False
    """CogView PB-relax: attention as softmax(((Q/(α√d))Kᵀ − max)·α) and LayerNorm inputs scaled by 8/max|x|
    (overflow-free bf16/fp16 at scale)."""
    moe_every: int = Field(2, ge=0)
    """Every N-th block's FFN is a Mixture-of-Experts layer (blocks N-1, 2N-1, …); 0 = dense."""
    n_experts: int = Field(4, ge=1)
    """Experts per MoE layer."""
    top_k: int = Field(2, ge=1)
    """Experts per token (1 = Switch, 2 = GShard)."""
    capacity_factor: float | None = None
    """Expert capacity ⌈factor·N·K/E⌉ in training, overflow dropped (GShard 1.2); None = dropless."""
    eval_capacity_factor: float | None = None
    """Capacity factor in evaluation and generation (GShard 2.4); None = same as `capacity_factor`."""
    router_jitter: float = Field(0.0, ge=0.0, lt=1.0)
    """Switch router jitter: router inputs scaled by U(1-ε, 1+ε) in training (exploration); 0 = off."""
    aux_loss_weight: float = 0.01
    """Weight of each MoE layer's load-balancing loss, summed over layers (ST-MoE; Switch 0.01, MegaBlocks 0.1)."""
    z_loss_weight: float = 1e-3
    """Weight of each MoE layer's router z-loss, summed over layers (ST-MoE)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GLMShape:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        return self


class GLMConfig(GLMShape):
    """Everything `GLMModel` is built from (and what a checkpoint's `config.json` records)."""

    vocab_size: int
    """Output classes: text vocabulary plus image codes (codes are offset past the text vocabulary)."""
    max_block_len: int | None = None
    """Rows of the block position table minus one (longest span + [sop]); None = max_seq_len."""
    ffn_hidden: int | None = None
    """Hidden width of the dense FFN; None = 4 · d_model."""
    pb_alpha: float = 32.0
    """α of PB-relax attention."""
    tie_embeddings: bool = True
    """Output projection = token embedding transposed (fewer parameters, better on small data)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    moe_hidden: int | None = None
    """Hidden width of each expert; None = ffn_hidden (so top-2 doubles the active FFN FLOPs)."""

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 4 * self.d_model

    def is_moe(self, layer: int) -> bool:
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()
