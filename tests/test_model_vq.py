"""VQ-VAE image tokenizer: shapes, the EMA codebook update by its formula, straight-through gradients, and a
tiny VQ that learns to reconstruct the demo scenes far better than the mean image."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from wudao.model.vq import VQVAE, EMACodebook, VQConfig


@contextlib.contextmanager
def one_thread():
    """The CI box has 2 cores shared with other jobs: one thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_encode_decode_shapes_64_to_8x8():
    vq = VQVAE(VQConfig(hidden=16, n_down=3, codebook_size=32, code_dim=8)).eval()
    codes = vq.encode(torch.rand(2, 3, 64, 64))
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64 and int(codes.max()) < 32
    images = vq.decode(codes)
    assert images.shape == (2, 3, 64, 64) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_ema_update_follows_its_formula():
    cb = EMACodebook(VQConfig(codebook_size=2, code_dim=2, decay=0.9, eps=0.0, restart_below=0.0))
    cb.initialised.fill_(True)
    cb.embed_KZ.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    cb.embed_sum_KZ.copy_(cb.embed_KZ)  # cluster sizes start at 1
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 9.0]])
    codes = cb.nearest(z)
    assert codes.tolist() == [0, 0, 1]
    cb.update(z, codes)
    size = torch.tensor([0.9 + 0.1 * 2, 0.9 + 0.1 * 1])
    embed_sum = torch.tensor([[0.1 * 4, 0.1 * 2], [9 + 0.1 * 9, 9 + 0.1 * 9]])
    torch.testing.assert_close(cb.cluster_size_K, size)
    torch.testing.assert_close(cb.embed_KZ, embed_sum / size[:, None])


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(hidden=16, n_down=2, codebook_size=16, code_dim=8))
    out = vq(torch.rand(2, 3, 16, 16))
    out.loss.backward()
    first_conv = vq.encoder[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert not vq.codebook.embed_KZ.requires_grad, "the codebook learns by EMA, not by gradient"
    assert out.codes_BHW.shape == (2, 4, 4) and out.commitment_loss > 0


def load_scenes(tmp_path, n: int, size: int) -> torch.Tensor:
    from PIL import Image

    from wudao.data.demo import write_scenes

    write_scenes(tmp_path, n=n, seed=0, size=size)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "val2017").glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_tiny_vq_learns_to_reconstruct_the_demo_scenes(tmp_path):
    images = load_scenes(tmp_path, n=48, size=32)
    mean_mse = float((images - images.mean(0, keepdim=True)).square().mean())
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vq = VQVAE(VQConfig(hidden=32, n_down=2, codebook_size=64, code_dim=32))  # 32×32 -> 8×8 codes
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    with one_thread():
        for _ in range(200):
            out = vq(images[torch.randint(len(images), (16,), generator=gen)], generator=gen)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        vq.eval()
        codes = vq.encode(images)
        mse = float((vq.decode(codes) - images).square().mean())
    print(f"recon mse {mse:.4f} vs mean image {mean_mse:.4f}; {len(codes.unique())} codes in use")
    assert mse < 0.2 * mean_mse
    assert len(codes.unique()) >= 8, "the codebook did not collapse"
