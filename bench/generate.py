"""Generation speed: KV-cache blank filling vs recomputing the whole sequence every step, side by side.

A GLM model (d 256, 4 layers, vocab 8000) fills a `[gMASK]` blank after a 32-token prompt with 256 new
tokens (greedy, no early stop), with and without the cache; both must produce the same tokens.

    .venv/bin/python bench/generate.py           # table
    .venv/bin/python bench/generate.py --json    # one JSON line
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from wudao.model.generation import fill_blank
from wudao.model.glm import GLMConfig, GLMModel


class Ids:
    """Special ids of a synthetic vocabulary (the model never hard-codes them)."""

    pad, eos, mask, smask, gmask, sop, eop = range(7)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GLMConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.d_model // 64,
        max_seq_len=args.prompt + args.new_tokens + 2,
        moe_every=0,
    )
    model = GLMModel(cfg).eval()
    prompt = [*torch.randint(10, args.vocab, (args.prompt,)).tolist(), Ids.gmask]

    def run(use_cache: bool) -> tuple[float, list[int]]:
        start = time.perf_counter()
        out = fill_blank(model, prompt, Ids, max_new_tokens=args.new_tokens, stop_at_eop=False, use_cache=use_cache)
        return time.perf_counter() - start, out[0]

    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    run(True)  # warm-up
    for _ in range(args.repeats):
        for use_cache in (True, False):
            t, outputs[use_cache] = run(use_cache)
            times[use_cache].append(t)
    cached, uncached = statistics.median(times[True]), statistics.median(times[False])
    result = {
        "cache_speedup": round(uncached / cached, 2),
        "cached_s": round(cached, 3),
        "uncached_s": round(uncached, 3),
        "cached_tokens_per_s": round(args.new_tokens / cached, 1),
        "new_tokens": args.new_tokens,
        "same_tokens": outputs[True] == outputs[False],
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"GLM d={args.d_model} L={args.layers} V={args.vocab}, prompt {args.prompt} + 256 new tokens, greedy, "
        f"{torch.get_num_threads()} threads (median of {args.repeats})",
        file=sys.stderr,
    )
    print(f"{'':>10} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'KV cache':>10} {cached:>8.3f} {args.new_tokens / cached:>9.1f}")
    print(f"{'no cache':>10} {uncached:>8.3f} {args.new_tokens / uncached:>9.1f}")
    print(f"speed-up {uncached / cached:.1f}x; same tokens: {result['same_tokens']}")


if __name__ == "__main__":
    main()
