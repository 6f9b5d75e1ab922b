"""`wudao tune`: settings + a task folder + a base model reference in, a registered adapter and its figures out.

The base is `champion` (default), `candidate`, `models:/name/version|@alias` or a checkpoint URI. The adapter is
written under `adapters/<id>/` in the platform store (manifest last), the tuning is one MLflow run (`tune`, with
the loss by step and the figures), and the adapter is registered as a version of `registry.adapter_model_name`
(`wudao-adapters`): a pyfunc model holding the base and the adapter, so `mlflow models serve` serves both,
tagged with the base's registered model and version.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

import wudao
from wudao import registry, tracking
from wudao.config import Settings
from wudao.errors import WudaoError
from wudao.tune.adapter import download_adapter, save_adapter
from wudao.tune.recipe import tune
from wudao.tune.task import load_task


class TuneError(WudaoError):
    """Tuning cannot start (no base model to tune)."""


@dataclass
class Base:
    checkpoint_uri: str
    model_name: str | None
    """The registered model the base is a version of (None: an unregistered checkpoint)."""
    version: str | None


def resolve_base(settings: Settings, ref: str) -> Base:
    """`champion` / `candidate`, `models:/name/version|@alias`, or a checkpoint URI (its version when registered)."""
    if ref in (registry.CHAMPION, registry.CANDIDATE):
        found = registry.alias_version(settings, ref)
        if found is None:
            raise TuneError(
                f"model {settings.registry.model_name} has no @{ref} yet: run a cycle first "
                "(`wudao cycle SOURCE`), or pass --model with a checkpoint URI"
            )
        return Base(found.checkpoint_uri, settings.registry.model_name, str(found.version))
    if ref.startswith("models:/"):
        name, found = registry.version_of(settings, ref)
        return Base(found.checkpoint_uri, name, str(found.version))
    found = registry.version_of_checkpoint(settings, ref)
    return Base(ref, settings.registry.model_name if found else None, str(found.version) if found else None)


def adapter_id(task_name: str, method: str, key: Any) -> str:
    """`<task>-<method>-<digest>`: the digest of what was trained (task files, base, settings), so the same
    tuning gives the same id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", task_name).strip("-._")[:40] or "task"
    return f"{safe}-{method}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}"


def run_tune(settings: Settings, task_dir: str | Path, model_ref: str = "champion") -> dict[str, Any]:
    """Tune an adapter on the task with `settings.tune`, store it, log the run and register the adapter."""
    from wudao.data.tokenizer import load_tokenizer, tokenizer_key
    from wudao.pyfunc import ADAPTER_PARAMS, WudaoTunedLM
    from wudao.stages import platform_store
    from wudao.train.checkpoint import load_checkpoint

    task = load_task(Path(task_dir))  # a bad task file fails before any model loads
    cfg = settings.tune
    base = resolve_base(settings, model_ref)
    store = platform_store(settings)
    ckpt = load_checkpoint(store, base.checkpoint_uri)
    tokenizer_version = ckpt.manifest["tokenizer_version"]
    tokenizer = load_tokenizer(store.get_bytes(tokenizer_key(tokenizer_version)))
    c = tracking.client(settings)
    with tracking.stage_run(settings, None, "tune") as run_id:
        c.set_tag(run_id, "mlflow.runName", f"tune-{task.name}-{cfg.method}")
        outcome = tune(
            ckpt.model,
            tokenizer,
            task,
            cfg,
            base_checkpoint_uri=base.checkpoint_uri,
            tokenizer_version=tokenizer_version,
        )
        m = outcome.metrics
        now = int(time.time() * 1000)
        tracking.log_metrics(
            settings,
            run_id,
            [Metric("train_loss", v, now, i) for i, v in enumerate(outcome.history)]
            + [Metric(k, float(v), now, cfg.steps) for k, v in m.items() if isinstance(v, (int, float))],
        )
        ident = adapter_id(task.name, cfg.method, [task.digest, base.checkpoint_uri, cfg.model_dump()])
        uri = save_adapter(store, ident, outcome.spec, outcome.state)
        tags = {
            "wudao.base_model": base.model_name or "",
            "wudao.base_version": base.version or "",
            "wudao.base_checkpoint_uri": base.checkpoint_uri,
            "wudao.adapter_uri": uri,
            "wudao.adapter_id": ident,
            "wudao.tokenizer_version": tokenizer_version,
            "wudao.task": task.name,
            "wudao.task_digest": task.digest,
            "wudao.method": cfg.method,
            "wudao.prompt_len": str(outcome.spec.prompt_len),
            "wudao.dev_accuracy": f"{m['dev_accuracy']:.6f}",
            "wudao.base_accuracy": f"{m['base_accuracy']:.6f}",
            "wudao.majority_accuracy": f"{m['majority_accuracy']:.6f}",
            "wudao.trainable_params": str(m["trainable_params"]),
            "wudao.code_version": wudao.__version__,
            "wudao.mlflow_run_id": run_id,
        }
        with tempfile.TemporaryDirectory(prefix="wudao-adapter-") as tmp:
            folder = download_adapter(store, uri, Path(tmp) / "adapter")
            name = settings.registry.adapter_model_name
            version = registry.log_model_version(
                settings,
                store,
                base.checkpoint_uri,
                tokenizer_version,
                run_id,
                tags,
                name=name,
                extra_artifacts={"adapter": str(folder)},
                params=ADAPTER_PARAMS,
                python_model=WudaoTunedLM(),
            )
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
    base_uri = f"models:/{base.model_name}/{base.version}" if base.version else base.checkpoint_uri
    return {
        "adapter_uri": uri,
        "adapter_model_uri": f"models:/{name}/{version}",
        "adapter_version": version,
        "adapter_id": ident,
        "base": base_uri,
        "base_version": base.version,
        "task": task.summary(),
        "method": cfg.method,
        "prompt_len": outcome.spec.prompt_len,
        **m,
        "mlflow_run_id": run_id,
        "run_url": tracking.run_url(settings, run_id),
    }
