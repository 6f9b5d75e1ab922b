"""Held-out loss per slice: one number per slice, so forgetting of an old slice cannot hide in an average.

The held-out documents are cut into fixed windows and scored under two GLM objectives with fixed seeds --
token-span blank filling ([MASK], knowledge) and document continuation ([gMASK], generation) -- so every model
version is measured on exactly the same samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wudao.data.glm import SpecialIds, build_glm_batch
from wudao.data.slices import load_slice_tokens
from wudao.model import GLMModel
from wudao.model.objective import GLM_10B
from wudao.storage import ObjectStore

KINDS = ("token", "document")


@torch.no_grad()
def heldout_losses(
    model: GLMModel,
    store: ObjectStore,
    slice_ids: list[str],
    cache_dir: Path,
    ids: SpecialIds,
    *,
    seq_len: int = 64,
    max_windows: int = 64,
    batch_size: int = 16,
) -> dict[str, float]:
    """Token-weighted mean GLM loss on each slice's held-out documents (slices without any are left out)."""
    model.eval()
    seq_len = min(seq_len, model.cfg.max_seq_len)
    row_len = max(8, int(seq_len * 0.85))
    losses = {}
    for slice_id in slice_ids:
        tokens = load_slice_tokens(store, slice_id, "heldout", cache_dir).tokens.astype(np.int64)
        if len(tokens) < 8:
            continue
        n = max(1, min(max_windows, len(tokens) // row_len))
        rows = [tokens[(i * row_len + np.arange(row_len)) % len(tokens)] for i in range(n)]
        total, count = 0.0, 0
        for k, kind in enumerate(KINDS):
            for b in range(0, n, batch_size):
                batch = build_glm_batch(
                    rows[b : b + batch_size], ids, seq_len, np.random.default_rng([k, b]), GLM_10B, kind=kind
                )
                out = model.loss(**batch.tensors())
                total += float(out.lm_loss) * out.n_tokens
                count += out.n_tokens
        if count:
            losses[slice_id] = total / count
    return losses
