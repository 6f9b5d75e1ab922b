"""What every stage shares: the platform's store and catalog, the slices committed so far, and the model a user
names (`champion`, `candidate`, `scratch`, `models:/...` or a checkpoint URI) resolved and loaded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from wudao import registry
from wudao.catalog import Catalog, Slice
from wudao.config import Settings
from wudao.data.ingest import canonical_source
from wudao.errors import WudaoError
from wudao.storage import ObjectStore, S3Store, open_store, store_from_settings


class StageError(WudaoError):
    pass


def platform_store(settings: Settings) -> ObjectStore:
    store = store_from_settings(settings)
    if isinstance(store, S3Store):
        store.ensure_bucket()
    return store


def catalog(settings: Settings) -> Catalog:
    return Catalog(settings.catalog_url)


def cache_dir(settings: Settings) -> Path:
    """Local cache of shards, features and weights (safe to delete)."""
    return settings.home / "cache"


def source_store_for(settings: Settings, source: str) -> ObjectStore:
    """The store to read a source through: the source's own folder, or its s3:// prefix with our credentials."""
    source = canonical_source(source)  # a missing folder is an error, never created
    return store_from_settings(settings, source) if source.startswith("s3://") else open_store(source)


def committed_slices(settings: Settings) -> list[str]:
    cat = catalog(settings)
    try:
        with cat.session() as s:
            return list(s.scalars(select(Slice.id).order_by(Slice.seq)))
    finally:
        cat.close()


def unlearned_slice(settings: Settings) -> str | None:
    """The newest committed slice when no registered version has learned it yet (a cycle that died after its
    ingest, or a standalone `wudao ingest`), else None. Training it replays every earlier slice, so the newest
    is the only one to resume."""
    slices = committed_slices(settings)
    if not slices or slices[-1] in registry.learned_slices(settings):
        return None
    return slices[-1]


def resolve_checkpoint(settings: Settings, ref: str | None) -> str | None:
    """A model reference -> checkpoint URI: `champion` / `candidate` (None when there is none yet), `scratch` or
    None (None), `models:/name/version` or `models:/name@alias`, or a checkpoint URI as is."""
    if ref in (None, "", "scratch"):
        return None
    if ref in (registry.CHAMPION, registry.CANDIDATE):
        found = registry.alias_version(settings, ref)
        return found.checkpoint_uri if found else None
    if ref.startswith("models:/"):
        return registry.checkpoint_of(settings, ref)
    return ref


def baseline_checkpoint(settings: Settings, resumed_from: str | None) -> str | None:
    """What a candidate is judged against: the checkpoint it continued from, else the current champion."""
    return resumed_from or resolve_checkpoint(settings, registry.CHAMPION)


def generator_for(settings: Settings, model: str):
    """A text/image generator for `champion`, a checkpoint URI, or an MLflow `models:/…` URI (via its tag)."""
    from wudao.data.tokenizer import load_tokenizer, tokenizer_key
    from wudao.serving import Generator
    from wudao.train.checkpoint import load_checkpoint

    uri = model
    if model == "champion":
        champ = registry.champion(settings)
        uri = champ.checkpoint_uri if champ else _newest_trained(settings)
        if uri is None:
            raise StageError("no champion and no trained model yet: run `wudao cycle SOURCE` or `wudao train`")
    elif model.startswith("models:/"):
        uri = registry.checkpoint_of(settings, model)
    store = platform_store(settings)
    ckpt = load_checkpoint(store, uri)
    tok = load_tokenizer(store.get_bytes(tokenizer_key(ckpt.manifest["tokenizer_version"])))
    return Generator.create(ckpt.model, tok), uri


def _newest_trained(settings: Settings) -> str | None:
    """Before anything is registered, `champion` means the newest finished training run (said on stderr)."""
    from wudao.catalog import TrainingRun

    cat = catalog(settings)
    try:
        with cat.session() as s:
            run = s.scalars(
                select(TrainingRun).where(TrainingRun.status == "finished").order_by(TrainingRun.finished_at.desc())
            ).first()
            uri = run.checkpoint_uri if run else None
    finally:
        cat.close()
    if uri:
        print(f"no registered champion yet: using the newest trained checkpoint {uri}", file=sys.stderr)
    return uri


def current_vq(settings: Settings):
    """The platform's current image tokenizer (VQ-VAE); a clear error before any images were learned."""
    from wudao.train import vq

    model = vq.load_current(platform_store(settings))
    if model is None:
        raise StageError("no VQ model: run `wudao train-vq` after ingesting images")
    return model


def painter_for(settings: Settings, model: str):
    """A `Painter` (text -> image) for the model a user names and the current image tokenizer, and the checkpoint
    URI the name resolved to."""
    from wudao.serving import Painter

    vq_model = current_vq(settings)  # first: no model loads when there is nothing to draw with
    gen, uri = generator_for(settings, model)
    return Painter(gen, vq_model, settings.ingest.image_size), uri


def draw(settings: Settings, gen, caption: str, out, candidates: int, seed: int) -> dict[str, Any]:
    """Draw a caption with `gen` and the current image tokenizer and write the PNG to `out`."""
    from wudao.serving import Painter

    painter = Painter(gen, current_vq(settings), settings.ingest.image_size)
    Path(out).write_bytes(painter.png(caption, candidates, seed))
    return {"out": str(out), "grid": painter.grid, "candidates": candidates}
