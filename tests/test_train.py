"""The continual pre-training engine: schedule, start points, replay, spike guard, checkpoints, autoresume after
kill -9 (bit-identical), and 2-process DDP matching 1 process with gradient accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wudao.config import TrainSettings
from wudao.model import GLMModel
from wudao.stages import platform_store, run_ingest, run_train
from wudao.train.checkpoint import CheckpointError, complete_steps, load_checkpoint
from wudao.train.data import MixtureLoader, SliceTokens, sample_indices
from wudao.train.loop import TrainError, lr_at

WUDAO = str(Path(sys.executable).parent / "wudao")


def test_lr_rewarm_then_cosine_to_a_tenth_or_constant():
    cfg = TrainSettings(lr=1.0, steps=200, warmup_fraction=0.05, min_lr_ratio=0.1)
    lrs = [lr_at(s, 200, cfg) for s in range(200)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11), "10 warm-up steps (5% of 200)"
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[105] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 95 / 189)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "decays monotonically after the peak"
    constant = TrainSettings(lr=1.0, warmup_fraction=0.01, schedule="constant")
    assert [lr_at(s, 100, constant) for s in (0, 1, 50, 99)] == [0.5, 1.0, 1.0, 1.0]


def test_replay_share_and_slice_weights_are_observed():
    def st(name, n):
        return SliceTokens(name, "v", np.arange(n, dtype=np.int64) % 50 + 20)

    from wudao.data.glm import GLMObjective, SpecialIds

    ids = SpecialIds(pad=0, eos=1, cls=2, mask=3, smask=4, gmask=5, sop=6, eop=7, boi=8, eoi=9, roi=10, base=11)
    loader = MixtureLoader(
        st("new", 500),
        [st("a", 500), st("b", 500)],
        ids=ids,
        sentence_ends=frozenset(),
        seq_len=32,
        seed=3,
        replay_fraction=0.25,
        slice_weights={"a": 3.0},
        objective=GLMObjective(),
    )
    sources = [loader.source_of(i) for i in range(8000)]
    share = 1 - sources.count("new") / len(sources)
    assert share == pytest.approx(0.25, abs=0.02)
    assert sources.count("a") / max(1, sources.count("b")) == pytest.approx(3.0, rel=0.2)
    # The sample at a global index does not depend on how indices are split over processes.
    whole = loader.batch(5, range(40, 48))
    halves = [loader.batch(5, r) for r in (range(40, 44), range(44, 48))]
    assert np.array_equal(whole.input_ids_BT, np.concatenate([h.input_ids_BT for h in halves]))
    assert sample_indices(3, 8, 1, 2, 2) == [range(28, 30), range(30, 32)]


def test_image_steps_use_their_own_row_length():
    from wudao.data.glm import GLMObjective, SpecialIds
    from wudao.train.data import IMAGE, ImagePairs

    ids = SpecialIds(pad=0, eos=1, cls=2, mask=3, smask=4, gmask=5, sop=6, eop=7, boi=8, eoi=9, roi=10, base=11)
    images = ImagePairs(
        captions=[list(range(20, 30))] * 4, codes_NHW=np.zeros((4, 8, 8), dtype=np.int64), code_offset=100
    )
    tokens = SliceTokens("new", "v", np.arange(500, dtype=np.int64) % 50 + 20)
    loader = MixtureLoader(
        tokens,
        [],
        ids=ids,
        sentence_ends=frozenset(),
        seq_len=32,
        seed=0,
        replay_fraction=0.0,
        slice_weights={},
        objective=GLMObjective(),
        image_ratio=0.5,
        images=images,
        image_seq_len=96,
    )
    kinds = [loader.step_kind(s) for s in range(40)]
    image_step, text_step = kinds.index(IMAGE), next(i for i, k in enumerate(kinds) if k != IMAGE)
    image_batch, text_batch = loader.batch(image_step, range(4)), loader.batch(text_step, range(4))
    assert image_batch.input_ids_BT.shape == (4, 96) and text_batch.input_ids_BT.shape == (4, 32)
    assert (image_batch.input_ids_BT >= 100).sum(1).tolist() == [64] * 4, "every row holds all 64 codes"
    assert loader.row_tokens(IMAGE) == 96 and loader.row_tokens(kinds[text_step]) == 32


def test_train_from_scratch_then_continue(local_settings, demo_dir):
    run_ingest(local_settings, str(demo_dir / "corpus" / "slice-01"))
    first = run_train(local_settings, start="scratch")
    assert first["resumed_from"] is None and first["steps"] == local_settings.train.steps
    assert first["final_loss"] < first["history"][0]["loss"], "a few steps already lower the loss"
    assert any(k.startswith("expert_load/") for k in first["history"][0]), "per-expert load is reported"

    run_ingest(local_settings, str(demo_dir / "corpus" / "slice-02"))
    second = run_train(local_settings, start=first["checkpoint_uri"])
    assert second["resumed_from"] == first["checkpoint_uri"]
    assert second["slice_ids"] == ["slice-00001", "slice-00002"]
    assert second["history"][0]["lr"] < second["history"][1]["lr"], "the LR re-warms"

    store = platform_store(local_settings)
    a = load_checkpoint(store, first["checkpoint_uri"]).model
    b = load_checkpoint(store, second["checkpoint_uri"]).model
    assert a.cfg == b.cfg, "a continued model keeps its parent's shape"
    assert not torch.equal(a.tok_emb.weight, b.tok_emb.weight)
    again = run_train(local_settings, start=first["checkpoint_uri"])
    assert again["run_id"] == second["run_id"] and again["restarted_at_step"] == local_settings.train.steps, (
        "a finished run is not trained twice"
    )


def test_refuses_checkpoint_with_other_tokenizer(local_settings, demo_dir, tmp_path):
    run_ingest(local_settings, str(demo_dir / "corpus" / "slice-01"))
    first = run_train(local_settings, start="scratch")
    other = local_settings.model_copy(
        update={
            "home": tmp_path / "other",
            "catalog_url": f"sqlite:///{tmp_path / 'other.db'}",
            "ingest": local_settings.ingest.model_copy(update={"vocab_size": 700}),
        }
    )
    run_ingest(other, str(demo_dir / "corpus" / "slice-02"))
    with pytest.raises(TrainError, match="tokenizer"):
        run_train(other, start=first["checkpoint_uri"])


def test_incomplete_checkpoint_is_never_loaded_nor_resumed(local_settings, demo_dir):
    settings = local_settings.model_copy(
        update={"train": local_settings.train.model_copy(update={"checkpoint_every": 2, "keep_last": 5})}
    )
    run_ingest(settings, str(demo_dir / "corpus" / "slice-01"))
    result = run_train(settings, start="scratch")
    store = platform_store(settings)
    assert complete_steps(store, result["run_id"]) == [2, 4]
    store.delete(f"checkpoints/{result['run_id']}/step-00000004/manifest.json")  # as if it died before the commit
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(store, result["checkpoint_uri"])
    resumed = run_train(settings, start="scratch")
    assert resumed["restarted_at_step"] == 2, "resumes from the newest complete checkpoint"


def test_prune_removes_what_a_kill_mid_save_left(local_settings, demo_dir):
    """A kill during a save leaves `.optim.pt.<random>` temporaries and step folders without a manifest: list()
    never shows them, so before they were never pruned."""
    settings = local_settings.model_copy(
        update={"train": local_settings.train.model_copy(update={"steps": 6, "checkpoint_every": 2, "keep_last": 1})}
    )
    run_ingest(settings, str(demo_dir / "corpus" / "slice-01"))
    result = run_train(settings, start="scratch")
    store = platform_store(settings)
    run_dir = Path(store.uri) / "checkpoints" / result["run_id"]
    for step in (2, 4, 7):
        (run_dir / f"step-{step:08d}").mkdir(exist_ok=True)
    (run_dir / "step-00000004" / ".optim.pt.k1ll3d").write_bytes(b"half")
    (run_dir / "step-00000002" / "model.safetensors").write_bytes(b"no manifest: never complete")
    (run_dir / "step-00000006" / ".rng.pt.x9").write_bytes(b"half")
    settings2 = settings.model_copy(update={"train": settings.train.model_copy(update={"steps": 8})})
    run_train(settings2, start="scratch", run_id=result["run_id"])  # continues, saves 8 and prunes
    left = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    assert all(p.startswith("step-00000008/") for p in left), left


def test_run_id_is_validated_before_anything_runs(local_settings, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "AWS_", "MLFLOW_"))}
    env.update(WUDAO_HOME=str(tmp_path / "home"), WUDAO_STORAGE_URI=str(tmp_path / "objects"))
    for bad in ("a/b", "../../etc", ".hidden", ""):
        p = subprocess.run([WUDAO, "train", "--run-id", bad], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and f"invalid run id {bad!r}" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_nan_loss_is_skipped_and_counted(local_settings, demo_dir, monkeypatch):
    run_ingest(local_settings, str(demo_dir / "corpus" / "slice-01"))
    real_loss, calls = GLMModel.loss, {"n": 0}

    def loss_with_a_nan(self, **kw):  # a fault that real data cannot be made to produce on demand
        out = real_loss(self, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(GLMModel, "loss", loss_with_a_nan)
    result = run_train(local_settings, start="scratch")
    assert result["skipped_steps"] == 1 and result["history"][1]["skipped"] == 1
    assert np.isfinite(result["final_loss"])


def _env(home: Path, **train) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "AWS_", "MLFLOW_"))}
    env.update(
        {
            "WUDAO_HOME": str(home),
            "WUDAO_STORAGE_URI": str(home / "objects"),
            "WUDAO_TRAIN__THREADS": "1",
            "WUDAO_MODEL__D_MODEL": "32",
            "WUDAO_MODEL__N_LAYERS": "2",
            "WUDAO_MODEL__N_HEADS": "2",
            "WUDAO_TRAIN__SEQ_LEN": "48",
            "WUDAO_INGEST__VOCAB_SIZE": "600",
        }
    )
    env.update({f"WUDAO_TRAIN__{k.upper()}": str(v) for k, v in train.items()})
    return env


def _ingest(home: Path, demo_dir: Path) -> dict[str, str]:
    env = _env(home)
    subprocess.run([WUDAO, "ingest", str(demo_dir / "corpus" / "slice-01")], env=env, check=True, capture_output=True)
    return env


def _final_weights(home: Path, result: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(result["checkpoint_uri"]) / "model.safetensors")


def test_kill_9_then_autoresume_is_bit_identical(tmp_path, demo_dir):
    steps = dict(steps=40, checkpoint_every=5, batch_size=4, micro_batch_size=4)
    clean_home, crash_home = tmp_path / "clean", tmp_path / "crash"
    env = {**_ingest(clean_home, demo_dir), **_env(clean_home, **steps)}
    clean = json.loads(
        subprocess.run(
            [WUDAO, "train", "--from", "scratch", "--json"], env=env, check=True, capture_output=True, text=True
        ).stdout
    )
    env = {**_ingest(crash_home, demo_dir), **_env(crash_home, **steps)}
    proc = subprocess.Popen(
        [WUDAO, "train", "--from", "scratch", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    run_dir = crash_home / "objects" / "checkpoints" / clean["run_id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run_dir / "step-00000010" / "manifest.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "step-00000040").exists(), "killed before the end"
    resumed = json.loads(
        subprocess.run(
            [WUDAO, "train", "--from", "scratch", "--json"], env=env, check=True, capture_output=True, text=True
        ).stdout
    )
    assert resumed["run_id"] == clean["run_id"] and resumed["restarted_at_step"] >= 10
    a, b = _final_weights(clean_home, clean), _final_weights(crash_home, resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-identical to the uninterrupted run"


def test_two_gloo_processes_match_one_with_accumulation(tmp_path, demo_dir):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    one, two = tmp_path / "one", tmp_path / "two"
    env1 = {**_ingest(one, demo_dir), **_env(one, steps=4, batch_size=8, micro_batch_size=4)}
    r1 = json.loads(
        subprocess.run(
            [WUDAO, "train", "--from", "scratch", "--json"], env=env1, check=True, capture_output=True, text=True
        ).stdout
    )
    env2 = {**_ingest(two, demo_dir), **_env(two, steps=4, batch_size=8, micro_batch_size=4), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", WUDAO, "train", "--from", "scratch", "--json"],
        env=env2,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r2 = json.loads(p.stdout.strip().splitlines()[-1])
    assert r2["run_id"] == r1["run_id"]
    a, b = _final_weights(one, r1), _final_weights(two, r2)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_two_fsdp2_processes_match_one_with_accumulation(tmp_path, demo_dir):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    one, two = tmp_path / "one", tmp_path / "two"
    env1 = {**_ingest(one, demo_dir), **_env(one, steps=3, batch_size=8, micro_batch_size=4)}
    r1 = json.loads(
        subprocess.run(
            [WUDAO, "train", "--from", "scratch", "--json"], env=env1, check=True, capture_output=True, text=True
        ).stdout
    )
    env2 = {
        **_ingest(two, demo_dir),
        **_env(two, steps=3, batch_size=8, micro_batch_size=4, parallel="fsdp"),
        "OMP_NUM_THREADS": "1",
    }
    p = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", WUDAO, "train", "--from", "scratch", "--json"],
        env=env2,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r2 = json.loads(p.stdout.strip().splitlines()[-1])
    a, b = _final_weights(one, r1), _final_weights(two, r2)
    assert a.keys() == b.keys(), "an FSDP checkpoint loads like any other"
    # Reduce-scatter sums gradients in another order than one process does; Adam's normalisation turns those
    # last-bit differences into ~1e-5 on rarely routed experts after a few steps (DDP matches exactly).
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


def test_the_torchrun_launcher_trains_the_same_run_in_a_subprocess(local_settings, demo_dir, monkeypatch):
    from wudao.stages import run_train_torchrun

    run_ingest(local_settings, str(demo_dir / "corpus" / "slice-01"))
    overrides = {
        "home": str(local_settings.home),
        "storage_uri": local_settings.storage_uri,
        "catalog_url": local_settings.catalog_url,
        "model": local_settings.model.model_dump(),
        "train": {
            **local_settings.train.model_dump(),
            "steps": 2,
            "batch_size": 4,
            "micro_batch_size": 2,
            "launcher": "torchrun",
            "nproc_per_node": 2,
        },
    }
    settings = local_settings.model_copy(
        update={"train": type(local_settings.train).model_validate(overrides["train"])}
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_train_torchrun(settings, overrides, None, None)
    assert result["steps"] == 2 and len(result["history"]) == 2, "rank 0 reports the whole run, history included"
    assert (
        load_checkpoint(platform_store(local_settings), result["checkpoint_uri"]).manifest["run_id"] == result["run_id"]
    )
    # The launcher is not part of the run's identity: the same training in-process resumes (here: finds) that run.
    inprocess = run_train(
        settings.model_copy(
            update={"train": settings.train.model_copy(update={"launcher": "inprocess", "nproc_per_node": 1})}
        )
    )
    assert inprocess["run_id"] == result["run_id"]


def test_spike_guard_keeps_one_window_per_objective():
    from wudao.train.loop import _SpikeGuard

    guard = _SpikeGuard(TrainSettings(spike_window=20, spike_sigma=6.0, max_skipped_in_row=3))
    for i in range(20):  # a half-memorised slice: document steps near 0.1, token-span steps near 1.5
        assert guard.accept(0.1 + 0.001 * (i % 3), "document")
    for i in range(5):
        assert guard.accept(1.5 + 0.01 * (i % 2), "token"), "the harder objective is not a spike of the easier one"
    assert not guard.accept(9.0, "document"), "a real spike of its own kind is still skipped"
    assert not guard.accept(float("nan"), "token")
