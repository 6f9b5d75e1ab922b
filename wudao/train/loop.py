"""Continual pre-training of the GLM: setup -> fit -> save, resumable at any checkpoint.

One run learns the newest slice with replay of the earlier ones, starting from a checkpoint (the champion) or
from scratch. The LR is re-warmed and re-decayed every cycle and the optimizer state starts fresh; a *resumed*
run (same run id, after a crash) restores everything -- weights, optimizer, RNG, step, spike-guard window -- so
its final weights are bit-identical to an uninterrupted run on CPU. Under `torchrun` the same code runs DDP
(gloo on CPU, NCCL on GPU); rank 0 alone writes checkpoints and the catalog.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from wudao.catalog import Catalog, TrainingRun
from wudao.config import ModelSettings, TrainSettings
from wudao.data.glm import SpecialIds, sentence_end_ids
from wudao.data.slices import load_slice_tokens
from wudao.data.tokenizer import load_tokenizer, tokenizer_key
from wudao.errors import WudaoError
from wudao.model import GLMConfig, GLMModel
from wudao.model.objective import GLMObjective
from wudao.results import TrainResult
from wudao.storage import ObjectStore
from wudao.train import dist, expert_parallel
from wudao.train.checkpoint import checkpoint_prefix, complete_steps, load_checkpoint, prune, save_checkpoint
from wudao.train.data import ImagePairs, MixtureLoader, sample_indices


class TrainError(WudaoError):
    pass


def lr_at(step: int, total: int, cfg: TrainSettings) -> float:
    """Linear re-warm-up to the peak, then cosine to `min_lr_ratio` x peak at the last step (or constant)."""
    warmup = max(1, math.ceil(cfg.warmup_fraction * total))
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)  # reaches the peak at step `warmup`, where the decay begins
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def model_config(model: ModelSettings, vocab_size: int, seq_len: int) -> GLMConfig:
    fields = model.model_dump(exclude={"image_codebook_size"})
    fields["max_seq_len"] = max(model.max_seq_len, seq_len)
    return GLMConfig(vocab_size=vocab_size + model.image_codebook_size, **fields)


def active_params(model: GLMModel) -> int:
    """Parameters one token passes through: experts count top_k / n_experts of their size."""
    cfg = model.cfg
    total = 0
    for name, p in model.named_parameters():
        share = cfg.top_k / cfg.n_experts if expert_parallel.is_expert_param(name) else 1.0
        total += int(p.numel() * share)
    return total


def _peak_tflops(cfg: TrainSettings, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40", 181.0)):
            if key in name:
                return tflops  # dense bf16
    return None


class _SpikeGuard:
    """Skips non-finite losses and spikes above mean + sigma * std of the recent accepted losses of the same kind.

    Each objective (token spans, documents, images) has its own window: their losses differ by nats once a slice
    is half memorised, so one shared window would call every step of the harder objective a spike.
    """

    def __init__(self, cfg: TrainSettings, recent: dict[str, list[float]] | list[float] | None = None):
        # A list is the single window of checkpoints written before windows were per objective: start afresh.
        self.cfg, self.recent, self.in_row = cfg, dict(recent) if isinstance(recent, dict) else {}, 0

    def accept(self, loss: float, kind: str) -> bool:
        recent = self.recent.get(kind, [])
        ok = math.isfinite(loss)
        if ok and len(recent) >= max(5, self.cfg.spike_window // 2):
            mean, std = float(np.mean(recent)), float(np.std(recent))
            ok = loss <= mean + self.cfg.spike_sigma * max(std, 1e-3 * abs(mean), 1e-6)
        if ok:
            self.recent[kind] = (recent + [loss])[-self.cfg.spike_window :]
            self.in_row = 0
            return True
        self.in_row += 1
        if self.in_row >= self.cfg.max_skipped_in_row:
            raise TrainError(
                f"{self.in_row} steps in a row had a non-finite or spiking loss (last {loss}): aborting; "
                "lower train.lr or check the newest slice"
            )
        return False


@dataclass
class _Run:
    """Everything `setup` prepares for `fit`."""

    run_id: str
    model: GLMModel
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: MixtureLoader
    start_step: int
    guard: _SpikeGuard
    history: list[dict]
    tokenizer_version: str
    init_uri: str | None
    device: torch.device
    flops_per_token: float
    """Model FLOPs per trained token (6 x active parameters + attention), taken before experts are split."""
    experts: expert_parallel.ExpertGroups | None
    """The expert-parallel groups when `train.expert_parallel` > 1, else None."""


def train(
    *,
    store: ObjectStore,
    catalog: Catalog | None,
    cache_dir: Path,
    slice_ids: list[str],
    init_checkpoint_uri: str | None,
    model_settings: ModelSettings,
    train_settings: TrainSettings,
    run_id: str,
    images: ImagePairs | None = None,
) -> TrainResult:
    """Train on `slice_ids[-1]` with replay from the others, resuming `run_id` if it has a complete checkpoint."""
    dist.init()
    try:
        run = _setup(
            store, catalog, cache_dir, slice_ids, init_checkpoint_uri, model_settings, train_settings, run_id, images
        )
        return _fit(run, store, catalog, slice_ids, train_settings)
    finally:
        dist.shutdown()


def _setup(store, catalog, cache_dir, slice_ids, init_uri, model_settings, cfg, run_id, images) -> _Run:
    if not slice_ids:
        raise TrainError("no slices to train on: ingest data first (`wudao ingest SOURCE`)")
    if cfg.batch_size % dist.world_size():
        raise TrainError(f"train.batch_size={cfg.batch_size} must divide evenly over {dist.world_size()} processes")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    new = load_slice_tokens(store, slice_ids[-1], "train", cache_dir)
    old = [load_slice_tokens(store, s, "train", cache_dir) for s in slice_ids[:-1]]
    versions = {s.tokenizer_version for s in [new, *old]}
    if len(versions) != 1:
        raise TrainError(f"slices {slice_ids} were tokenized with different tokenizers {sorted(versions)}")
    tokenizer_version = versions.pop()
    tok = load_tokenizer(store.get_bytes(tokenizer_key(tokenizer_version)))
    ids = SpecialIds.from_tokenizer(tok)
    if images is not None:
        images = replace(images, code_offset=tok.get_vocab_size())  # image code ids follow the text vocabulary

    resume_steps = complete_steps(store, run_id)
    torch.manual_seed(cfg.seed)
    if resume_steps:  # autoresume: the same run crashed or stopped; continue from its newest complete checkpoint
        ckpt = load_checkpoint(store, store.url(checkpoint_prefix(run_id, resume_steps[-1])), full=True)
        init_uri = ckpt.manifest["parent_checkpoint_uri"]
    elif init_uri:
        ckpt = load_checkpoint(store, init_uri)
    else:
        ckpt = None
    if ckpt is not None and ckpt.manifest["tokenizer_version"] != tokenizer_version:
        raise TrainError(
            f"checkpoint {ckpt.uri} uses tokenizer {ckpt.manifest['tokenizer_version']} but the data uses "
            f"{tokenizer_version}: start from scratch or re-ingest with the model's tokenizer"
        )
    longest = max(cfg.seq_len, cfg.image_seq_len or 0) if images is not None else cfg.seq_len
    model = ckpt.model if ckpt is not None else GLMModel(model_config(model_settings, tok.get_vocab_size(), longest))
    if model.cfg.max_seq_len < longest:
        raise TrainError(
            f"train.seq_len / image_seq_len={longest} exceeds the model's max_seq_len={model.cfg.max_seq_len}"
        )
    moe_layers = sum(model.cfg.is_moe(i) for i in range(model.cfg.n_layers))
    why = expert_parallel.check(cfg.expert_parallel, dist.world_size(), model.cfg.n_experts, moe_layers, cfg.parallel)
    if why:
        raise TrainError(why)
    flops_per_token = 6 * active_params(model) + 12 * model.cfg.n_layers * model.cfg.d_model * cfg.seq_len
    device = dist.device()
    model.to(device)
    experts, local_experts = None, []
    if cfg.expert_parallel > 1:
        experts = expert_parallel.make_groups(cfg.expert_parallel)
        local_experts = expert_parallel.shard_experts(model, experts)
    ddp_model = dist.wrap(model, cfg.parallel, ignore=local_experts)
    # The optimizer state is reset every cycle (new data, re-warmed LR); a resumed run restores it exactly.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    start_step, history, recent = 0, [], []
    if resume_steps:
        state = ckpt.optimizer_state
        if experts is not None:
            state = expert_parallel.local_optimizer_state(state, model, experts)
        dist.load_optimizer_state(model, optimizer, state)
        torch.set_rng_state(ckpt.rng_state)
        start_step, history, recent = (
            ckpt.train_state["step"],
            ckpt.train_state["history"],
            ckpt.train_state["guard_recent"],
        )
    try:
        loader = MixtureLoader(
            new,
            old,
            ids=ids,
            sentence_ends=sentence_end_ids(tok),
            seq_len=cfg.seq_len,
            seed=cfg.seed,
            replay_fraction=cfg.replay_fraction,
            slice_weights=cfg.slice_weights,
            objective=GLMObjective.model_validate(cfg.objective),  # a dict when settings were model_copy()-updated
            image_ratio=cfg.image_ratio,
            images=images,
            image_seq_len=cfg.image_seq_len,
        )
    except ValueError as e:
        raise TrainError(str(e)) from e
    if catalog is not None and dist.is_main():
        with catalog.session() as s:
            row = s.get(TrainingRun, run_id)
            if row is None:
                s.add(
                    TrainingRun(
                        id=run_id,
                        status="running",
                        parent_checkpoint_uri=init_uri,
                        slice_ids=json.dumps(slice_ids),
                        tokenizer_version=tokenizer_version,
                    )
                )
            else:
                row.status = "running"
    return _Run(
        run_id,
        model,
        ddp_model,
        optimizer,
        loader,
        start_step,
        _SpikeGuard(cfg, recent),
        history,
        tokenizer_version,
        init_uri,
        device,
        flops_per_token,
        experts,
    )


def _autocast(cfg: TrainSettings, device: torch.device):
    bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _fit(
    run: _Run, store: ObjectStore, catalog: Catalog | None, slice_ids: list[str], cfg: TrainSettings
) -> TrainResult:
    model, optimizer = run.model, run.optimizer
    world, rank = dist.world_size(), dist.rank()
    flops_per_token = run.flops_per_token
    peak = _peak_tflops(cfg, run.device)
    manifest_base = {
        "run_id": run.run_id,
        "tokenizer_version": run.tokenizer_version,
        "slice_ids": slice_ids,
        "parent_checkpoint_uri": run.init_uri,
    }
    run.ddp_model.train()
    tokens_done, elapsed = 0, 0.0
    for step in range(run.start_step, cfg.steps):
        started = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = sample_indices(step, cfg.batch_size, rank, world, cfg.micro_batch_size)
        totals = torch.zeros(4, dtype=torch.float64)  # loss, lm loss, load-balance loss, z-loss (summed)
        expert_load = None
        optimizer.zero_grad(set_to_none=True)
        kind = run.loader.step_kind(step)
        for m, indices in enumerate(micro):
            batch = run.loader.batch(step, indices)
            sync = m == len(micro) - 1
            with contextlib.nullcontext() if sync else dist.no_sync(run.ddp_model), _autocast(cfg, run.device):
                out = _loss(run, batch)
                (out.loss / len(micro)).backward()
            totals += torch.tensor(
                [out.loss.item(), out.lm_loss.item(), out.aux.load_balance_loss.item(), out.aux.z_loss.item()],
                dtype=torch.float64,
            ) / len(micro)
            counts = out.aux.tokens_per_expert_LE
            if counts is not None and counts.numel():
                expert_load = counts.float().sum(0) if expert_load is None else expert_load + counts.float().sum(0)
        totals = dist.mean(totals)
        loss = float(totals[0])
        for p in model.parameters():
            # An expert that got no token this step has no gradient. A zero gradient instead keeps AdamW's
            # behaviour (decay, moments) the same whether the step ran on one process, DDP or FSDP2.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if run.experts is not None:
            expert_parallel.reduce_expert_grads(model, run.experts)
            grad_norm = float(expert_parallel.clip_grad_norm_(model, cfg.clip_grad, run.experts))
        else:
            grad_norm = float(dist.full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)))
        accepted = run.guard.accept(loss, kind) and math.isfinite(grad_norm)
        if accepted:
            optimizer.step()
        step_seconds = time.perf_counter() - started
        step_tokens = cfg.batch_size * run.loader.row_tokens(kind)
        tokens_done += step_tokens
        elapsed += step_seconds
        entry = {
            "step": step,
            "loss": loss,
            f"loss/{kind}": float(totals[1]),
            "lm_loss": float(totals[1]),
            "load_balance_loss": float(totals[2]),
            "z_loss": float(totals[3]),
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": step_tokens / step_seconds,
            "skipped": 0 if accepted else 1,
        }
        if expert_load is not None:
            share = (expert_load / expert_load.sum().clamp(min=1)).tolist()
            entry.update({f"expert_load/{e}": v for e, v in enumerate(share)})
        if peak:
            entry["mfu"] = flops_per_token * step_tokens / step_seconds / (peak * 1e12 * world)
        run.history.append(entry)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save(run, store, step + 1, manifest_base, cfg)
    uri = _save(run, store, cfg.steps, manifest_base, cfg)
    accepted_losses = [h["loss"] for h in run.history if not h["skipped"]]
    final_loss = accepted_losses[-1] if accepted_losses else float("nan")
    tokens_per_s = tokens_done / elapsed if elapsed > 0 else 0.0
    if catalog is not None and dist.is_main():
        with catalog.session() as s:
            row = s.get(TrainingRun, run.run_id)
            row.status, row.checkpoint_uri, row.steps = "finished", uri, cfg.steps
            row.final_loss, row.finished_at = final_loss, datetime.now(UTC)
    return TrainResult(
        run_id=run.run_id,
        checkpoint_uri=uri,
        resumed_from=run.init_uri,
        restarted_at_step=run.start_step,
        slice_ids=slice_ids,
        tokenizer_version=run.tokenizer_version,
        steps=cfg.steps,
        tokens=sum(cfg.batch_size * run.loader.row_tokens(run.loader.step_kind(s)) for s in range(cfg.steps)),
        final_loss=final_loss,
        tokens_per_s=tokens_per_s,
        skipped_steps=sum(h["skipped"] for h in run.history),
        mfu=(flops_per_token * tokens_per_s / (peak * 1e12 * world)) if peak else None,
        history=run.history,
    )


def _loss(run: _Run, batch):
    tensors = batch.tensors(run.device)
    if run.ddp_model is run.model:
        return run.model.loss(**tensors)
    # DDP only synchronises gradients for calls through its forward(): route the loss through it.
    return run.ddp_model(loss_inputs=tensors)


def _save(run: _Run, store: ObjectStore, step: int, manifest_base: dict, cfg: TrainSettings) -> str:
    uri = store.url(checkpoint_prefix(run.run_id, step))
    model_state, optimizer_state = dist.full_state(run.model, run.optimizer)  # every rank takes part
    if run.experts is not None:  # full experts, so that the checkpoint loads at any expert_parallel
        model_state = expert_parallel.gather_full(model_state, run.model, run.experts)
        optimizer_state = expert_parallel.gather_full_optimizer(optimizer_state, run.model, run.optimizer, run.experts)
    if dist.is_main():
        losses = [h["loss"] for h in run.history if not h["skipped"]]
        manifest = {**manifest_base, "step": step, "final_loss": losses[-1] if losses else None}
        train_state = {
            "step": step,
            "history": run.history,
            "guard_recent": run.guard.recent,
            "loader": {"next_step": step},
            "schedule": {
                "lr": cfg.lr,
                "warmup_fraction": cfg.warmup_fraction,
                "min_lr_ratio": cfg.min_lr_ratio,
                "schedule": cfg.schedule,
                "steps": cfg.steps,
            },
        }
        uri = save_checkpoint(
            store,
            checkpoint_prefix(run.run_id, step),
            run.model,
            manifest,
            model_state=model_state,
            optimizer_state=optimizer_state,
            train_state=train_state,
        )
        prune(store, run.run_id, cfg.keep_last)
    dist.barrier()
    return uri
