"""Training: LR schedule, continuing from a checkpoint, and refusing a checkpoint of another tokenizer."""

from __future__ import annotations

import pytest
import torch

from wudao.stages import platform_store, run_ingest, run_train
from wudao.train.checkpoint import CheckpointError, load_checkpoint
from wudao.train.loop import TrainError, lr_at


def test_lr_rewarm_then_cosine_to_a_tenth():
    lrs = [lr_at(s, 100, 1.0, 5) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])), "decays monotonically after warm-up"
    assert lrs[-1] == pytest.approx(0.1)


def test_train_from_scratch_then_continue(local_settings, demo_dir):
    run_ingest(local_settings, str(demo_dir / "corpus" / "slice-01"))
    first = run_train(local_settings, start="scratch")
    assert first["resumed_from"] is None and first["steps"] == local_settings.train.steps
    assert first["final_loss"] < first["history"][0]["loss"], "a few steps already lower the loss"

    run_ingest(local_settings, str(demo_dir / "corpus" / "slice-02"))
    second = run_train(local_settings, start=first["checkpoint_uri"])
    assert second["resumed_from"] == first["checkpoint_uri"]
    assert second["slice_ids"] == ["slice-00001", "slice-00002"]

    store = platform_store(local_settings)
    a = load_checkpoint(store, first["checkpoint_uri"]).model
    b = load_checkpoint(store, second["checkpoint_uri"]).model
    assert a.cfg == b.cfg, "a continued model keeps its parent's shape"
    assert not torch.equal(a.tok_emb.weight, b.tok_emb.weight)


def test_refuses_checkpoint_with_other_tokenizer(local_settings, demo_dir, tmp_path):
    run_ingest(local_settings, str(demo_dir / "corpus" / "slice-01"))
    first = run_train(local_settings, start="scratch")
    other = local_settings.model_copy(update={"home": tmp_path / "other", "catalog_url": f"sqlite:///{tmp_path / 'other.db'}",
                                              "ingest": local_settings.ingest.model_copy(update={"vocab_size": 700})})  # fmt: skip
    run_ingest(other, str(demo_dir / "corpus" / "slice-02"))
    with pytest.raises(TrainError, match="tokenizer"):
        run_train(other, start=first["checkpoint_uri"])


def test_incomplete_checkpoint_is_never_loaded(local_settings, demo_dir):
    run_ingest(local_settings, str(demo_dir / "corpus" / "slice-01"))
    result = run_train(local_settings, start="scratch")
    store = platform_store(local_settings)
    prefix = result["checkpoint_uri"].removeprefix(store.uri + "/")
    store.delete(f"{prefix}/manifest.json")  # as if the process died before the commit
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(store, result["checkpoint_uri"])
