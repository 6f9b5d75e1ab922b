"""Training and storing the VQ-VAE image tokenizer (`wudao train-vq`), and turning slice images into codes.

Layout: `vq/<version>/model.safetensors + config.json + manifest.json`, and `vq/current.json` naming the
version in use, written last (so a half-saved model is never current). The codebook size must equal
`model.image_codebook_size`, the block of ids the GLM reserves for image codes.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from wudao.config import ModelSettings
from wudao.data.slices import load_slice_images
from wudao.errors import WudaoError
from wudao.model import VQVAE, VQConfig
from wudao.storage import ObjectStore, join_key
from wudao.train.data import ImagePairs, pngs_to_tensor

CURRENT = "vq/current.json"


class VQError(WudaoError):
    pass


def train_vq(
    store: ObjectStore,
    slice_ids: list[str],
    cache_dir: Path,
    *,
    image_size: int,
    codebook_size: int,
    steps: int,
    hidden: int = 32,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> dict:
    pairs = [p for s in slice_ids for p in load_slice_images(store, s, cache_dir)]
    if not pairs:
        raise VQError("no images in the committed slices: ingest image-caption pairs first")
    images = pngs_to_tensor([png for png, _ in pairs], image_size)
    n_down = max(1, (image_size // 8).bit_length() - 1)  # 64 -> 8x8 codes, 256 -> 32x32
    cfg = VQConfig(codebook_size=codebook_size, n_down=n_down, hidden=hidden)
    torch.manual_seed(seed)
    model = VQVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    started, loss = time.perf_counter(), float("nan")
    for _ in range(steps):
        batch = images[torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)]
        out = model(batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        loss = out.loss.item()
    model.eval()
    with torch.no_grad():
        recon = model.decode(model.encode(images))
        mse = float(((recon - images) ** 2).mean())
        baseline = float(((images - images.mean(0, keepdim=True)) ** 2).mean())
    version = _save(store, model)
    return {
        "version": version,
        "uri": store.url(f"vq/{version}"),
        "images": len(images),
        "steps": steps,
        "final_loss": loss,
        "reconstruction_mse": mse,
        "mean_image_mse": baseline,
        "codebook_size": codebook_size,
        "code_grid": image_size // 2**n_down,
        "seconds": time.perf_counter() - started,
    }


def _save(store: ObjectStore, model: VQVAE) -> str:
    with tempfile.TemporaryDirectory(prefix="wudao-vq-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        version = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        store.put_file(f"vq/{version}/model.safetensors", path)
    store.put_json(f"vq/{version}/config.json", model.cfg.to_dict())
    store.commit(f"vq/{version}", {"version": version, "config": model.cfg.to_dict()})
    store.put_json(CURRENT, {"version": version})
    return version


def load_current(store: ObjectStore) -> VQVAE | None:
    if not store.exists(CURRENT):
        return None
    version = store.get_json(CURRENT)["version"]
    manifest = store.read_manifest(f"vq/{version}")
    if manifest is None:
        raise VQError(f"VQ model {version} named by {CURRENT} is incomplete")
    model = VQVAE(VQConfig(**manifest["config"]))
    with tempfile.TemporaryDirectory(prefix="wudao-vq-") as tmp:
        model.load_state_dict(
            load_file(store.get_file(join_key("vq", version, "model.safetensors"), Path(tmp) / "m.safetensors"))
        )
    model.eval()
    return model


@torch.no_grad()
def encode_slices(
    model: VQVAE,
    store: ObjectStore,
    slice_ids: list[str],
    cache_dir: Path,
    image_size: int,
    model_settings: ModelSettings,
) -> ImagePairs | None:
    if model.cfg.codebook_size != model_settings.image_codebook_size:
        raise VQError(
            f"the VQ codebook has {model.cfg.codebook_size} codes but the GLM reserves "
            f"{model_settings.image_codebook_size} (model.image_codebook_size)"
        )
    pairs = [p for s in slice_ids for p in load_slice_images(store, s, cache_dir)]
    if not pairs:
        return None
    captions, codes = [], []
    for png, caption_ids in pairs:
        for ids in caption_ids:  # one sample per caption, sharing the image's codes
            captions.append(ids)
            codes.append(png)
    unique = {png: i for i, png in enumerate(dict.fromkeys(codes))}
    codes_img = model.encode(pngs_to_tensor(list(unique), image_size)).numpy()
    return ImagePairs(captions=captions, codes_NHW=codes_img[[unique[png] for png in codes]])
