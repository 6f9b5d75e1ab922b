"""GLM self-attention: the blank-infilling mask, PB-relax, LayerNorm that is safe in bf16, and a KV cache.

Shape suffixes: B batch, T query tokens, S key tokens (cache included), D model width, H heads, K head width.

The GLM mask is one rule: key j is visible to query i iff `j < sep` (Part A is bidirectional and everyone
sees it) or `j <= i` (causal inside Part B). With `sep = 0` it is a plain causal LM mask, and with a KV
cache the same rule holds on absolute positions, so cached decoding needs no special case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def glm_attention_mask(sep_B: torch.Tensor, q_start: int, n_query: int, n_key: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, S), True = may attend, for queries at absolute positions q_start..q_start+T-1."""
    device = sep_B.device
    q_T = torch.arange(q_start, q_start + n_query, device=device)
    k_S = torch.arange(n_key, device=device)
    causal_TS = k_S[None, :] <= q_T[:, None]
    part_a_BS = k_S[None, :] < sep_B[:, None]
    return (causal_TS[None] | part_a_BS[:, None, :])[:, None]


def with_prefix(mask_B1TS: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """The mask with `n_prefix` leading key columns every query may attend (P-tuning v2 prefix keys/values):
    the rule between real tokens is unchanged, Part A and Part B alike see the whole prefix."""
    if n_prefix == 0:
        return mask_B1TS
    B, _, T, _ = mask_B1TS.shape
    return torch.cat([mask_B1TS.new_ones(B, 1, T, n_prefix), mask_B1TS], -1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype; optional PB-relax input scaling (CogView).

    PB-relax divides x by max|x|/8 per token before normalising. LayerNorm is scale invariant (up to eps), so
    the output is unchanged, but in fp16/bf16 the squares inside the variance can no longer overflow.
    """

    def __init__(self, d: int, eps: float = 1e-5, pb_relax: bool = False):
        super().__init__(d, eps=eps)
        self.pb_relax = pb_relax

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.pb_relax:
            # Done in the input dtype on purpose: this is where a half-precision LN would overflow.
            x_BTD = x_BTD / (x_BTD.abs().amax(-1, keepdim=True).detach().clamp_min(1e-6) / 8)
        y_BTD = F.layer_norm(x_BTD.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y_BTD.to(x_BTD.dtype)


def pb_relax_attention(
    q_BHTK: torch.Tensor, k_BHSK: torch.Tensor, v_BHSK: torch.Tensor, mask_B1TS: torch.Tensor, alpha: float
) -> torch.Tensor:
    """softmax(QKᵀ/√K)·V computed as softmax(((Q/(α√K))Kᵀ − rowmax)·α)·V (CogView PB-relax).

    Scaling Q down by α before the product keeps QKᵀ small enough for fp16/bf16; subtracting the row max
    and scaling back by α gives the same softmax (it is shift invariant), and that last step runs in fp32.
    """
    K = q_BHTK.size(-1)
    scores_BHTS = ((q_BHTK / (alpha * math.sqrt(K))) @ k_BHSK.transpose(-2, -1)).float()
    scores_BHTS = scores_BHTS.masked_fill(~mask_B1TS, float("-inf"))
    scores_BHTS = (scores_BHTS - scores_BHTS.amax(-1, keepdim=True)) * alpha
    probs_BHTS = scores_BHTS.softmax(-1).to(v_BHSK.dtype)
    return probs_BHTS @ v_BHSK


@dataclass
class KVCache:
    """Keys and values of every layer, preallocated to `max_len` positions; `length` are filled.

    The model writes a forward pass's keys at [length, length + T) in every layer and then advances
    `length` once. Blank filling encodes Part A once and then feeds one Part B token at a time.
    """

    k_LBHSK: torch.Tensor
    v_LBHSK: torch.Tensor
    length: int = 0

    @classmethod
    def empty(
        cls,
        n_layers: int,
        batch: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k_LBHSK.size(3)

    def update(self, layer: int, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys/values for `layer`; return all keys/values so far, (B, H, S, K) each."""
        end = self.length + k_BHTK.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        self.k_LBHSK[layer, :, :, self.length : end] = k_BHTK
        self.v_LBHSK[layer, :, :, self.length : end] = v_BHTK
        return self.k_LBHSK[layer, :, :, :end], self.v_LBHSK[layer, :, :, :end]

    def repeat(self, n: int) -> KVCache:
        """A batch-`n` copy of a batch-1 cache: one shared prefix (Part A), n different continuations."""
        if self.k_LBHSK.size(1) != 1:
            raise ValueError("only a batch-1 cache can be repeated")
        return KVCache(self.k_LBHSK.repeat(1, n, 1, 1, 1), self.v_LBHSK.repeat(1, n, 1, 1, 1), self.length)


class GLMAttention(nn.Module):
    """Multi-head self-attention with the GLM mask; SDPA by default, the manual PB-relax path on request."""

    def __init__(self, d_model: int, n_heads: int, pb_relax: bool = False, pb_alpha: float = 32.0):
        super().__init__()
        self.n_heads = n_heads
        self.pb_relax = pb_relax
        self.pb_alpha = pb_alpha
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        x_BTD: torch.Tensor,
        mask_B1TS: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`prefix` = this layer's P-tuning v2 keys and values (H, P, K) each, put before the tokens' keys (the
        cache holds tokens only); `mask_B1TS` then has P leading columns (`with_prefix`)."""
        B, T, D = x_BTD.shape
        # (B, T, 3D) -> 3 x (B, H, T, K)
        q_BHTK, k_BHTK, v_BHTK = (
            t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in self.qkv(x_BTD).split(D, dim=-1)
        )
        k_BHSK, v_BHSK = (k_BHTK, v_BHTK) if cache is None else cache.update(layer, k_BHTK, v_BHTK)
        if prefix is not None:
            # In the activations' dtype: under bf16 autocast the projections are bf16, the trained prefix fp32.
            k_BHSK = torch.cat([prefix[0].to(k_BHSK.dtype).expand(B, -1, -1, -1), k_BHSK], 2)
            v_BHSK = torch.cat([prefix[1].to(v_BHSK.dtype).expand(B, -1, -1, -1), v_BHSK], 2)
        if self.pb_relax:
            out_BHTK = pb_relax_attention(q_BHTK, k_BHSK, v_BHSK, mask_B1TS, self.pb_alpha)
        else:
            out_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHSK, v_BHSK, attn_mask=mask_B1TS)
        return self.proj(out_BHTK.transpose(1, 2).reshape(B, T, D))
