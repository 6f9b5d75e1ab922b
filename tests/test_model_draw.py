"""A small VQ + GLM learns to draw the demo shapes from their captions (CogView layout, [gMASK] over the codes):
greedy text -> image generation lands far below the pixel error of a blank image."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from tests.test_model_glm import memorise
from wudao.data.demo import write_scenes
from wudao.data.glm import SpecialIds, glm_sample, stack_rows
from wudao.data.multimodal import cogview_layout, cogview_prompt
from wudao.data.tokenizer import train_tokenizer
from wudao.model import VQVAE, GLMConfig, GLMModel, Sampling, VQConfig, sample_image_codes


def test_vq_and_glm_learn_to_draw_the_demo_shapes(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is faster for models this small
    try:
        _draw(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _draw(tmp_path):
    write_scenes(tmp_path, n=16, seed=0, size=32)
    index = json.loads((tmp_path / "annotations" / "captions_val2017.json").read_text())
    english = {a["image_id"]: a["caption"] for a in index["annotations"] if a["caption"].startswith("a ")}
    images = torch.from_numpy(
        np.stack(
            [
                np.asarray(Image.open(tmp_path / "val2017" / i["file_name"]).convert("RGB"), dtype=np.float32) / 255
                for i in index["images"]
            ]
        )
    ).permute(0, 3, 1, 2)
    captions = [english[i["id"]] for i in index["images"]]

    torch.manual_seed(0)
    vq = VQVAE(VQConfig(codebook_size=64, n_down=2, hidden=32, code_dim=32))  # 32x32 -> 8x8 codes
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        out = vq(images, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    vq.eval()
    with torch.no_grad():
        codes = vq.encode(images)

    tok = train_tokenizer(captions * 5, 300)
    ids, offset = SpecialIds.from_tokenizer(tok), tok.get_vocab_size()
    rng = np.random.default_rng(0)
    rows = []
    for caption, code in zip(captions, codes):
        tokens, span = cogview_layout(tok.encode(caption).ids, code.numpy(), ids, offset)
        rows.append(glm_sample(tokens, [span], ids.gmask, ids, 96, rng))
    batch = stack_rows(rows, "document").tensors()
    model = GLMModel(
        GLMConfig(vocab_size=offset + 64, d_model=96, n_layers=2, n_heads=4, max_seq_len=96, moe_every=2, n_experts=4)
    )
    memorise(model, batch, until=0.02)
    model.eval()
    errors = []
    with torch.no_grad():
        for caption, image in zip(captions, images):
            prompt = cogview_prompt(ids, offset, caption=tok.encode(caption).ids)
            drawn = sample_image_codes(
                model, prompt, ids, n_codes=64, code_offset=offset, codebook_size=64, sampling=Sampling()
            )
            picture = vq.decode(drawn.reshape(1, 8, 8)).clamp(0, 1)[0]
            errors.append(float(((picture - image) ** 2).mean()))
    blank = float(((images - 0.5) ** 2).mean())
    assert np.mean(errors) < 0.25 * blank, f"drawn {np.mean(errors):.4f} vs blank {blank:.4f}"
