"""FID: a first evaluation (real side computed and cached) against a second one that reuses the cached reference
statistics, same data, same process; and the feature-extraction rate of the Inception network on this machine.

The "model" is a stand-in that returns the real images colour-inverted, so the times hold only what FID itself
costs (reading and resizing real images, Inception, statistics, the 2048x2048 eigenvalue problem, PNG writes);
a real model's generation time adds to both runs and lowers the ratio. The Inception weights are random (same
network and cost as the standard file, which this machine cannot download).

    .venv/bin/python bench/fid.py [--n 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wudao.data.demo import write_scenes  # noqa: E402
from wudao.eval import fid  # noqa: E402
from wudao.storage import LocalStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="captions / images per evaluation")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="wudao-bench-fid-") as tmp:
        root = Path(tmp)
        write_scenes(root / "coco", n=args.n, seed=0, size=args.resolution)
        weights = fid.write_random_inception_weights(root / "inception-random-TEST-ONLY.pth", seed=0)
        coco, out = LocalStore(root / "coco"), LocalStore(root / "objects")
        files = {int(p.stem): p for p in (root / "coco" / "val2017").glob("*.png")}

        def inverted(captions: list[str], image_ids: list[int]) -> np.ndarray:
            return 255 - np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in image_ids])

        cfg = fid.FIDConfig(n=args.n, resolution=args.resolution)
        started = time.perf_counter()
        first, _ = fid.evaluate_fid(coco, out, "eval/bench-1/fid", weights, inverted, cfg)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        second, _ = fid.evaluate_fid(coco, out, "eval/bench-2/fid", weights, inverted, cfg)
        second_s = time.perf_counter() - started
        assert not first["reference_cached"] and second["reference_cached"] and abs(first["fid"] - second["fid"]) < 1e-6

        extractor = fid.InceptionFeatures(weights)
        images = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in sorted(files)])
        extractor(images[:2])  # warm-up
        started = time.perf_counter()
        extractor(images)
        extract_s = time.perf_counter() - started
    result = {
        "cached_speedup": first_s / second_s,
        "images_per_s": len(images) / extract_s,
        "first_s": first_s,
        "second_s": second_s,
        "n": args.n,
        "resolution": args.resolution,
        "torch_threads": torch.get_num_threads(),
        "device": str(extractor.device),
    }
    table = "\n".join(f"{k:16s} {v:.2f}" if isinstance(v, float) else f"{k:16s} {v}" for k, v in result.items())
    print(json.dumps(result) if args.json else table)


if __name__ == "__main__":
    main()
