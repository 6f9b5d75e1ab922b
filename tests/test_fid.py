"""MS-COCO FID / KID: the metric against torch-fidelity's own Fréchet computation, the reference cache, skipped
images, PNG output, the documented missing-weights error, and nothing fetched from the network.

No downloads: every test uses a randomly initialised Inception state dict written by the module itself. Inception
on 2 CPU cores is slow (and each FID is a 2048x2048 eigenvalue problem), so image sets are tiny.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wudao.data.demo import write_scenes
from wudao.eval import fid
from wudao.eval.coco import caption_order, load_coco
from wudao.storage import LocalStore

WUDAO = str(Path(sys.executable).parent / "wudao")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return fid.write_random_inception_weights(
        tmp_path_factory.mktemp("fid-weights") / "inception-random-TEST-ONLY.pth", seed=0
    )


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt (torch.hub, urllib, boto) fails the test instead of reaching out."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_random_weights_are_marked_and_shaped_like_the_standard_file(weights, tmp_path):
    import torchvision

    assert weights.stat().st_size < 60e6  # fp16: about 48 MB
    sha, note = fid.weights_info(weights)
    assert len(sha) == 64 and "TEST-ONLY" in note
    # pytorch-fid's FIDInceptionV3 is torchvision's Inception-v3 with 1008 classes and no aux head: same keys.
    state = torch.load(weights, weights_only=True)
    reference = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    assert fid.weights_info(plain)[1] is None


def test_missing_weights_is_the_documented_error(tmp_path):
    for uri in (None, str(tmp_path / "nowhere.pth")):
        with pytest.raises(fid.FIDError) as err:
            fid.resolve_weights(uri, tmp_path, LocalStore)
        assert fid.STANDARD_WEIGHTS in str(err.value) and "WUDAO_EVAL__FID_WEIGHTS_URI" in str(err.value)
    write_scenes(tmp_path / "coco", n=2, seed=0, size=32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "MLFLOW_", "AWS_"))}
    env.update({"WUDAO_HOME": str(tmp_path / "home"), "WUDAO_STORAGE_URI": str(tmp_path / "objects")})
    p = subprocess.run(
        [WUDAO, "eval", "fid", "--coco", str(tmp_path / "coco"), "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and p.stdout == ""
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no Inception weights configured") and "pt_inception-2015-12-05-6726825d.pth" in last


class _Payload:
    """A pickle that runs code when loaded without weights_only: it creates the file it names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_weights_file_is_refused_and_runs_no_code(weights, tmp_path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(marker)}, crafted)
    with pytest.raises(fid.FIDError, match="weights_only"):
        fid.InceptionFeatures(crafted)
    assert not marker.exists(), "loading FID weights ran code from the file"
    # A plain file of tensors that is not Inception is refused by name, and the real thing still loads.
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, other)
    with pytest.raises(fid.FIDError, match="not an Inception-v3 state dict"):
        fid.InceptionFeatures(other)
    net = fid.InceptionFeatures(weights).net
    state = torch.load(weights, weights_only=True)
    key = "Conv2d_1a_3x3.conv.weight"
    assert torch.equal(net.state_dict()[key], state[key].float()) and net.state_dict()[key].dtype == torch.float32


def test_s3_weights_are_copied_once_into_the_cache(tmp_path):
    bucket = LocalStore(tmp_path / "bucket")
    bucket.put_bytes("models/w.pth", b"weights")
    opened: list[str] = []

    def open_uri(uri: str) -> LocalStore:
        opened.append(uri)
        return LocalStore(tmp_path / "bucket" / uri.removeprefix("s3://bucket/"))

    first = fid.resolve_weights("s3://bucket/models/w.pth", tmp_path / "cache", open_uri)
    again = fid.resolve_weights("s3://bucket/models/w.pth", tmp_path / "cache", open_uri)
    assert first == again and first.read_bytes() == b"weights" and opened == ["s3://bucket/models"]


def test_caption_sample_is_seeded_one_caption_per_image(tmp_path):
    write_scenes(tmp_path, n=12, seed=0, size=16)
    index = load_coco(LocalStore(tmp_path))
    a, b, other = caption_order(index, 0), caption_order(index, 0), caption_order(index, 1)
    assert a == b and a != other
    assert sorted(i for i, _ in a) == sorted(index.files)
    assert all(caption in index.captions[i] for i, caption in a)


def _scene_reader(root: Path):
    index = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    files = {img["id"]: img["file_name"] for img in index["images"]}

    def real(captions: list[str], image_ids: list[int]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(root / "val2017" / files[i]).convert("RGB")) for i in image_ids])

    return real


def test_fid_end_to_end_cache_skips_png_and_torch_fidelity(weights, tmp_path, no_network):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    coco_dir = tmp_path / "coco"
    write_scenes(coco_dir, n=7, seed=0, size=32)
    (coco_dir / "val2017" / "000000000003.png").write_bytes(b"\x89PNG truncated")  # corrupt
    (coco_dir / "val2017" / "000000000005.png").unlink()  # missing
    coco, out = LocalStore(coco_dir), LocalStore(tmp_path / "objects")
    cfg = fid.FIDConfig(n=4, resolution=32, batch_size=8)
    real = _scene_reader(coco_dir)

    # A "model" that draws the real images exactly: FID against itself is about 0.
    first, grid = fid.evaluate_fid(coco, out, "eval/a/fid", weights, real, cfg)
    assert first["reference_cached"] is False and abs(first["fid"]) < 1e-3
    assert first["n_images"] == 4 and first["n_skipped"] == 2
    assert first["skipped"] == {"corrupt_image": 1, "missing_image": 1}
    assert "N=4 < 2048" in first["warning"] and "TEST-ONLY" in first["weights_note"]
    assert grid.size == (4 * 128, 2 * 128 + 52)

    # Colour-inverted drawings: clearly > 0, and the real side comes from the cache this time.
    second, _ = fid.evaluate_fid(coco, out, "eval/b/fid", weights, lambda c, ids: 255 - real(c, ids), cfg)
    assert second["reference_cached"] is True and second["reference_key"] == first["reference_key"]
    assert second["fid"] > 0.1 and second["skipped"] == first["skipped"]

    generated = sorted(out.list("eval/b/fid/generated/"), key=lambda o: o.key)
    assert len(generated) == 4
    pngs = [out.get_bytes(o.key) for o in generated]
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    assert out.get_bytes("eval/b/fid/samples.png").startswith(b"\x89PNG")

    # torch-fidelity's own Fréchet distance on the cached real statistics and the stored PNGs' features.
    with np.load(io.BytesIO(out.get_bytes(f"{fid.REFERENCE_PREFIX}/{second['reference_key']}/stats.npz"))) as z:
        real_stats = {"mu": z["mu"], "sigma": z["sigma"]}
    feats = fid.InceptionFeatures(weights)(
        np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs])
    )
    fake_stats = fid_features_to_statistics(torch.from_numpy(feats.astype(np.float64)))
    expected = fid_statistics_to_metric(real_stats, fake_stats, verbose=False)["frechet_inception_distance"]
    assert abs(second["fid"] - expected) < 1e-3


@pytest.mark.slow
def test_stage_and_cli_with_a_trained_model(weights, demo_dir, tmp_path):
    """A minimal model draws the demo captions: the stage logs metrics and the grid to MLflow; the CLI prints one
    JSON object with the documented keys and reuses the stage's reference statistics."""
    from wudao import registry, stages
    from wudao.config import Settings
    from wudao.train.vq import train_vq

    settings = Settings(
        home=tmp_path / "home",
        storage_uri=str(tmp_path / "objects"),
        ingest={"vocab_size": 600},
        train={"steps": 2, "batch_size": 4, "seq_len": 32},
        eval={"fid_weights_uri": str(weights)},
        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128},
    ).resolved()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    try:
        stages.run_ingest(settings, str(demo_dir / "corpus" / "slice-01"))
        stages.run_ingest(settings, str(demo_dir / "coco"))
        store = stages.platform_store(settings)
        train_vq(
            store,
            stages.committed_slices(settings),
            settings.home / "cache",
            image_size=64,
            codebook_size=settings.model.image_codebook_size,
            steps=3,
        )
        ckpt = stages.run_train(settings, start="scratch")["checkpoint_uri"]
        client = registry.client(settings)
        experiment = client.create_experiment("fid-test", artifact_location=(tmp_path / "mlartifacts").as_uri())
        run_id = client.create_run(experiment).info.run_id
        result = stages.run_eval_fid(settings, ckpt, str(demo_dir / "coco"), n=3, mlflow_run_id=run_id, step=2)
    finally:
        torch.set_num_threads(threads)
    assert result["n_images"] == 3 and result["model"] == ckpt and result["eval_id"] == run_id
    assert (
        store.exists(f"eval/{run_id}/fid/samples.png") and len(list(store.list(f"eval/{run_id}/fid/generated/"))) == 3
    )
    assert [m.step for m in client.get_metric_history(run_id, "fid")] == [2]
    # The demo captions name their colours, so the colour probe reads every generated image.
    assert result["follows"]["n_probed"] == 3 and 0 <= result["follows"]["both_accuracy"] <= 1
    assert json.loads(store.get_bytes(f"eval/{run_id}/fid/report.json"))["follows"] == result["follows"]
    assert [m.step for m in client.get_metric_history(run_id, "follows/both_accuracy")] == [2]
    assert any("fid_samples" in a.path for a in client.list_artifacts(run_id, "images"))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "MLFLOW_", "AWS_"))}
    env.update({"WUDAO_HOME": str(settings.home), "WUDAO_STORAGE_URI": settings.storage_uri})
    p = subprocess.run(
        [
            WUDAO,
            "eval",
            "fid",
            "--model",
            ckpt,
            "--coco",
            str(demo_dir / "coco"),
            "--n",
            "3",
            "--weights",
            str(weights),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout)
    assert {
        "fid",
        "kid_mean",
        "kid_std",
        "n_images",
        "n_skipped",
        "reference_cached",
        "warning",
        "weights_note",
    } <= set(report)
    assert report["reference_cached"] is True and report["n_skipped"] == 0
    assert report["follows"]["chance_both"] == 1 / 30

    # In a cycle's evaluate stage: the grid goes to the stage's run, the metrics are left to the evaluation's
    # logging (no duplicates), and the result carries the key the FID gate compares under.
    cycle_settings = settings.model_copy(
        update={"eval": settings.eval.model_copy(update={"fid_coco_uri": str(demo_dir / "coco"), "fid_n": 3})}
    )
    evaluate_run = client.create_run(experiment).info.run_id
    evaluation = stages.run_evaluate(cycle_settings, ckpt, None, mlflow_run_id=evaluate_run)
    assert evaluation["fid"]["key"] == f"{report['reference_key']}/k1" and evaluation["fid"]["reference_cached"]
    assert any("fid_samples" in a.path for a in client.list_artifacts(evaluate_run, "images"))
    assert "fid" not in client.get_run(evaluate_run).data.metrics


def test_human_output_says_biased_next_to_the_number(capsys):
    from wudao.cli import _render_fid

    report = {
        "fid": 12.5,
        "kid_mean": 0.01,
        "kid_std": 0.001,
        "kid_subsets": 100,
        "kid_subset_size": 48,
        "n_images": 48,
        "n_real": 48,
        "n_skipped": 0,
        "skipped": {},
        "model": "m",
        "reference_cached": True,
        "reference_key": "k",
        "samples_uri": "s",
    }
    _render_fid({**report, "warning": "N=48 < 2048: …", "weights_note": "TEST-ONLY …"})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FID 12.500") and "biased" in out[0]
    assert not any("follow" in line for line in out), "no colour probe line for captions it cannot read"
    follows = {
        "n_probed": 48,
        "unparsed": 0,
        "background_accuracy": 0.9,
        "shape_accuracy": 0.7,
        "both_accuracy": 0.65,
        "chance_background": 1 / 6,
        "chance_shape": 0.2,
        "chance_both": 1 / 30,
    }
    _render_fid({**report, "follows": follows})
    assert "images follow their captions: 0.65 (chance 0.03)" in capsys.readouterr().out
    assert any(line.startswith("weights: TEST-ONLY") for line in out)
