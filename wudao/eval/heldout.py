"""Held-out loss per slice: one number per slice, so forgetting of an old slice cannot hide in an average."""

from __future__ import annotations

from pathlib import Path

import torch

from wudao.model import TransformerLM
from wudao.storage import ObjectStore
from wudao.train.data import eval_windows, load_slice_tokens


@torch.no_grad()
def heldout_losses(
    model: TransformerLM, store: ObjectStore, slice_ids: list[str], cache_dir: Path, *, seq_len: int = 64, max_windows: int = 64
) -> dict[str, float]:
    """Mean next-token loss on each slice's held-out documents (slices without any are left out)."""
    model.eval()
    seq_len = min(seq_len, model.cfg.max_seq_len - 1)
    losses = {}
    for slice_id in slice_ids:
        tokens = load_slice_tokens(store, slice_id, "heldout", cache_dir).tokens
        if len(tokens) < 2:
            continue
        windows_BT = eval_windows(tokens, seq_len, max_windows)
        losses[slice_id] = float(model.loss(windows_BT))
    return losses
