"""Ingest and train: new raw data -> a committed slice -> a checkpoint that learned it (with replay)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from wudao.config import Settings
from wudao.data.ingest import Readers, ingest
from wudao.results import IngestResult, Trained, TrainResult
from wudao.stages.common import (
    StageError,
    cache_dir,
    catalog,
    committed_slices,
    platform_store,
    resolve_checkpoint,
    source_store_for,
)
from wudao.storage import ObjectStore

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
"""A training run id: one path segment of `checkpoints/<run_id>/` (no '/', no '..')."""


def run_ingest(
    settings: Settings,
    source: str,
    slice_name: str | None = None,
    progress=None,
    readers: Readers | None = None,
    on_wait=None,
) -> IngestResult:
    """New objects of `source` -> a committed slice (or no slice when nothing new arrived). Batches are read by
    `readers` (the ingest flow's Prefect tasks), else in this process or `ingest.workers` worker processes."""
    source_store = source_store_for(settings, source)
    store = platform_store(settings)
    cat = catalog(settings)
    try:

        def waiting() -> None:
            print("waiting for another ingest to finish (catalog lock)", file=sys.stderr, flush=True)

        return ingest(
            source,
            source_store=source_store,
            store=store,
            catalog=cat,
            settings=settings.ingest,
            slice_name=slice_name,
            progress=progress,
            on_wait=on_wait or waiting,
            readers=readers,
        )
    finally:
        cat.close()


def run_train(
    settings: Settings, slice_id: str | None = None, start: str = "champion", run_id: str | None = None
) -> TrainResult:
    """Train on `slice_id` (default: the newest slice) with replay from every earlier slice.

    The run id defaults to a digest of (slices, start checkpoint, train settings), so rerunning the same
    training after a crash resumes it from its newest complete checkpoint instead of starting over.
    """
    from wudao.train.loop import train

    if run_id is not None and not RUN_ID.match(run_id):
        raise StageError(f"invalid run id {run_id!r}: use 1-96 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    slices = committed_slices(settings)
    if not slices:
        raise StageError("no committed slices: ingest data first (`wudao ingest SOURCE`)")
    slice_id = slices[-1] if slice_id in (None, "latest") else slice_id
    if slice_id not in slices:
        raise StageError(f"unknown slice {slice_id}; committed slices: {', '.join(slices)}")
    history = slices[: slices.index(slice_id) + 1]
    init_uri = resolve_checkpoint(settings, start)
    store = platform_store(settings)
    run_id = run_id or _run_id(history, init_uri, settings)
    cat = catalog(settings)
    try:
        return train(
            store=store,
            catalog=cat,
            cache_dir=cache_dir(settings),
            slice_ids=history,
            init_checkpoint_uri=init_uri,
            model_settings=settings.model,
            train_settings=settings.train,
            run_id=run_id,
            images=_image_pairs(settings, store, history) if settings.train.image_ratio > 0 else None,
        )
    finally:
        cat.close()


def run_train_torchrun(
    settings: Settings, overrides: dict[str, Any] | None, slice_id: str | None, start: str | None
) -> TrainResult:
    """The same training as `run_train`, as `torchrun --standalone --nproc-per-node N wudao train` in a subprocess
    (rank 0 prints the result). The caller's overrides travel in the environment, secrets stay in it."""
    import json
    import os
    import subprocess

    from wudao.config import OVERRIDES_ENV

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        str(settings.train.nproc_per_node),
        "-m",
        "wudao.cli",
        "train",
        "--slice",
        slice_id or "latest",
        "--from",
        start or "scratch",
        "--json",
        "--keep-history",
    ]
    env = {**os.environ, OVERRIDES_ENV: json.dumps(overrides or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [
            line for line in proc.stderr.splitlines() if line.startswith("error:")
        ] or proc.stderr.strip().splitlines()[-1:]
        raise StageError(f"torchrun training failed ({proc.returncode}): {lines[-1] if lines else 'no output'}")
    return TrainResult.model_validate_json(proc.stdout.strip().splitlines()[-1])


def _run_id(slices: list[str], init_uri: str | None, settings: Settings) -> str:
    import hashlib
    import json

    # How the run is launched does not change what it computes: two ranks with half the micro-batches each
    # train the same model, and so do experts split over ranks, so a rerun under another launcher resumes it.
    train = settings.train.model_dump(exclude={"launcher", "nproc_per_node", "threads", "expert_parallel"})
    key = json.dumps([slices, init_uri, settings.model.model_dump(), train], sort_keys=True)
    return f"{slices[-1]}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _image_pairs(settings: Settings, store: ObjectStore, slices: list[str]):
    """Caption ids and VQ codes of the slices' images (training the image tokenizer first when there is none
    yet and the slices hold images), or None when there are no images to learn from."""
    from wudao.train import vq

    model = vq.load_current(store)
    if model is None:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would train (and write) its own tokenizer
            raise StageError("no image tokenizer yet: run `wudao train-vq` once before a multi-process training")
        try:
            report = vq.train_vq(
                store,
                slices,
                cache_dir(settings),
                image_size=settings.ingest.image_size,
                codebook_size=settings.model.image_codebook_size,
                steps=settings.train.vq_steps,
                hidden=settings.train.vq_hidden,
                seed=settings.train.seed,
            )
        except vq.VQError as e:  # no images yet: text only this time
            print(f"no image tokenizer and {e}: training on text only", file=sys.stderr)
            return None
        print(f"trained the image tokenizer once: {report}", file=sys.stderr)
        model = vq.load_current(store)
    codes = (settings.ingest.image_size // 2**model.cfg.n_down) ** 2
    row_len = settings.train.image_seq_len or settings.train.seq_len
    if row_len < codes + 24:  # [ROI] caption [BASE] [BOI] codes [EOI] in one row
        raise StageError(
            f"train.image_seq_len (or seq_len)={row_len} cannot hold an image row ({codes} codes + its caption): "
            f"set train.image_seq_len to at least {codes + 24} (model.max_seq_len grows with it), or image_ratio=0"
        )
    return vq.encode_slices(model, store, slices, cache_dir(settings), settings.ingest.image_size, settings.model)


def train_result_of(settings: Settings, checkpoint_uri: str) -> Trained:
    """What registration needs about a finished training, read back from its checkpoint's manifest."""
    from wudao.train.checkpoint import read_manifest

    m = read_manifest(platform_store(settings), checkpoint_uri)
    return Trained(
        run_id=m["run_id"],
        checkpoint_uri=checkpoint_uri,
        resumed_from=m.get("parent_checkpoint_uri"),
        slice_ids=m["slice_ids"],
        tokenizer_version=m["tokenizer_version"],
        steps=m["step"],
    )
