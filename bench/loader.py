"""Data loader throughput against the training step's token rate, measured side by side in one run.

The loader builds GLM samples (span sampling, Part A/Part B, 2D positions) with replay from earlier slices;
it must outrun training by a wide margin (target >= 10x) so the trainer never waits for data.

    .venv/bin/python bench/loader.py [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from wudao.config import ModelSettings, TrainSettings
from wudao.data.glm import GLMObjective, SpecialIds
from wudao.model import GLMModel
from wudao.train.data import MixtureLoader, SliceTokens, sample_indices
from wudao.train.loop import model_config

IDS = SpecialIds(pad=0, eos=1, cls=2, mask=3, smask=4, gmask=5, sop=6, eop=7, boi=8, eoi=9, roi=10, base=11)


def synthetic_slice(name: str, n_tokens: int, vocab: int, seed: int) -> SliceTokens:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, vocab, n_tokens)
    tokens[rng.random(n_tokens) < 1 / 200] = IDS.eos  # documents of ~200 tokens
    return SliceTokens(name, "bench", tokens.astype(np.uint16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model_settings, cfg = ModelSettings(), TrainSettings(batch_size=8, micro_batch_size=8, seq_len=128)
    vocab = 4096
    loader = MixtureLoader(
        synthetic_slice("new", 2_000_000, vocab, 0),
        [synthetic_slice("old", 2_000_000, vocab, 1)],
        ids=IDS,
        sentence_ends=frozenset({13, 14}),
        seq_len=cfg.seq_len,
        seed=0,
        replay_fraction=0.25,
        slice_weights={},
        objective=GLMObjective(),
    )
    model = GLMModel(model_config(model_settings.model_copy(update={"max_seq_len": 128}), vocab, cfg.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens_per_step = cfg.batch_size * cfg.seq_len

    loader_s, train_s = 0.0, 0.0
    for step in range(args.steps):  # interleaved, so machine noise hits both
        t = time.perf_counter()
        batch = loader.batch(step, sample_indices(step, cfg.batch_size, 0, 1, cfg.micro_batch_size)[0])
        loader_s += time.perf_counter() - t
        t = time.perf_counter()
        out = model.loss(**batch.tensors())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        train_s += time.perf_counter() - t
    result = {
        "loader_over_trainer": train_s / loader_s,
        "loader_tokens_per_s": args.steps * tokens_per_step / loader_s,
        "trainer_tokens_per_s": args.steps * tokens_per_step / train_s,
        "model_params": sum(p.numel() for p in model.parameters()),
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k:22s} {v:,.2f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
