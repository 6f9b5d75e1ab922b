"""Training-step throughput and MFU at two model sizes, each as MoE (every 2nd FFN, 8 experts, top-2) and as the
dense model of the same shape (`<size>_dense`). MFU = model FLOPs per second / peak FLOPs, with model FLOPs per
token = 6 * N_active + 12 * layers * d_model * seq_len (attention), and the peak measured in the same run by a
large matmul on this device (bf16 on CUDA, where steps run under bf16 autocast as training does).

    .venv/bin/python bench/train_step.py [--steps 5] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch
from loader import IDS, synthetic_slice  # noqa: E402  (bench/ is on sys.path when run as a script)

from wudao.config import TrainSettings
from wudao.data.glm import GLMObjective
from wudao.model import GLMConfig, GLMModel
from wudao.train.data import MixtureLoader, sample_indices
from wudao.train.loop import active_params

SIZES = {"small": dict(d_model=128, n_layers=4, n_heads=4), "medium": dict(d_model=256, n_layers=6, n_heads=8)}


def measured_peak_flops(device: torch.device, n: int = 2048) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else n
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 5 * 2 * n**3 / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainSettings(batch_size=8, micro_batch_size=8, seq_len=128)
    vocab = 8192
    loader = MixtureLoader(
        synthetic_slice("new", 1_000_000, vocab, 0),
        [],
        ids=IDS,
        sentence_ends=frozenset(),
        seq_len=cfg.seq_len,
        seed=0,
        replay_fraction=0.0,
        slice_weights={},
        objective=GLMObjective(),
    )
    peak = measured_peak_flops(device)
    result: dict = {"device": device.type, "peak_tflops_measured": peak / 1e12}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    variants = {
        f"{size}{suffix}": (shape, moe) for size, shape in SIZES.items() for suffix, moe in (("", 2), ("_dense", 0))
    }
    for name, (shape, moe_every) in variants.items():
        model = GLMModel(
            GLMConfig(vocab_size=vocab, max_seq_len=cfg.seq_len, moe_every=moe_every, n_experts=8, top_k=2, **shape)
        ).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = [
            loader.batch(s, sample_indices(s, cfg.batch_size, 0, 1, cfg.micro_batch_size)[0]).tensors(device)
            for s in range(args.steps + 1)
        ]
        times = []
        for i, batch in enumerate(batches):
            t = time.perf_counter()
            with autocast:
                out = model.loss(**batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - t)
        tokens_per_s = cfg.batch_size * cfg.seq_len / float(np.median(times))
        flops_per_token = 6 * active_params(model) + 12 * model.cfg.n_layers * model.cfg.d_model * cfg.seq_len
        result[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "active_params": active_params(model),
            "tokens_per_s": tokens_per_s,
            "mfu": flops_per_token * tokens_per_s / peak,
        }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
