"""The MLflow pyfunc flavour of a registered version: `mlflow models serve -m models:/wudao@champion` answers

- text (default): `{"inputs": ["The capital of France is [MASK]."], "params": {"max_new_tokens": 8}}` fills each
  blank, or continues a prompt without one (greedy);
- image: `{"inputs": ["a red circle on a blue background"], "params": {"mode": "image", "candidates": 4}}` draws
  each caption (CogView self-reranking over `candidates`) and returns base64-encoded PNGs;
- knowledge-checked text: `{"inputs": [...], "params": {"check_facts": true, "candidates": 4, "temperature": 1.0}}`
  returns one object per input, as `wudao generate --check-facts --json` prints it (`wudao.checked`).

A tuned adapter's version (`wudao tune`, registered model `wudao-adapters`) serves `WudaoTunedLM`: the same base
plus the adapter, which answers text with a `[MASK]` (its label, or the blank filled with the trained prompts).

The version's artefacts are the checkpoint, its tokenizer and, when one exists, the image tokenizer (VQ-VAE) the
platform used when the version was registered, and the KG it was evaluated with (`eval.kg_uri`). The KG travels
inside the version, not as a URI or a request parameter: a served model may run where the platform's store and
credentials are not, the checks stay those the version was evaluated with even after the KG folder changes, and
no request can make the server read a path of its choosing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from wudao.storage import ObjectStore, join_key, key_in_store

PARAMS = {"max_new_tokens": 32, "mode": "text", "candidates": 1, "seed": 0}
"""The request parameters the signature declares (serving drops any it does not declare)."""

CHECK_PARAMS = {"check_facts": False, "constrain": True, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
"""Knowledge-checked generation (`wudao.checked`): `candidates` texts are sampled with these settings (0 = greedy)."""
PARAMS.update(CHECK_PARAMS)


def model_artifacts(
    store: ObjectStore,
    checkpoint_uri: str,
    tokenizer_key: str,
    image_size: int,
    into: Path,
    kg: dict[str, bytes] | None = None,
) -> dict[str, str]:
    """Download what a version needs into `into` and name it for `mlflow.pyfunc.log_model(artifacts=…)`; `kg`:
    the KG's files by name (facts.jsonl, templates.jsonl), for checked generation."""
    from wudao.train import vq

    prefix = key_in_store(store, checkpoint_uri)
    ckpt_dir = into / "checkpoint"
    for file in ("model.safetensors", "manifest.json"):
        store.get_file(join_key(prefix, file), ckpt_dir / file)
    artifacts = {"checkpoint": str(ckpt_dir), "tokenizer": str(store.get_file(tokenizer_key, into / "tokenizer.json"))}
    if store.exists(vq.CURRENT):
        version = store.get_json(vq.CURRENT)["version"]
        vq_dir = into / "vq"
        store.get_file(join_key("vq", version, "model.safetensors"), vq_dir / "model.safetensors")
        (vq_dir / "config.json").write_text(
            json.dumps(
                {**store.get_json(join_key("vq", version, "config.json")), "image_size": image_size, "version": version}
            )
        )
        artifacts["vq"] = str(vq_dir)
    if kg:
        for name, data in kg.items():
            (into / "kg").mkdir(parents=True, exist_ok=True)
            (into / "kg" / name).write_bytes(data)
        artifacts["kg"] = str(into / "kg")
    return artifacts


class WudaoLM(mlflow.pyfunc.PythonModel):
    """Blank filling and text continuation; text -> image when the version carries an image tokenizer."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from wudao.data.tokenizer import load_tokenizer
        from wudao.model import VQVAE, GLMConfig, GLMModel, VQConfig
        from wudao.serving import Generator

        ckpt = Path(context.artifacts["checkpoint"])
        manifest = json.loads((ckpt / "manifest.json").read_text())
        model = GLMModel(GLMConfig(**manifest["model_config"]))
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        self.generator = Generator.create(model, load_tokenizer(Path(context.artifacts["tokenizer"]).read_bytes()))
        self.vq, self.image_size = None, 0
        if "vq" in context.artifacts:
            vq_dir = Path(context.artifacts["vq"])
            cfg = json.loads((vq_dir / "config.json").read_text())
            self.image_size = cfg.pop("image_size")
            cfg.pop("version", None)
            self.vq = VQVAE(VQConfig(**cfg))
            self.vq.load_state_dict(load_file(vq_dir / "model.safetensors"))
            self.vq.eval()
        self.checker = None
        if "kg" in context.artifacts:
            from wudao.eval.kg import KG_FACTS, KG_TEMPLATES, ClaimChecker, parse_kg

            kg_dir = Path(context.artifacts["kg"])
            self.checker = ClaimChecker(
                parse_kg((kg_dir / KG_FACTS).read_text("utf-8"), (kg_dir / KG_TEMPLATES).read_text("utf-8"))
            )

    # `model_input` is hinted as a DataFrame on purpose: MLflow 3 infers a signature from any other hint (`list[str]`)
    # and it replaces the declared one, dropping every declared param from requests (mlflow#14908); without a hint it
    # warns at import. A DataFrame is what serving passes (the signature's string column); a list works when called
    # directly.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        p = {**PARAMS, **(params or {})}
        texts = _texts(model_input)
        if p["check_facts"] and p["mode"] == "text":
            return [self._checked(prompt, p) for prompt in texts]
        if p["mode"] == "image":
            return [self._draw(caption, int(p["candidates"]), int(p["seed"])) for caption in texts]
        return [self.generator.text(prompt, int(p["max_new_tokens"]), _sampling(p), int(p["seed"])) for prompt in texts]

    def _checked(self, prompt: str, p: dict[str, Any]) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from wudao.checked import CheckError, generate_checked

        if self.checker is None:
            raise MlflowException(
                "check_facts: this version carries no KG (it was registered without eval.kg_uri); "
                "register one evaluated with a KG",
                INVALID_PARAMETER_VALUE,
            )
        try:
            return generate_checked(
                self.generator,
                self.checker,
                prompt,
                candidates=int(p["candidates"]),
                max_new_tokens=int(p["max_new_tokens"]),
                sampling=_sampling(p),
                seed=int(p["seed"]),
                constrain=bool(p["constrain"]),
            ).to_dict()
        except CheckError as e:  # the client's parameters: HTTP 400, not 500
            raise MlflowException(str(e), INVALID_PARAMETER_VALUE) from None

    def _draw(self, caption: str, candidates: int, seed: int) -> str:
        from wudao.serving import Painter

        if self.vq is None:
            raise ValueError("this version has no image tokenizer: it was registered before any images were learned")
        return base64.b64encode(
            Painter(self.generator, self.vq, self.image_size).png(caption, candidates, seed)
        ).decode()


def _texts(model_input) -> list[str]:
    """The request's strings: serving passes the signature's one-column DataFrame, direct calls a list."""
    if isinstance(model_input, (pd.DataFrame, pd.Series)):
        model_input = (model_input.iloc[:, 0] if model_input.ndim == 2 else model_input).tolist()
    return [str(t) for t in model_input]


def _sampling(p: dict[str, Any]):
    from wudao.model import Sampling

    return Sampling(temperature=float(p["temperature"]), top_k=int(p["top_k"]), top_p=float(p["top_p"]))


ADAPTER_PARAMS = {**PARAMS, "lang": ""}
"""An adapter's request params: PARAMS, plus `lang` (which label set a cloze adapter scores; "" = guessed from the
text: Chinese characters -> zh, else en)."""


class WudaoTunedLM(WudaoLM):
    """A base version plus a tuned adapter (artefact `adapter`): text with one `[MASK]` is answered by the adapter
    (cloze adapters return the label, generation adapters the text with its blank filled); text without a blank
    and images are answered by the base (a finetune adapter's weights, when the adapter is a whole model)."""

    def load_context(self, context) -> None:
        from wudao.data.tokenizer import MASK
        from wudao.tune.adapter import Tuned, read_adapter

        super().load_context(context)
        spec, state = read_adapter(Path(context.artifacts["adapter"]))
        self.tuned = Tuned.apply(self.generator.model, self.generator.tokenizer, spec, state)
        self.blank = MASK

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):  # hint: see WudaoLM
        """Texts with a blank through the adapter, the rest (and checked generation) through the base."""
        p = {**ADAPTER_PARAMS, **(params or {})}
        texts = _texts(model_input)
        if p["mode"] != "text" or p["check_facts"]:
            return super().predict(context, texts, params)
        tuned = [i for i, t in enumerate(texts) if self.blank in t]
        out = dict(
            zip(
                tuned,
                self.tuned.predict(
                    [texts[i] for i in tuned], lang=p["lang"] or None, max_new_tokens=int(p["max_new_tokens"])
                ),
            )
        )
        rest = [i for i in range(len(texts)) if i not in out]
        out.update(zip(rest, super().predict(context, [texts[i] for i in rest], params) if rest else []))
        return [out[i] for i in range(len(texts))]
