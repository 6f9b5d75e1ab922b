"""The four stages of a lifelong cycle as plain functions: settings + URIs/ids in, a JSON-able dict out.

The CLI calls them directly and the Prefect flows wrap each in a task, so both run exactly the same code and
stages never hand each other in-memory objects.
"""

from __future__ import annotations

from pathlib import Path
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


def run_train(settings: Settings, slice_id: str | None = None, start: str = "champion", run_id: str | None = None) -> dict[str, Any]:
    """Train on `slice_id` (default: the newest slice) with replay from every earlier slice.

    The run id defaults to a digest of (slices, start checkpoint, train settings), so rerunning the same
    training after a crash resumes it from its newest complete checkpoint instead of starting over.
    """
    from wudao.train.loop import train

    slices = committed_slices(settings)
    if not slices:
        raise StageError("no committed slices: ingest data first (`wudao ingest SOURCE`)")
    slice_id = slices[-1] if slice_id in (None, "latest") else slice_id
    if slice_id not in slices:
        raise StageError(f"unknown slice {slice_id}; committed slices: {', '.join(slices)}")
    history = slices[: slices.index(slice_id) + 1]
    init_uri = resolve_start(settings, start)
    store = platform_store(settings)
    run_id = run_id or _run_id(history, init_uri, settings)
    cat = catalog(settings)
    try:
        return train(
            store=store,
            catalog=cat,
            cache_dir=_cache_dir(settings),
            slice_ids=history,
            init_checkpoint_uri=init_uri,
            model_settings=settings.model,
            train_settings=settings.train,
            run_id=run_id,
            images=_image_pairs(settings, store, history) if settings.train.image_ratio > 0 else None,
        ).to_dict()
    finally:
        cat.close()


def _run_id(slices: list[str], init_uri: str | None, settings: Settings) -> str:
    import hashlib
    import json

    key = json.dumps([slices, init_uri, settings.model.model_dump(), settings.train.model_dump()], sort_keys=True)
    return f"{slices[-1]}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _image_pairs(settings: Settings, store: ObjectStore, slices: list[str]):
    """Caption ids and VQ codes of the slices' images, or None when no VQ model has been trained yet."""
    from wudao.train import vq

    model = vq.load_current(store)
    if model is None:
        return None
    return vq.encode_slices(model, store, slices, _cache_dir(settings), settings.ingest.image_size, settings.model)


def run_evaluate(settings: Settings, checkpoint_uri: str, parent_checkpoint_uri: str | None) -> dict[str, Any]:
    """Held-out loss of the candidate, and of its parent, on every slice the candidate has seen."""
    from wudao.data.glm import SpecialIds
    from wudao.data.tokenizer import load_tokenizer, tokenizer_key
    from wudao.eval.heldout import heldout_losses
    from wudao.train.checkpoint import load_checkpoint

    store = platform_store(settings)
    candidate = load_checkpoint(store, checkpoint_uri)
    slices = candidate.manifest["slice_ids"]
    ids = SpecialIds.from_tokenizer(load_tokenizer(store.get_bytes(tokenizer_key(candidate.manifest["tokenizer_version"]))))

    def losses(model):
        return heldout_losses(model, store, slices, _cache_dir(settings), ids, seq_len=settings.train.seq_len)

    result: dict[str, Any] = {"checkpoint_uri": checkpoint_uri, "slices": slices, "candidate": losses(candidate.model), "parent": None}
    if parent_checkpoint_uri:
        result["parent"] = losses(load_checkpoint(store, parent_checkpoint_uri).model)
    if settings.eval.kg_uri:
        result["kg"] = run_eval_kg(settings, checkpoint_uri, settings.eval.kg_uri, settings.eval.kg_limit, with_facts=True)
    return result


def load_kg(settings: Settings, kg_uri: str):
    """A KG folder (local or s3://) in the documented format; a missing file is one clear error."""
    from wudao.eval.kg import KG_FACTS, KG_TEMPLATES, parse_kg

    if not kg_uri.startswith("s3://") and not Path(kg_uri).is_dir():
        raise StageError(f"KG folder {kg_uri} does not exist (make one with `wudao kg build OUT`)")
    store = store_from_settings(settings, kg_uri) if kg_uri.startswith("s3://") else open_store(kg_uri)
    missing = [name for name in (KG_FACTS, KG_TEMPLATES) if not store.exists(name)]
    if missing:
        raise StageError(f"KG folder {kg_uri} lacks {', '.join(missing)}")
    return parse_kg(store.get_bytes(KG_FACTS).decode("utf-8", "replace"), store.get_bytes(KG_TEMPLATES).decode("utf-8", "replace"))


def run_eval_kg(settings: Settings, model: str, kg_uri: str, limit: int | None, with_facts: bool = False) -> dict[str, Any]:
    """Cloze P@1 / MRR (macro over relations, by language and by slice, bootstrap CI) and claim rates."""
    from wudao.eval.kg import evaluate_kg

    gen, uri = generator_for(settings, model)
    report = evaluate_kg(gen.model, gen.tokenizer, load_kg(settings, kg_uri), limit=limit,
                         claim_subjects=settings.eval.kg_claim_subjects)  # fmt: skip
    return {"model": uri, "kg": kg_uri, **report.to_dict(with_facts=with_facts)}


def run_register(
    settings: Settings,
    ingest_report: dict[str, Any],
    train_result: dict[str, Any],
    evaluation: dict[str, Any],
    prefect_flow_run_id: str | None = None,
    mlflow_run_id: str | None = None,
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
        mlflow_run_id=mlflow_run_id,
    ).to_dict()


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
    import sys

    from wudao.catalog import TrainingRun

    cat = catalog(settings)
    try:
        with cat.session() as s:
            run = s.scalars(select(TrainingRun).where(TrainingRun.status == "finished").order_by(TrainingRun.finished_at.desc())).first()
            uri = run.checkpoint_uri if run else None
    finally:
        cat.close()
    if uri:
        print(f"no registered champion yet: using the newest trained checkpoint {uri}", file=sys.stderr)
    return uri


def draw(settings: Settings, gen, caption: str, out, candidates: int, seed: int) -> dict[str, Any]:
    """Sample image codes for a caption, decode them with the current VQ model and write a PNG."""
    from PIL import Image

    from wudao.train import vq

    model = vq.load_current(platform_store(settings))
    if model is None:
        raise StageError("no VQ model: run `wudao train-vq` after ingesting images")
    grid = settings.ingest.image_size // 2**model.cfg.n_down
    codes = gen.image_codes(caption, grid=grid, codebook_size=model.cfg.codebook_size, candidates=candidates, seed=seed)
    import torch

    image = model.decode(torch.from_numpy(codes)[None]).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    Image.fromarray((image * 255).round().astype("uint8")).save(out, format="PNG")
    return {"out": str(out), "grid": grid, "candidates": candidates}
