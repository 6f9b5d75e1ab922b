"""Evaluate: held-out loss per slice against the parent, KG fact checks and MS-COCO FID of a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from wudao import registry
from wudao.config import Settings
from wudao.results import Evaluation, FIDSummary, KGSummary
from wudao.stages.common import StageError, cache_dir, generator_for, painter_for, platform_store
from wudao.storage import open_store, store_from_settings


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
        return heldout_losses(model, store, slices, cache_dir(settings), ids, seq_len=settings.train.seq_len)

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

    from wudao.data.demo import SCENE_PALETTE
    from wudao.eval import fid
    from wudao.eval.follows import follows_captions
    from wudao.storage import join_key

    ev = settings.eval
    if not coco_uri.startswith("s3://") and not Path(coco_uri).is_dir():
        raise StageError(
            f"MS-COCO folder {coco_uri} does not exist (annotations/captions_<split>.json + <split>/ "
            "images; `wudao demo-data OUT` writes one under OUT/coco)"
        )
    weights = fid.resolve_weights(
        ev.fid_weights_uri, cache_dir(settings), lambda uri: store_from_settings(settings, uri)
    )
    store = platform_store(settings)
    coco = store_from_settings(settings, coco_uri) if coco_uri.startswith("s3://") else open_store(coco_uri)
    painter, uri = painter_for(settings, model)
    k = candidates or ev.fid_candidates

    drawn: tuple[list[str], list[np.ndarray]] = ([], [])  # for the colour probe

    def generate(captions: list[str], image_ids: list[int]) -> np.ndarray:
        seeds = [zlib.crc32(f"{ev.fid_seed}:{i}".encode()) for i in image_ids]  # per image: any N draws it the same
        images_NHWC = painter.images(captions, seeds, k)
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
