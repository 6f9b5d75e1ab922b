"""Continuous prompts for a frozen GLM: P-tuning v1 (input embeddings) and P-tuning v2 (deep prefix keys/values).

Shape suffixes: L layers, H heads, P prompt positions, K head width, D model width.

- **v1** (Liu et al. 2021, "GPT Understands, Too"): P pseudo tokens at the start of Part A whose input embeddings
  are trained. The caller puts P placeholder ids there (any id: their embeddings are replaced); they are ordinary
  Part A tokens from then on, so they attend and are attended bidirectionally, and MoE layers route them.
- **v2** (Liu et al. 2022, "P-Tuning v2"; Li & Liang 2021, prefix tuning): P trained keys and values in *every*
  layer, prepended to that layer's attention keys. They are not tokens: no position, no query, no FFN, so every
  query (Part A and Part B alike) may attend to them, the GLM mask between real tokens is unchanged, and MoE
  routers never see them.

The encoders are `nn.Module`s whose parameters are the whole adapter; `forward()` gives the `Prompts` a model
call takes (`GLMModel.hidden(..., prompts=...)`). An optional reparameterisation MLP (P-tuning v1's prompt encoder,
P-tuning v2's `prefix_projection`) trains better on some tasks; it is folded away at inference by calling
`forward()` once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Prompts:
    """Trained prompts for one forward pass; either or both kinds (the model checks the shapes)."""

    input_PD: torch.Tensor | None = None
    """v1: input embeddings that replace those of the first P Part A tokens (position ids and block position 0
    are added as for any token)."""
    key_LHPK: torch.Tensor | None = None
    """v2: per-layer prefix keys, prepended to the keys every query attends over."""
    value_LHPK: torch.Tensor | None = None
    """v2: per-layer prefix values, paired with `key_LHPK`."""

    @property
    def n_input(self) -> int:
        """Part A positions whose embeddings the prompt replaces (v1)."""
        return 0 if self.input_PD is None else self.input_PD.size(0)

    @property
    def n_prefix(self) -> int:
        """Prefix key/value entries in every layer (v2)."""
        return 0 if self.key_LHPK is None else self.key_LHPK.size(2)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer i's prefix (keys (H, P, K), values (H, P, K)), or None without a v2 prefix."""
        if self.key_LHPK is None or self.value_LHPK is None:
            return None
        return self.key_LHPK[i], self.value_LHPK[i]

    def detach(self) -> Prompts:
        """The same prompts cut from the encoder's graph (computed once for inference)."""
        return Prompts(*(None if t is None else t.detach() for t in (self.input_PD, self.key_LHPK, self.value_LHPK)))


def _reparam(width: int, hidden: int | None) -> nn.Module:
    """Identity, or a residual two-layer MLP (zero-initialised output, so training starts from the init)."""
    if not hidden:
        return nn.Identity()
    mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return _Residual(mlp)


class _Residual(nn.Module):
    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class PrefixEncoder(nn.Module):
    """P-tuning v2: trained keys and values for every layer, `prompt_len` entries each.

    `init_LHPK` pairs (keys, values) start the prefix at real activations (prefix tuning trains better from the
    keys/values of real tokens than from noise: Li & Liang 2021, §7.2); without them, N(0, 0.02).
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        head_dim: int,
        prompt_len: int,
        hidden: int | None = None,
        init_LHPK: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        if prompt_len < 1:
            raise ValueError("prompt_len must be at least 1")
        shape = (n_layers, n_heads, prompt_len, head_dim)
        if init_LHPK is None:
            init_LHPK = (torch.randn(shape) * 0.02, torch.randn(shape) * 0.02)
        if tuple(init_LHPK[0].shape) != shape or tuple(init_LHPK[1].shape) != shape:
            raise ValueError(f"prefix init must be keys and values of shape {shape}")
        self.key_LHPK = nn.Parameter(init_LHPK[0].detach().clone().float())
        self.value_LHPK = nn.Parameter(init_LHPK[1].detach().clone().float())
        # The reparameterisation acts on each (layer, position)'s keys and values across heads, as P-tuning v2's
        # prefix_projection maps one prefix vector to every layer's keys and values through an MLP.
        self.reparam = _reparam(2 * n_heads * head_dim, hidden)

    def forward(self) -> Prompts:
        L, H, P, K = self.key_LHPK.shape
        kv_LP2HK = torch.stack([self.key_LHPK, self.value_LHPK], 2).permute(0, 3, 2, 1, 4)  # (L, P, 2, H, K)
        kv_LP2HK = self.reparam(kv_LP2HK.reshape(L, P, 2 * H * K)).view(L, P, 2, H, K)
        return Prompts(key_LHPK=kv_LP2HK[:, :, 0].transpose(1, 2), value_LHPK=kv_LP2HK[:, :, 1].transpose(1, 2))


class InputPromptEncoder(nn.Module):
    """P-tuning v1: `prompt_len` trained input embeddings for the placeholder tokens at the start of Part A.

    `init_PD` starts them at real token embeddings (P-tuning initialises from the vocabulary); without it,
    N(0, 0.02) as the model's own embeddings start.
    """

    def __init__(self, d_model: int, prompt_len: int, hidden: int | None = None, init_PD: torch.Tensor | None = None):
        super().__init__()
        if prompt_len < 1:
            raise ValueError("prompt_len must be at least 1")
        if init_PD is None:
            init_PD = torch.randn(prompt_len, d_model) * 0.02
        if tuple(init_PD.shape) != (prompt_len, d_model):
            raise ValueError(f"prompt init must have shape {(prompt_len, d_model)}")
        self.input_PD = nn.Parameter(init_PD.detach().clone().float())
        self.reparam = _reparam(d_model, hidden)

    def forward(self) -> Prompts:
        return Prompts(input_PD=self.reparam(self.input_PD))
