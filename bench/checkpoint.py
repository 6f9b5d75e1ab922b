"""Checkpoint save (safetensors weights, optimizer state, sha256 on every object, manifest last) against a raw
local write of the same bytes, measured side by side in one run. Target: <= 2x.

    .venv/bin/python bench/checkpoint.py [--d-model 512] [--layers 8] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from wudao.model import GLMConfig, GLMModel
from wudao.storage import LocalStore
from wudao.train.checkpoint import save_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = GLMModel(
        GLMConfig(
            vocab_size=8192,
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=8,
            max_seq_len=512,
            moe_every=2,
            n_experts=4,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters())
    model.loss(**_tiny_batch()).loss.backward()
    optimizer.step()  # real optimizer state (two moments per parameter)
    ours, raw = [], []
    with tempfile.TemporaryDirectory(prefix="wudao-bench-ckpt-") as tmp:
        store = LocalStore(Path(tmp) / "store")
        for i in range(args.repeats):
            t = time.perf_counter()
            raw_dir = Path(tmp) / f"raw-{i}"
            raw_dir.mkdir()
            save_file(
                {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                raw_dir / "model.safetensors",
            )
            buf = io.BytesIO()
            torch.save(optimizer.state_dict(), buf)
            with open(raw_dir / "optim.pt", "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            save_checkpoint(
                store,
                f"checkpoints/bench/step-{i:08d}",
                model,
                {"step": i},
                optimizer_state=optimizer.state_dict(),
                train_state={"step": i},
            )
            ours.append(time.perf_counter() - t)
        size = sum(p.stat().st_size for p in (Path(tmp) / "raw-0").iterdir())
    result = {
        "checkpoint_over_raw_write": statistics.median(ours) / statistics.median(raw),
        "checkpoint_mb": size / 1e6,
        "ours_s": statistics.median(ours),
        "raw_s": statistics.median(raw),
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k:26s} {v:.3f}" for k, v in result.items()))


def _tiny_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(20, 8000, (2, 16))
    return {
        "input_ids_BT": ids,
        "position_ids_BT": torch.arange(16).expand(2, 16),
        "block_position_ids_BT": torch.zeros(2, 16, dtype=torch.long),
        "sep_B": torch.tensor([8, 8]),
        "target_ids_BT": ids,
        "loss_mask_BT": torch.arange(16).expand(2, 16) >= 8,
    }


if __name__ == "__main__":
    main()
