"""VQ-VAE image tokenizer (CogView style): conv encoder, EMA codebook, straight-through estimator, conv decoder.

Images are float (B, 3, H, W) in [0, 1]; codes are int64 (B, H/2ⁿ, W/2ⁿ) for n stride-2 stages. CogView uses
8192 codes × 256 dims at 8× downsampling (256² -> 32² = 1024 tokens); the defaults here are a small model.
Shape suffixes: B batch, C channels, H/W height/width, N vectors (B·h·w), Z code dim, K codebook size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    in_channels: int = 3
    """Image channels."""
    hidden: int = 64
    """Channels of the conv stages."""
    n_down: int = 3
    """Stride-2 stages: the code grid is the image side / 2**n_down (64×64 -> 8×8 with 3)."""
    codebook_size: int = 512
    """Number of codes K (the image vocabulary appended after the text vocabulary)."""
    code_dim: int = 64
    """Dimension Z of each code vector."""
    decay: float = 0.99
    """EMA decay of the codebook statistics."""
    commitment: float = 0.25
    """Weight β of the commitment loss ‖z_e − sg(e)‖² (the codebook itself learns by EMA, not gradients)."""
    eps: float = 1e-5
    """Laplace smoothing of EMA cluster sizes (no division by zero for unused codes)."""
    restart_below: float = 1.0
    """A code whose EMA usage (assignments per batch) falls below this restarts at a random encoder output
    (Jukebox); 0 disables. Without it, small data leaves most of the codebook dead."""

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return x_BCHW + self.net(x_BCHW)


class EMACodebook(nn.Module):
    """Nearest-neighbour quantiser whose codes track the running mean of the vectors assigned to them.

    EMA updates (van den Oord et al. 2017, app. A.1) are steadier than learning the codebook by gradient. The
    codebook starts from encoder outputs of the first batch, and codes unused for a while restart at random
    encoder outputs, so small data does not leave most of the codebook dead. In data-parallel training the
    two statistics (`cluster_size`, `embed_sum`) must be all-reduced before the update.
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.decay, self.eps, self.restart_below = cfg.decay, cfg.eps, cfg.restart_below
        self.register_buffer("embed_KZ", torch.randn(cfg.codebook_size, cfg.code_dim))
        self.register_buffer("cluster_size_K", torch.ones(cfg.codebook_size))
        self.register_buffer("embed_sum_KZ", self.embed_KZ.clone())
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, z_NZ: torch.Tensor) -> torch.Tensor:
        # ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖²; ‖z‖² is the same for every code, so it is left out.
        dist_NK = -2 * z_NZ @ self.embed_KZ.T + self.embed_KZ.square().sum(1)
        return dist_NK.argmin(1)

    @torch.no_grad()
    def update(self, z_NZ: torch.Tensor, codes_N: torch.Tensor, gen: torch.Generator | None = None) -> None:
        K = self.embed_KZ.size(0)
        if not bool(self.initialised):
            self.embed_KZ.copy_(z_NZ[torch.randint(len(z_NZ), (K,), generator=gen, device=z_NZ.device)])
            self.embed_sum_KZ.copy_(self.embed_KZ)
            self.initialised.fill_(True)
            codes_N = self.nearest(z_NZ)
        onehot_NK = F.one_hot(codes_N, K).type_as(z_NZ)
        self.cluster_size_K.mul_(self.decay).add_(onehot_NK.sum(0), alpha=1 - self.decay)
        self.embed_sum_KZ.mul_(self.decay).add_(onehot_NK.T @ z_NZ, alpha=1 - self.decay)
        n = self.cluster_size_K.sum()
        smoothed_K = (self.cluster_size_K + self.eps) / (n + K * self.eps) * n
        self.embed_KZ.copy_(self.embed_sum_KZ / smoothed_K[:, None])
        dead_K = self.cluster_size_K < self.restart_below
        if bool(dead_K.any()):
            picks = torch.randint(len(z_NZ), (int(dead_K.sum()),), generator=gen, device=z_NZ.device)
            self.embed_KZ[dead_K] = z_NZ[picks]
            self.embed_sum_KZ[dead_K] = z_NZ[picks]
            self.cluster_size_K[dead_K] = 1.0


@dataclass
class VQOutput:
    recon_BCHW: torch.Tensor
    """Decoded images (not clamped, so the reconstruction loss has gradients everywhere)."""
    codes_BHW: torch.Tensor
    commitment_loss: torch.Tensor
    """‖z_e − sg(quantised)‖², unweighted."""
    loss: torch.Tensor
    """Pixel MSE + β · commitment: what to backpropagate."""
    perplexity: torch.Tensor
    """exp(entropy of code usage in this batch): how many codes are effectively used."""


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig = VQConfig()):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden
        down: list[nn.Module] = [nn.Conv2d(cfg.in_channels, c, 3, padding=1)]
        for _ in range(cfg.n_down):
            down += [nn.ReLU(), nn.Conv2d(c, c, 4, stride=2, padding=1)]
        self.encoder = nn.Sequential(*down, ResBlock(c), nn.ReLU(), nn.Conv2d(c, cfg.code_dim, 1))
        up: list[nn.Module] = [nn.Conv2d(cfg.code_dim, c, 3, padding=1), ResBlock(c)]
        for _ in range(cfg.n_down):
            up += [nn.ReLU(), nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*up, nn.ReLU(), nn.Conv2d(c, cfg.in_channels, 3, padding=1))
        self.codebook = EMACodebook(cfg)

    def _latents(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.encoder(images_BCHW * 2 - 1)  # centre pixels: [0, 1] -> [-1, 1]

    def _from_codes(self, codes_BHW: torch.Tensor) -> torch.Tensor:
        return self.codebook.embed_KZ[codes_BHW].permute(0, 3, 1, 2)

    def forward(self, images_BCHW: torch.Tensor, generator: torch.Generator | None = None) -> VQOutput:
        z_BZHW = self._latents(images_BCHW)
        B, Z, H, W = z_BZHW.shape
        z_NZ = z_BZHW.permute(0, 2, 3, 1).reshape(-1, Z)
        codes_N = self.codebook.nearest(z_NZ.detach())
        if self.training:
            self.codebook.update(z_NZ.detach().float(), codes_N, generator)
            codes_N = self.codebook.nearest(z_NZ.detach())
        codes_BHW = codes_N.view(B, H, W)
        q_BZHW = self._from_codes(codes_BHW)
        commitment = F.mse_loss(z_BZHW, q_BZHW.detach())
        # Straight-through: the decoder sees the quantised vectors, the encoder gets the decoder's gradient.
        st_BZHW = z_BZHW + (q_BZHW - z_BZHW).detach()
        recon_BCHW = (self.decoder(st_BZHW) + 1) / 2
        usage_K = torch.bincount(codes_N, minlength=self.cfg.codebook_size).float() / codes_N.numel()
        perplexity = torch.exp(-(usage_K * (usage_K + 1e-10).log()).sum())
        loss = F.mse_loss(recon_BCHW, images_BCHW) + self.cfg.commitment * commitment
        return VQOutput(recon_BCHW, codes_BHW, commitment, loss, perplexity)

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> codes (B, H/2ⁿ, W/2ⁿ) int64."""
        z_BZHW = self._latents(images_BCHW)
        B, Z, H, W = z_BZHW.shape
        return self.codebook.nearest(z_BZHW.permute(0, 2, 3, 1).reshape(-1, Z)).view(B, H, W)

    @torch.no_grad()
    def decode(self, codes_BHW: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, C, h·2ⁿ, w·2ⁿ) clamped to [0, 1]."""
        return ((self.decoder(self._from_codes(codes_BHW)) + 1) / 2).clamp(0, 1)
