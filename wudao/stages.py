"""The four stages of a lifelong cycle as plain functions: settings + URIs/ids in, a JSON-able dict out.

The CLI calls them directly and the Prefect flows wrap each in a task, so both run exactly the same code and
stages never hand each other in-memory objects.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from wudao import registry
from wudao.catalog import Catalog, Slice
from wudao.config import Settings
from wudao.data.ingest import Readers, canonical_source, ingest
from wudao.errors import WudaoError
from wudao.results import Evaluation, FIDSummary, IngestResult, KGSummary, Registration, Trained, TrainResult
from wudao.storage import ObjectStore, S3Store, StorageError, open_store, store_from_settings

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
"""A training run id: one path segment of `checkpoints/<run_id>/` (no '/', no '..')."""


class StageError(WudaoError):
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
            cache_dir=_cache_dir(settings),
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
                _cache_dir(settings),
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
    return vq.encode_slices(model, store, slices, _cache_dir(settings), settings.ingest.image_size, settings.model)


def run_evaluate(
    settings: Settings, checkpoint_uri: str, parent_checkpoint_uri: str | None, mlflow_run_id: str | None = None
) -> Evaluation:
    """Held-out loss of the candidate, and of its parent, on every slice the candidate has seen."""
    from wudao.data.glm import SpecialIds
    from wudao.data.tokenizer import load_tokenizer, tokenizer_key
    from wudao.eval.heldout import heldout_losses
    from wudao.train.checkpoint import load_checkpoint

    store = platform_store(settings)
    candidate = load_checkpoint(store, checkpoint_uri)
    slices = candidate.manifest["slice_ids"]
    ids = SpecialIds.from_tokenizer(
        load_tokenizer(store.get_bytes(tokenizer_key(candidate.manifest["tokenizer_version"])))
    )

    def losses(model):
        return heldout_losses(model, store, slices, _cache_dir(settings), ids, seq_len=settings.train.seq_len)

    result = Evaluation(checkpoint_uri=checkpoint_uri, slices=slices, candidate=losses(candidate.model))
    if parent_checkpoint_uri:
        result.parent = losses(load_checkpoint(store, parent_checkpoint_uri).model)
    if settings.eval.fid_coco_uri and (fid := _cycle_fid(settings, checkpoint_uri, mlflow_run_id)):
        result.fid = FIDSummary.model_validate(fid)
    if settings.eval.kg_uri:
        kg = run_eval_kg(settings, checkpoint_uri, settings.eval.kg_uri, settings.eval.kg_limit, with_facts=True)
        result.kg = KGSummary.model_validate(kg)
        if parent_checkpoint_uri:  # the same facts, so the KG gate compares like with like
            kg_parent = run_eval_kg(settings, parent_checkpoint_uri, settings.eval.kg_uri, settings.eval.kg_limit)
            result.kg_parent = KGSummary.model_validate(kg_parent)
    return result


def _cycle_fid(settings: Settings, checkpoint_uri: str, mlflow_run_id: str | None) -> dict[str, Any] | None:
    """FID/KID of a cycle's candidate (grid logged to the evaluate run; metrics are logged with the rest of the
    evaluation). Without an image tokenizer there is nothing to draw with: FID is skipped, and the FID gate says so."""
    from wudao.train import vq

    if not platform_store(settings).exists(vq.CURRENT):  # run_eval_fid loads the model itself
        print("FID skipped: no image tokenizer yet (no images ingested)", file=sys.stderr)
        return None
    report = run_eval_fid(
        settings, checkpoint_uri, settings.eval.fid_coco_uri, mlflow_run_id=mlflow_run_id, log_metrics=False
    )
    # FIDs compare only when measured the same way: same reference set and statistics, same number of candidates.
    return {**report, "key": f"{report['reference_key']}/k{report['candidates']}"}


def kg_files(settings: Settings, kg_uri: str) -> dict[str, bytes]:
    """A KG folder's files (local or s3://) by name; a missing folder or file is one clear error."""
    from wudao.eval.kg import KG_FACTS, KG_TEMPLATES

    if not kg_uri.startswith("s3://") and not Path(kg_uri).is_dir():
        raise StageError(f"KG folder {kg_uri} does not exist (make one with `wudao kg build OUT`)")
    store = store_from_settings(settings, kg_uri) if kg_uri.startswith("s3://") else open_store(kg_uri)
    missing = [name for name in (KG_FACTS, KG_TEMPLATES) if not store.exists(name)]
    if missing:
        raise StageError(f"KG folder {kg_uri} lacks {', '.join(missing)}")
    return {name: store.get_bytes(name) for name in (KG_FACTS, KG_TEMPLATES)}


def load_kg(settings: Settings, kg_uri: str):
    """A KG folder (local or s3://) in the documented format; a missing file is one clear error."""
    from wudao.eval.kg import KG_FACTS, KG_TEMPLATES, parse_kg

    files = kg_files(settings, kg_uri)
    return parse_kg(files[KG_FACTS].decode("utf-8", "replace"), files[KG_TEMPLATES].decode("utf-8", "replace"))


def run_eval_kg(
    settings: Settings,
    model: str,
    kg_uri: str,
    limit: int | None,
    with_facts: bool = False,
    slice_id: str | None = None,
) -> dict[str, Any]:
    """Cloze P@1 / MRR beside chance and majority (macro over relations, by language and by slice, bootstrap CI)
    and claim rates; `slice_id` keeps only the facts whose `first_slice` it is."""
    from wudao.eval.kg import evaluate_kg, facts_of_slice

    kg = load_kg(settings, kg_uri)
    try:  # checked before the model loads, so a mistyped id fails at once
        facts_of_slice(kg, slice_id)
    except ValueError as e:
        raise StageError(str(e)) from e
    gen, uri = generator_for(settings, model)
    report = evaluate_kg(
        gen.model, gen.tokenizer, kg, limit=limit, slice_id=slice_id, claim_subjects=settings.eval.kg_claim_subjects
    )
    return {"model": uri, "kg": kg_uri, **report.to_dict(with_facts=with_facts)}


def run_register(
    settings: Settings,
    trained: Trained,
    evaluation: Evaluation,
    cycle_run_id: str,
    stage_run_id: str | None = None,
    prefect_flow_run_id: str | None = None,
) -> Registration:
    """Register the trained checkpoint as a model version, apply the promotion gates, move the aliases."""
    # The parent is the version the candidate was trained from, else the champion it would replace.
    parent = registry.version_of_checkpoint(settings, trained.resumed_from) or registry.champion(settings)
    kg = None
    if (
        kg_uri := evaluation.kg.get("kg") if evaluation.kg else None
    ):  # the KG this version was evaluated with travels with it
        try:
            kg = {"uri": kg_uri, "files": kg_files(settings, kg_uri)}
        except (
            StageError,
            StorageError,
            OSError,
        ) as e:  # gone since the evaluation: the version is still registered, and says why it has none
            print(
                f"warning: KG {kg_uri} not logged with the version ({e}): it cannot check facts when served",
                file=sys.stderr,
            )
            kg = {"uri": kg_uri, "error": str(e).splitlines()[0]}
    return registry.register_cycle(
        settings,
        kg_artifact=kg,
        store=platform_store(settings),
        trained=trained,
        evaluation=evaluation,
        parent=parent,
        cycle_run_id=cycle_run_id,
        stage_run_id=stage_run_id,
        prefect_flow_run_id=prefect_flow_run_id,
    )


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


def run_eval_fid(
    settings: Settings,
    model: str,
    coco_uri: str,
    n: int | None = None,
    candidates: int | None = None,
    mlflow_run_id: str | None = None,
    step: int = 0,
    log_metrics: bool = True,
) -> dict[str, Any]:
    """MS-COCO FID / KID (and FID-k) of `model`'s text -> image generation (see wudao/eval/fid.py).

    Generated PNGs, the sample grid and the report go to `eval/<mlflow_run_id or fid-<digest>>/fid/` in the platform
    store. Where the captions name a shape and a background colour (the demo scenes), `follows` says how often the
    images show them (wudao/eval/follows.py). With `mlflow_run_id`, fid / kid_mean / kid_std (and fid_blur/<radius>,
    follows/<figure>) and the grid (`fid_samples`) are logged to that run at `step`."""
    import hashlib
    import json
    import time
    import zlib

    import numpy as np
    import torch

    from wudao.data.demo import SCENE_PALETTE
    from wudao.eval import fid
    from wudao.eval.follows import follows_captions
    from wudao.storage import join_key
    from wudao.train import vq

    ev = settings.eval
    if not coco_uri.startswith("s3://") and not Path(coco_uri).is_dir():
        raise StageError(
            f"MS-COCO folder {coco_uri} does not exist (annotations/captions_<split>.json + <split>/ "
            "images; `wudao demo-data OUT` writes one under OUT/coco)"
        )
    weights = fid.resolve_weights(
        ev.fid_weights_uri, _cache_dir(settings), lambda uri: store_from_settings(settings, uri)
    )
    store = platform_store(settings)
    coco = store_from_settings(settings, coco_uri) if coco_uri.startswith("s3://") else open_store(coco_uri)
    vq_model = vq.load_current(store)
    if vq_model is None:
        raise StageError("no VQ model: run `wudao train-vq` after ingesting images")
    gen, uri = generator_for(settings, model)
    grid = settings.ingest.image_size // 2**vq_model.cfg.n_down
    k = candidates or ev.fid_candidates

    drawn: tuple[list[str], list[np.ndarray]] = ([], [])  # for the colour probe

    def generate(captions: list[str], image_ids: list[int]) -> np.ndarray:
        # The model samples one caption at a time (its candidates as a batch); the VQ decodes the whole batch.
        codes = [
            gen.image_codes(
                c,
                grid=grid,
                codebook_size=vq_model.cfg.codebook_size,
                candidates=k,
                seed=zlib.crc32(f"{ev.fid_seed}:{i}".encode()),
            )
            for c, i in zip(captions, image_ids)
        ]
        with torch.no_grad():
            images = vq_model.decode(torch.from_numpy(np.stack(codes))).clamp(0, 1)
        images_NHWC = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        drawn[0].extend(captions)
        drawn[1].extend(images_NHWC)
        return images_NHWC

    cfg = fid.FIDConfig(
        n=n or ev.fid_n,
        resolution=ev.fid_resolution or settings.ingest.image_size,
        real_set=ev.fid_real,
        split=ev.fid_split,
        blur_sigmas=tuple(ev.fid_blur_sigmas),
        seed=ev.fid_seed,
        batch_size=ev.fid_batch_size,
        max_pixels=settings.ingest.image_max_pixels,
    )
    eval_id = (
        mlflow_run_id or "fid-" + hashlib.sha256(json.dumps([uri, coco_uri, repr(cfg), k]).encode()).hexdigest()[:12]
    )
    report, grid_image = fid.evaluate_fid(coco, store, join_key("eval", eval_id, "fid"), weights, generate, cfg)
    if follows := follows_captions(*drawn, SCENE_PALETTE):  # captions of plain-colour scenes (the demo's) only
        report["follows"] = follows.to_dict()
        store.put_json(join_key("eval", eval_id, "fid", "report.json"), report)
    if mlflow_run_id:
        from mlflow.entities import Metric

        c = registry.client(settings)
        values = {
            "fid": report["fid"],
            "kid_mean": report["kid_mean"],
            "kid_std": report["kid_std"],
            **{f"fid_blur/{r}": v for r, v in report.get("fid_blur", {}).items()},
            **{f"follows/{name}": v for name, v in report.get("follows", {}).items()},
        }
        now = int(time.time() * 1000)
        if log_metrics:
            c.log_batch(mlflow_run_id, metrics=[Metric(name, float(v), now, step) for name, v in values.items()])
        c.log_image(mlflow_run_id, grid_image, key="fid_samples", step=step)
    return {"model": uri, "coco": coco_uri, "eval_id": eval_id, "candidates": k, **report}
