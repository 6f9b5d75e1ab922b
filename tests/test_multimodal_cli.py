"""Images end to end through the CLI: ingest captioned images, train the VQ tokenizer, train the GLM with image
steps, and draw a caption into a PNG (with self-reranking); text blanks from the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

WUDAO = str(Path(sys.executable).parent / "wudao")


def test_train_vq_then_draw(tmp_path, demo_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WUDAO_", "AWS_", "MLFLOW_"))}
    env.update(
        {
            "WUDAO_HOME": str(tmp_path / "home"),
            "WUDAO_STORAGE_URI": str(tmp_path / "objects"),
            "WUDAO_INGEST__VOCAB_SIZE": "600",
            "WUDAO_MODEL__D_MODEL": "32",
            "WUDAO_MODEL__N_HEADS": "2",
            "WUDAO_MODEL__MAX_SEQ_LEN": "128",
            "WUDAO_TRAIN__SEQ_LEN": "96",
            "WUDAO_TRAIN__IMAGE_RATIO": "0.5",
            "WUDAO_TRAIN__STEPS": "4",
            "WUDAO_TRAIN__BATCH_SIZE": "4",
            "WUDAO_TRAIN__MICRO_BATCH_SIZE": "4",
        }
    )

    def wudao(*args):
        p = subprocess.run([WUDAO, *args, "--json"], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout)

    wudao("ingest", str(demo_dir / "corpus" / "slice-01"))
    images = wudao("ingest", str(demo_dir / "coco"))
    assert images["images_accepted"] == 8 and images["captions"] == 16
    vq = wudao("train-vq", "--steps", "5")
    assert vq["images"] == 8 and vq["code_grid"] == 8
    trained = wudao("train", "--from", "scratch")
    assert trained["slice_ids"] == ["slice-00001", "slice-00002"]
    out = tmp_path / "drawing.png"
    drawn = wudao(
        "generate",
        "--model",
        trained["checkpoint_uri"],
        "--image-prompt",
        "a red circle on a blue background",
        "--out",
        str(out),
        "--candidates",
        "2",
    )
    assert drawn["candidates"] == 2
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 64)
    filled = wudao("generate", "--model", trained["checkpoint_uri"], "--text", "The capital of France is [MASK].")
    assert filled["text"].startswith("The capital of France is") and filled["text"].endswith(".")

    # The registered pyfunc flavour draws too: the same artefacts registration logs, loaded the way MLflow does.
    import base64
    import io
    from types import SimpleNamespace

    from wudao.data.tokenizer import tokenizer_key
    from wudao.pyfunc import WudaoLM, model_artifacts
    from wudao.storage import open_store

    store = open_store(str(tmp_path / "objects"))
    served = WudaoLM()
    artifacts = model_artifacts(
        store, trained["checkpoint_uri"], tokenizer_key(trained["tokenizer_version"]), 64, tmp_path / "artifacts"
    )
    served.load_context(SimpleNamespace(artifacts=artifacts))
    png = served.predict(None, ["a red circle on a blue background"], {"mode": "image", "candidates": 2})[0]
    with Image.open(io.BytesIO(base64.b64decode(png))) as img:
        assert img.format == "PNG" and img.size == (64, 64)
    assert served.predict(None, ["The capital of France is [MASK]."])[0].startswith("The capital of France is")
