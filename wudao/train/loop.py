"""Continual pre-training, minimal but real: continue from a checkpoint (or start from scratch) on the newest
slice mixed with replay of the earlier ones, with the LR re-warmed and re-decayed, and checkpoint at the end."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from wudao.catalog import Catalog, TrainingRun
from wudao.config import ModelSettings, TrainSettings
from wudao.data.tokenizer import load_tokenizer, tokenizer_key
from wudao.model import TransformerConfig, TransformerLM
from wudao.storage import ObjectStore
from wudao.train.checkpoint import checkpoint_prefix, load_checkpoint, save_checkpoint
from wudao.train.data import MixtureSampler, load_slice_tokens


class TrainError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_id: str
    checkpoint_uri: str
    resumed_from: str | None
    slice_ids: list[str]
    tokenizer_version: str
    steps: int
    tokens: int
    final_loss: float
    tokens_per_s: float
    history: list[dict] = field(default_factory=list)
    """Per step: `step`, `loss`, `lr` (logged to MLflow by the register stage)."""

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor * peak` at the last step (re-run every cycle)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    *,
    store: ObjectStore,
    catalog: Catalog,
    cache_dir: Path,
    slice_ids: list[str],
    init_checkpoint_uri: str | None,
    model_settings: ModelSettings,
    train_settings: TrainSettings,
) -> TrainResult:
    """Train on `slice_ids[-1]` with replay from the others; returns where the new checkpoint is."""
    if not slice_ids:
        raise TrainError("no slices to train on: ingest data first (`wudao ingest SOURCE`)")
    cfg = train_settings
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    new = load_slice_tokens(store, slice_ids[-1], "train", cache_dir)
    old = [load_slice_tokens(store, s, "train", cache_dir) for s in slice_ids[:-1]]
    versions = {s.tokenizer_version for s in [new, *old]}
    if len(versions) != 1:
        raise TrainError(f"slices {slice_ids} were tokenized with different tokenizers {sorted(versions)}")
    tokenizer_version = versions.pop()

    torch.manual_seed(cfg.seed)
    if init_checkpoint_uri:
        ckpt = load_checkpoint(store, init_checkpoint_uri)
        if ckpt.manifest["tokenizer_version"] != tokenizer_version:
            raise TrainError(
                f"checkpoint {init_checkpoint_uri} uses tokenizer {ckpt.manifest['tokenizer_version']} but the data "
                f"uses {tokenizer_version}: start from scratch or re-ingest with the model's tokenizer"
            )
        model = ckpt.model
    else:
        vocab = load_tokenizer(store.get_bytes(tokenizer_key(tokenizer_version))).get_vocab_size()
        model = TransformerLM(TransformerConfig(vocab_size=vocab, **model_settings.model_dump()))
    seq_len = min(cfg.seq_len, model.cfg.max_seq_len - 1)
    sampler = MixtureSampler(new, old, seq_len=seq_len, replay_fraction=cfg.replay_fraction, seed=cfg.seed)

    run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
    with catalog.session() as s:
        s.add(TrainingRun(id=run_id, status="running", parent_checkpoint_uri=init_checkpoint_uri,
                          slice_ids=json.dumps(slice_ids), tokenizer_version=tokenizer_version))  # fmt: skip
    try:
        # The optimizer state is reset every cycle (new data, re-warmed LR); the weights carry the knowledge.
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
        model.train()
        history = []
        start = time.perf_counter()
        for step in range(cfg.steps):
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model.loss(sampler.batch(step, cfg.batch_size))
            if not torch.isfinite(loss):
                raise TrainError(f"non-finite loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            history.append({"step": step, "loss": loss.item(), "lr": lr})
        elapsed = time.perf_counter() - start
        tokens = cfg.steps * cfg.batch_size * seq_len
        manifest = {
            "run_id": run_id,
            "step": cfg.steps,
            "tokenizer_version": tokenizer_version,
            "slice_ids": slice_ids,
            "parent_checkpoint_uri": init_checkpoint_uri,
            "final_loss": history[-1]["loss"],
        }
        uri = save_checkpoint(store, checkpoint_prefix(run_id, cfg.steps), model, optimizer, manifest)
    except BaseException:
        with catalog.session() as s:
            s.get(TrainingRun, run_id).status = "failed"
        raise
    with catalog.session() as s:
        run = s.get(TrainingRun, run_id)
        run.status, run.checkpoint_uri, run.steps = "finished", uri, cfg.steps
        run.final_loss, run.finished_at = history[-1]["loss"], datetime.now(UTC)
    return TrainResult(
        run_id=run_id,
        checkpoint_uri=uri,
        resumed_from=init_checkpoint_uri,
        slice_ids=slice_ids,
        tokenizer_version=tokenizer_version,
        steps=cfg.steps,
        tokens=tokens,
        final_loss=history[-1]["loss"],
        tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
        history=history,
    )
