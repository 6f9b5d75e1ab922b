"""MoE layer speed, measured side by side in one run: forward + backward of

- moe:   wudao.model.moe.MoE (sort by expert, grouped GEMMs, dropless), top-2, backend "auto"; also forced to
         each backend: `torch._grouped_mm` ("grouped") and one bmm over padded groups ("bmm");
- dense: a dense FFN with the same *active* FLOPs (hidden = top_k · expert hidden);
- loop:  the same router with a Python loop over nn.Linear experts (the naive implementation),

at 8 and 64 experts; d_model 512, expert hidden 1024, 4096 tokens. Variants run round-robin so that load from
other processes hits them alike; the median of the repeats is reported.

`ep2_over_ep1` compares expert parallelism on the CPU: 2 gloo ranks of 1 thread, each holding half of the 8
experts and half of the tokens (all-to-all dispatch), against 1 process of 2 threads holding all experts and
all tokens; tokens/s of forward + backward, the two set-ups alternated three times (`--no-ep` skips it).

    .venv/bin/python bench/moe.py            # table
    .venv/bin/python bench/moe.py --json     # one JSON line
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from wudao.model.moe import MoE


class LoopMoE(nn.Module):
    """Reference: one nn.Linear pair per expert, tokens gathered expert by expert in a Python loop."""

    def __init__(self, router_of: MoE, hidden: int):
        super().__init__()
        self.route = router_of.route
        d = router_of.router.in_features
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden, bias=False), nn.GELU(), nn.Linear(hidden, d, bias=False))
            for _ in range(router_of.n_experts)
        )

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.size(-1))
        _, _, gate_NK, expert_NK = self.route(x_ND)
        y_ND = torch.zeros_like(x_ND)
        for e, expert in enumerate(self.experts):
            token_A, slot_A = torch.where(expert_NK == e)
            if len(token_A):
                y_ND.index_add_(0, token_A, expert(x_ND[token_A]) * gate_NK[token_A, slot_A, None].to(y_ND.dtype))
        return y_ND.view_as(x_BTD)


class Forced(nn.Module):
    """The MoE with one backend forced (same weights as the "auto" one)."""

    def __init__(self, moe: MoE, backend: str):
        super().__init__()
        self.moe, self.backend = moe, backend

    def forward(self, x: torch.Tensor):
        auto, self.moe.backend = self.moe.backend, self.backend
        try:
            return self.moe(x)
        finally:
            self.moe.backend = auto


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(n_experts: int, args) -> dict[str, float]:
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    moe = MoE(args.d_model, args.hidden, n_experts, top_k=args.top_k)
    dense = nn.Sequential(
        nn.Linear(args.d_model, args.top_k * args.hidden, bias=False),
        nn.GELU(),
        nn.Linear(args.top_k * args.hidden, args.d_model, bias=False),
    )
    loop = LoopMoE(moe, args.hidden)
    for m in (moe, dense, loop):
        m.to(device, dtype)
    x = torch.randn(1, args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.d_model, device=device, dtype=dtype)
    variants = {"moe": moe, "grouped": Forced(moe, "grouped"), "bmm": Forced(moe, "bmm"), "dense": dense, "loop": loop}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.warmup + args.repeats):
        for name, module in variants.items():
            t = fwd_bwd(module, x, grad)
            module.zero_grad(set_to_none=True)
            x.grad = None
            if rep >= args.warmup:
                times[name].append(t)
    _, stats = moe(x)
    med = {k: statistics.median(v) for k, v in times.items()}
    counts = stats.tokens_per_expert_E.float()
    return {**med, "max_over_mean_load": float(counts.max() / counts.mean())}


def _ep_rank(rank: int, world: int, init_file: str, out_dir: str, args: dict) -> None:
    """One rank of the expert-parallel measurement: median seconds of forward + backward on its tokens."""
    from wudao.train import expert_parallel

    torch.set_num_threads(args["threads"])
    if world > 1:
        torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    holder = nn.Module()
    holder.moe = MoE(args["d_model"], args["hidden"], args["experts"], top_k=args["top_k"])
    if world > 1:
        expert_parallel.shard_experts(holder, expert_parallel.make_groups(world))
    tokens = args["tokens"] // world
    x = torch.randn(1, tokens, args["d_model"], generator=torch.Generator().manual_seed(rank), requires_grad=True)
    grad = torch.randn(1, tokens, args["d_model"])
    times = []
    for rep in range(args["warmup"] + args["repeats"]):
        if world > 1:
            torch_dist.barrier()  # ranks start together: the slower one sets the pace, as in training
        t = fwd_bwd(holder.moe, x, grad)
        holder.zero_grad(set_to_none=True)
        if rep >= args["warmup"]:
            times.append(t)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(statistics.median(times)))
    if world > 1:
        torch_dist.destroy_process_group()


def measure_expert_parallel(args) -> dict[str, float]:
    """tokens/s of EP=2 (2 ranks x 1 thread) over EP=1 (1 process x 2 threads), alternated three times."""
    cfg = dict(
        d_model=args.d_model,
        hidden=args.hidden,
        experts=8,
        top_k=args.top_k,
        tokens=args.tokens,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(3):
        for world in (1, 2):
            with tempfile.TemporaryDirectory(prefix="wudao-bench-ep-") as tmp:
                mp.spawn(
                    _ep_rank,
                    args=(world, str(Path(tmp) / "init"), tmp, {**cfg, "threads": 2 // world}),
                    nprocs=world,
                    join=True,
                )
                seconds = max(json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world))
            rates[world].append(args.tokens / seconds)
    ep1, ep2 = statistics.median(rates[1]), statistics.median(rates[2])
    return {"ep2_over_ep1": round(ep2 / ep1, 3), "ep1_tokens_per_s": round(ep1), "ep2_tokens_per_s": round(ep2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024, help="hidden width of each expert")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-ep", action="store_true", help="skip the expert-parallel measurement (2 gloo ranks)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu.sh)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights and activations (the grouped GEMM path on CUDA needs bfloat16 on sm90+)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {e: measure(e, args) for e in args.experts}
    result: dict[str, float | int | str] = {}
    for e, r in rows.items():
        suffix = "" if e == args.experts[0] else f"_{e}"
        result[f"moe_over_dense{suffix}"] = round(r["moe"] / r["dense"], 3)
        result[f"loop_over_moe{suffix}"] = round(r["loop"] / r["moe"], 3)
        result[f"moe_ms{suffix}"] = round(1e3 * r["moe"], 1)
        result[f"dense_ms{suffix}"] = round(1e3 * r["dense"], 1)
        result[f"loop_ms{suffix}"] = round(1e3 * r["loop"], 1)
        result[f"grouped_over_dense{suffix}"] = round(r["grouped"] / r["dense"], 3)
        result[f"bmm_over_dense{suffix}"] = round(r["bmm"] / r["dense"], 3)
    result.update(
        tokens=args.tokens,
        d_model=args.d_model,
        hidden=args.hidden,
        top_k=args.top_k,
        threads=torch.get_num_threads(),
        grouped_mm=hasattr(torch, "_grouped_mm"),
        device=args.device,
        dtype=args.dtype,
    )
    if not args.no_ep:
        result.update(measure_expert_parallel(args))
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"forward+backward, {args.tokens} tokens, d={args.d_model}, expert hidden={args.hidden}, top-{args.top_k}, "
        f"{torch.get_num_threads()} threads (median of {args.repeats})",
        file=sys.stderr,
    )
    cols = ["moe", "grouped", "bmm", "dense", "loop"]
    print(
        f"{'experts':>8} "
        + " ".join(f"{c + ' ms':>10}" for c in cols)
        + f" {'moe/dense':>10} {'loop/moe':>9} {'max/mean load':>14}"
    )
    for e, r in rows.items():
        ratios = f"{r['moe'] / r['dense']:>10.2f} {r['loop'] / r['moe']:>9.2f} {r['max_over_mean_load']:>14.2f}"
        print(f"{e:>8} " + " ".join(f"{1e3 * r[c]:>10.1f}" for c in cols) + " " + ratios)
    if not args.no_ep:
        print(
            f"expert parallel, 8 experts: 2 ranks x 1 thread {result['ep2_tokens_per_s']} tokens/s, 1 process x 2 "
            f"threads {result['ep1_tokens_per_s']} tokens/s: ep2/ep1 {result['ep2_over_ep1']}"
        )


if __name__ == "__main__":
    main()
