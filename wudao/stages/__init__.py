"""The four stages of a lifelong cycle as plain functions: settings + URIs/ids in, a typed result out
(`wudao.results`).

    learn.py     run_ingest, run_train (and its torchrun launcher)
    evaluate.py  run_evaluate: held-out loss per slice, KG fact checks (run_eval_kg), MS-COCO FID (run_eval_fid)
    register.py  run_register: a model version, the promotion gates, the aliases
    common.py    the store, the catalog, committed slices and the model a user names, resolved and loaded

The CLI calls them directly and the Prefect flows wrap each in a task, so both run exactly the same code and
stages never hand each other in-memory objects.
"""

from wudao.stages.common import (
    StageError,
    baseline_checkpoint,
    cache_dir,
    catalog,
    committed_slices,
    current_vq,
    draw,
    generator_for,
    painter_for,
    platform_store,
    resolve_checkpoint,
    source_store_for,
    unlearned_slice,
)
from wudao.stages.evaluate import kg_files, load_kg, run_eval_fid, run_eval_kg, run_evaluate
from wudao.stages.learn import RUN_ID, run_ingest, run_train, run_train_torchrun, train_result_of
from wudao.stages.register import run_register

__all__ = [
    "RUN_ID",
    "StageError",
    "baseline_checkpoint",
    "cache_dir",
    "catalog",
    "committed_slices",
    "current_vq",
    "draw",
    "generator_for",
    "kg_files",
    "load_kg",
    "painter_for",
    "platform_store",
    "resolve_checkpoint",
    "run_eval_fid",
    "run_eval_kg",
    "run_evaluate",
    "run_ingest",
    "run_register",
    "run_train",
    "run_train_torchrun",
    "source_store_for",
    "train_result_of",
    "unlearned_slice",
]
