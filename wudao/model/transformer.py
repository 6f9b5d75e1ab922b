"""The smallest real transformer LM the spine trains: pre-LN, causal self-attention, tied embeddings.

The GLM + MoE model (blank infilling, 2D positions, experts, Sandwich-LN) replaces it behind the same
`TransformerConfig` / `forward(ids_BT) -> logits_BTV` surface. Shape suffixes: B batch, T tokens, D model
width, H heads, K head width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    """Tokenizer vocabulary size (output classes)."""
    d_model: int = 64
    """Residual stream width."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; must divide d_model."""
    max_seq_len: int = 128
    """Rows of the learned position table."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q_BTD, k_BTD, v_BTD = self.qkv(self.ln_attn(x_BTD)).split(D, dim=-1)
        # (B, T, D) -> (B, H, T, K)
        q_BHTK, k_BHTK, v_BHTK = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q_BTD, k_BTD, v_BTD))
        attn_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)
        x_BTD = x_BTD + self.proj(attn_BHTK.transpose(1, 2).reshape(B, T, D))
        return x_BTD + self.mlp(self.ln_mlp(x_BTD))


class TransformerLM(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        B, T = ids_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        pos_T = torch.arange(T, device=ids_BT.device)
        x_BTD = self.tok_emb(ids_BT) + self.pos_emb(pos_T)
        for block in self.blocks:
            x_BTD = block(x_BTD)
        # Output projection tied to the input embedding: fewer parameters, better small-data perplexity.
        return self.ln_f(x_BTD) @ self.tok_emb.weight.T

    def loss(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over a batch of sequences."""
        logits_BTV = self(ids_BT[:, :-1])
        return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.size(-1)), ids_BT[:, 1:].reshape(-1))

    @torch.no_grad()
    def generate(self, ids_T: list[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
        """Greedy continuation of one prompt (the spine's generation; sampling comes with the GLM model)."""
        out = list(ids_T)
        for _ in range(max_new_tokens):
            window = torch.tensor([out[-self.cfg.max_seq_len :]])
            next_id = int(self(window)[0, -1].argmax())
            if next_id == stop_id:
                break
            out.append(next_id)
        return out[len(ids_T) :]
