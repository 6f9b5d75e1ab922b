"""The four stages of a lifelong cycle as plain functions: settings + URIs/ids in, a JSON-able dict out.

The CLI calls them directly and the Prefect flows wrap each in a task, so both run exactly the same code and
stages never hand each other in-memory objects.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from wudao import registry
from wudao.catalog import Catalog, Slice
from wudao.config import Settings
from wudao.data.ingest import canonical_source, ingest
from wudao.storage import ObjectStore, S3Store, open_store, store_from_settings


class StageError(RuntimeError):
    pass


def platform_store(settings: Settings) -> ObjectStore:
    store = store_from_settings(settings)
    if isinstance(store, S3Store):
        store.ensure_bucket()
    return store


def catalog(settings: Settings) -> Catalog:
    return Catalog(settings.catalog_url)


def _cache_dir(settings: Settings):
    return settings.home / "cache"


def source_store_for(settings: Settings, source: str) -> ObjectStore:
    """The store to read a source through: the source's own folder, or its s3:// prefix with our credentials."""
    source = canonical_source(source)  # a missing folder is an error, never created
    return store_from_settings(settings, source) if source.startswith("s3://") else open_store(source)


def run_ingest(settings: Settings, source: str, slice_name: str | None = None, progress=None) -> dict[str, Any]:
    """New objects of `source` -> a committed slice (or no slice when nothing new arrived)."""
    source_store = source_store_for(settings, source)
    store = platform_store(settings)
    cat = catalog(settings)
    try:
        return ingest(source, source_store=source_store, store=store, catalog=cat, settings=settings.ingest,
                      slice_name=slice_name, progress=progress).to_dict()  # fmt: skip
    finally:
        cat.close()


def committed_slices(settings: Settings) -> list[str]:
    cat = catalog(settings)
    try:
        with cat.session() as s:
            return list(s.scalars(select(Slice.id).order_by(Slice.seq)))
    finally:
        cat.close()


def resolve_start(settings: Settings, start: str) -> str | None:
    """`champion` (scratch when none exists), `scratch`, or a checkpoint URI -> checkpoint URI or None."""
    if start == "scratch":
        return None
    if start == "champion":
        champ = registry.champion(settings)
        return champ.checkpoint_uri if champ else None
    return start


def run_train(settings: Settings, slice_id: str | None = None, start: str = "champion") -> dict[str, Any]:
    """Train on `slice_id` (default: the newest slice) with replay from every earlier slice."""
    from wudao.train.loop import train

    slices = committed_slices(settings)
    if not slices:
        raise StageError("no committed slices: ingest data first (`wudao ingest SOURCE`)")
    slice_id = slice_id or slices[-1]
    if slice_id not in slices:
        raise StageError(f"unknown slice {slice_id}; committed slices: {', '.join(slices)}")
    history = slices[: slices.index(slice_id) + 1]
    cat = catalog(settings)
    try:
        return train(
            store=platform_store(settings),
            catalog=cat,
            cache_dir=_cache_dir(settings),
            slice_ids=history,
            init_checkpoint_uri=resolve_start(settings, start),
            model_settings=settings.model,
            train_settings=settings.train,
        ).to_dict()
    finally:
        cat.close()


def run_evaluate(settings: Settings, checkpoint_uri: str, parent_checkpoint_uri: str | None) -> dict[str, Any]:
    """Held-out loss of the candidate, and of its parent, on every slice the candidate has seen."""
    from wudao.eval.heldout import heldout_losses
    from wudao.train.checkpoint import load_checkpoint

    store = platform_store(settings)
    candidate = load_checkpoint(store, checkpoint_uri)
    slices = candidate.manifest["slice_ids"]
    result: dict[str, Any] = {
        "checkpoint_uri": checkpoint_uri,
        "slices": slices,
        "candidate": heldout_losses(candidate.model, store, slices, _cache_dir(settings), seq_len=settings.train.seq_len),
        "parent": None,
    }
    if parent_checkpoint_uri:
        parent = load_checkpoint(store, parent_checkpoint_uri)
        result["parent"] = heldout_losses(parent.model, store, slices, _cache_dir(settings), seq_len=settings.train.seq_len)
    return result


def run_register(
    settings: Settings,
    ingest_report: dict[str, Any],
    train_result: dict[str, Any],
    evaluation: dict[str, Any],
    prefect_flow_run_id: str | None = None,
) -> dict[str, Any]:
    # The parent is the version the candidate was trained from: the champion when it continued from it.
    champ = registry.champion(settings)
    parent = champ if champ and champ.checkpoint_uri == train_result["resumed_from"] else None
    return registry.register_cycle(
        settings,
        store=platform_store(settings),
        ingest_report=ingest_report,
        train_result=train_result,
        evaluation=evaluation,
        parent=parent,
        prefect_flow_run_id=prefect_flow_run_id,
    ).to_dict()
