"""The GLM transformer (blank infilling, 2D positions) with optional MoE FFNs, Sandwich-LN and PB-relax.

Shape suffixes: B batch, T tokens, D model width, V vocabulary, E experts, L MoE layers, N loss tokens.

Inputs follow GLM: Part A (text with blanks) then Part B (the blanks' contents, each after `[sop]`).
`position_ids_BT` are absolute positions in Part A (a Part B token carries its blank's position) and
`block_position_ids_BT` count 0 over Part A and 1.. inside each Part B span; two learned tables, summed.
`sep_B` is the Part A length of each row: Part A attends bidirectionally, Part B causally plus all of Part A.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wudao.model.attention import GLMAttention, KVCache, LayerNorm, glm_attention_mask, with_prefix
from wudao.model.config import GLMConfig
from wudao.model.moe import MoE, MoEStats
from wudao.model.prompts import Prompts


@dataclass
class GLMAux:
    """What a forward pass reports besides logits."""

    aux_loss: torch.Tensor
    """Weighted MoE losses to add to the LM loss, summed over MoE layers as ST-MoE does, so that every layer's
    router feels the same pull whatever the depth (0 for a dense model)."""
    load_balance_loss: torch.Tensor
    """Mean over MoE layers of E·Σ f_e·P_e (1 = balanced): the mean, so the logged figure reads the same at any
    depth."""
    z_loss: torch.Tensor
    """Mean over MoE layers of the router z-loss."""
    tokens_per_expert_LE: torch.Tensor
    """Assignments each expert processed, one row per MoE layer; (0, E) for a dense model. Padding is never
    routed, so a row sums to at most top_k x the real tokens."""
    dropped: torch.Tensor
    """Assignments dropped by capacity, summed over layers."""

    @classmethod
    def combine(cls, stats: list[MoEStats], cfg: GLMConfig, device: torch.device) -> GLMAux:
        if not stats:
            zero = torch.zeros((), device=device)
            return cls(zero, zero, zero, torch.zeros(0, cfg.n_experts, dtype=torch.long, device=device), zero.long())
        lb_L = torch.stack([s.load_balance_loss for s in stats])
        z_L = torch.stack([s.z_loss for s in stats])
        aux = (cfg.aux_loss_weight * lb_L + cfg.z_loss_weight * z_L).sum()
        return cls(
            aux,
            lb_L.mean(),
            z_L.mean(),
            torch.stack([s.tokens_per_expert_E for s in stats]),
            sum(s.dropped for s in stats),
        )


@dataclass
class GLMOutput:
    logits_BTV: torch.Tensor
    aux: GLMAux


@dataclass
class GLMLoss:
    loss: torch.Tensor
    """What to backpropagate: lm_loss + aux.aux_loss."""
    lm_loss: torch.Tensor
    """Mean cross-entropy over the Part B targets of the batch."""
    n_tokens: int
    """Number of target tokens the mean ran over."""
    aux: GLMAux = field(repr=False)


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x_BTD)))


class Block(nn.Module):
    def __init__(self, cfg: GLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        sandwich = cfg.layer_order == "sandwich"

        def norm() -> nn.Module:
            return LayerNorm(cfg.d_model, cfg.norm_eps, cfg.pb_relax)

        self.ln_attn_in, self.ln_ffn_in = norm(), norm()
        self.ln_attn_out = norm() if sandwich else nn.Identity()
        self.ln_ffn_out = norm() if sandwich else nn.Identity()
        self.attn = GLMAttention(cfg.d_model, cfg.n_heads, cfg.pb_relax, cfg.pb_alpha)
        if cfg.is_moe(layer):
            self.ffn: nn.Module = MoE(
                cfg.d_model,
                cfg.moe_hidden or cfg.hidden,
                cfg.n_experts,
                cfg.top_k,
                cfg.capacity_factor,
                cfg.eval_capacity_factor,
                cfg.router_jitter,
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.hidden)

    def forward(
        self,
        x_BTD: torch.Tensor,
        mask_B1TS: torch.Tensor,
        cache: KVCache | None,
        real_BT: torch.Tensor | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        h_BTD = x_BTD + self.ln_attn_out(self.attn(self.ln_attn_in(x_BTD), mask_B1TS, cache, self.layer, prefix))
        stats = None
        if isinstance(self.ffn, MoE):
            f_BTD, stats = self.ffn(self.ln_ffn_in(h_BTD), real_BT)
        else:
            f_BTD = self.ffn(self.ln_ffn_in(h_BTD))
        return h_BTD + self.ln_ffn_out(f_BTD), stats


class GLMModel(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        # Block position 0 (every Part A token, every token of a plain causal pass) adds nothing and learns
        # nothing. A learned row 0 is one vector added to almost every token: it collects the gradient of the
        # whole batch, outgrows the token embeddings within a few hundred steps at small-model learning rates
        # and, through LayerNorm, drowns which token is where (bench/learning.py: causal loss 2.2 vs 1.4 nats
        # after 200 steps with the same data, and facts were not learned).
        self.block_pos_emb = nn.Embedding((cfg.max_block_len or cfg.max_seq_len) + 1, cfg.d_model, padding_idx=0)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.d_model, cfg.norm_eps, cfg.pb_relax)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        with torch.no_grad():
            self.block_pos_emb.weight[0].zero_()  # _init drew it; padding_idx keeps it zero from here on
        # GPT-2: scale the residual-branch output projections so the residual stream does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "fc_out.weight", "w_out_EHD")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layers) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        cfg, p = self.cfg, self.tok_emb.weight
        return KVCache.empty(cfg.n_layers, batch, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads, p.dtype, p.device)

    def embed(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        block_position_ids_BT: torch.Tensor,
        prompts: Prompts | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Token + position + block position embeddings (B, T, D). With P-tuning v1 prompts, the first P tokens'
        embeddings are the prompt's: they must be in the pass that starts at position 0."""
        tok_BTD = self.tok_emb(input_ids_BT)
        n = prompts.n_input if prompts is not None else 0
        if n and start == 0:
            B, T, D = tok_BTD.shape
            if T < n:
                raise ValueError(f"a pass of {T} tokens cannot hold the {n} prompt positions")
            tok_BTD = torch.cat([prompts.input_PD.to(tok_BTD.dtype).expand(B, n, D), tok_BTD[:, n:]], 1)
        elif n and start < n:
            raise ValueError(f"prompt positions 0..{n - 1} must be in the first pass (this one starts at {start})")
        return tok_BTD + self.pos_emb(position_ids_BT) + self.block_pos_emb(block_position_ids_BT)

    def run_blocks(
        self,
        x_BTD: torch.Tensor,
        mask_B1TS: torch.Tensor,
        kv_cache: KVCache | None = None,
        real_BT: torch.Tensor | None = None,
        prompts: Prompts | None = None,
    ) -> tuple[torch.Tensor, GLMAux]:
        """Every block, then the final LN, under a mask over the tokens' keys (B, 1, T, S); P-tuning v2 prefix
        columns are added here. Callers that build their own mask (tree attention) start here."""
        n_prefix = prompts.n_prefix if prompts is not None else 0
        if n_prefix and prompts.key_LHPK.size(0) != len(self.blocks):
            raise ValueError(f"prefix has {prompts.key_LHPK.size(0)} layers, the model {len(self.blocks)}")
        mask_B1TS = with_prefix(mask_B1TS, n_prefix)
        stats = []
        for i, block in enumerate(self.blocks):
            x_BTD, s = block(x_BTD, mask_B1TS, kv_cache, real_BT, prompts.layer(i) if n_prefix else None)
            if s is not None:
                stats.append(s)
        return self.ln_f(x_BTD), GLMAux.combine(stats, self.cfg, x_BTD.device)

    def hidden(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor | None = None,
        block_position_ids_BT: torch.Tensor | None = None,
        sep_B: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        real_BT: torch.Tensor | None = None,
        prompts: Prompts | None = None,
    ) -> tuple[torch.Tensor, GLMAux]:
        """Final-LN hidden states (B, T, D). Defaults: positions continue the cache, block 0, sep 0 (causal LM),
        every token real. `real_BT` (bool) is False on padding, which MoE layers then do not route. `prompts`:
        trained continuous prompts (wudao/model/prompts.py) read by the frozen model; pass the same ones to
        every pass of a cached generation."""
        B, T = input_ids_BT.shape
        device = input_ids_BT.device
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids_BT is None:
            position_ids_BT = torch.arange(start, start + T, device=device).expand(B, T)
        if block_position_ids_BT is None:
            block_position_ids_BT = torch.zeros_like(input_ids_BT)
        if sep_B is None:
            sep_B = torch.zeros(B, dtype=torch.long, device=device)
        if start + T > self.cfg.max_seq_len or int(position_ids_BT.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x_BTD = self.embed(input_ids_BT, position_ids_BT, block_position_ids_BT, prompts, start)
        mask_B1TS = glm_attention_mask(sep_B, start, T, start + T)
        h_BTD, aux = self.run_blocks(x_BTD, mask_B1TS, kv_cache, real_BT, prompts)
        if kv_cache is not None:
            kv_cache.length += T
        return h_BTD, aux

    def project(self, h_xD: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., D) -> logits (..., V)."""
        return h_xD @ self.tok_emb.weight.T if self.head is None else self.head(h_xD)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor | None = None,
        block_position_ids_BT: torch.Tensor | None = None,
        sep_B: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        real_BT: torch.Tensor | None = None,
        prompts: Prompts | None = None,
    ) -> GLMOutput:
        h_BTD, aux = self.hidden(
            input_ids_BT, position_ids_BT, block_position_ids_BT, sep_B, kv_cache, real_BT, prompts
        )
        return GLMOutput(self.project(h_BTD), aux)

    def loss(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        block_position_ids_BT: torch.Tensor,
        sep_B: torch.Tensor,
        target_ids_BT: torch.Tensor,
        loss_mask_BT: torch.Tensor,
        real_BT: torch.Tensor | None = None,
        prompts: Prompts | None = None,
    ) -> GLMLoss:
        """GLM loss on Part B only; takes exactly the tensors of `GLMBatch.tensors()` as keywords."""
        h_BTD, aux = self.hidden(
            input_ids_BT, position_ids_BT, block_position_ids_BT, sep_B, real_BT=real_BT, prompts=prompts
        )
        keep_BT = loss_mask_BT.bool()
        # Project only the target positions: Part B is a small share of the row and V can be large.
        logits_NV = self.project(h_BTD[keep_BT])
        n = int(keep_BT.sum())
        lm = F.cross_entropy(logits_NV.float(), target_ids_BT[keep_BT], reduction="sum") / max(n, 1)
        return GLMLoss(lm + aux.aux_loss, lm, n, aux)
