#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA device (never CI): prints one JSON line with
#   moe:        bench/moe.py on CUDA in bf16 -- MoE vs dense FFN of the same active FLOPs, vs the per-expert
#               loop, and each backend (`torch._grouped_mm`, padded bmm), 8 and 64 experts;
#   grouped_mm: whether the grouped-GEMM path is taken on this device and agrees with the bmm path
#               (forward and backward, bf16 tolerances);
#   train_step: bench/train_step.py -- tokens/s and MFU of a training step, MoE and dense, two sizes, under bf16
#               autocast (the peak is a bf16 matmul measured in the same run).
# Usage: bash bench/gpu.sh            (from the repository root, after `make venv`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: no CUDA device here; run it on a GPU machine" >&2
  exit 2
fi
moe=$("$PY" bench/moe.py --device cuda --dtype bfloat16 --no-ep --json)
train=$("$PY" bench/train_step.py --json)
grouped=$("$PY" - <<'PY'
import json, torch
from wudao.model.moe import grouped_ffn, grouped_mm_supported
torch.manual_seed(0)
x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w_in = torch.randn(8, 512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w_out = torch.randn(8, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
counts = torch.tensor([700, 0, 1200, 96, 500, 800, 300, 500], device="cuda")
out = {"supported": grouped_mm_supported(x, w_in), "device": torch.cuda.get_device_name()}
if out["supported"]:
    res = []
    for backend in ("grouped", "bmm"):
        y = grouped_ffn(x, w_in * 0.05, w_out * 0.05, counts, backend)
        res.append((y, *torch.autograd.grad(y.float().square().sum(), (x, w_in, w_out))))
    diff = max(float((a - b).float().abs().max() / b.float().abs().max().clamp(min=1e-6)) for a, b in zip(*[[t.detach() for t in r] for r in res]))
    out.update(max_relative_difference=diff, agrees=diff < 2e-2)
print(json.dumps(out))
PY
)
"$PY" -c 'import json, sys; print(json.dumps({"moe": json.loads(sys.argv[1]), "grouped_mm": json.loads(sys.argv[2]), "train_step": json.loads(sys.argv[3])}))' "$moe" "$grouped" "$train"
