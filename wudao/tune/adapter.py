"""Adapters: what `wudao tune` trains, how it is stored, and how a base model answers with one.

    adapters/<id>/adapter.safetensors   the trained tensors: prompt encoder (P-tuning) or every weight (finetune)
    adapters/<id>/adapter.json          `AdapterSpec`: method, prompt length, task kind and labels, base checkpoint
    adapters/<id>/manifest.json         written last: an adapter without it is incomplete and never loaded

`Tuned` is a base model with an optional adapter: cloze classification (every label of the row's language scored
inside the blank, argmax) or blank filling. The dev accuracy of `wudao tune`, the zero-shot base beside it and the
served pyfunc model all answer through it, so they cannot disagree on how a row is read.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wudao.data.glm import SpecialIds, blank_prompt
from wudao.data.tokenizer import MASK
from wudao.errors import WudaoError
from wudao.model import GLMConfig, GLMModel
from wudao.model.cloze import cloze_score_matrix
from wudao.model.generation import fill_blank
from wudao.model.prompts import InputPromptEncoder, PrefixEncoder, Prompts
from wudao.storage import ObjectStore, join_key, key_in_store

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
WEIGHTS, SPEC = "adapter.safetensors", "adapter.json"
ANY_LANG = "*"
"""JSON key of the labels of rows without `lang`."""


class AdapterError(WudaoError):
    """An adapter that cannot be loaded or does not fit the model it is applied to."""


@dataclass
class AdapterSpec:
    method: str
    """`ptuning` (v2: prefix keys/values), `ptuning-v1` (input prompts) or `finetune` (every weight)."""
    prompt_len: int
    """Prefix entries (v2) or pseudo tokens (v1); 0 for finetune."""
    reparam_hidden: int
    """Width of the prompt reparameterisation MLP (0 = none)."""
    kind: str
    """`cloze` (closed label set) or `generation` (free text)."""
    labels: dict[str, list[str]]
    """Cloze tasks: the label set of each language (`*` = rows without `lang`)."""
    task: str
    task_digest: str
    base_checkpoint_uri: str
    tokenizer_version: str
    model_config: dict
    """The base model's GLMConfig: an adapter only fits a model of this shape."""
    metrics: dict = field(default_factory=dict)
    """What tuning measured (dev accuracy, zero-shot base, majority, trainable parameters, ...)."""

    def encoder(self, init: tuple[torch.Tensor, ...] | torch.Tensor | None = None) -> nn.Module | None:
        """A fresh prompt encoder of this spec (None for finetune); `init` as the encoder's constructor takes it."""
        cfg = GLMConfig(**self.model_config)
        hidden = self.reparam_hidden or None
        if self.method == "ptuning":
            return PrefixEncoder(cfg.n_layers, cfg.n_heads, cfg.d_model // cfg.n_heads, self.prompt_len, hidden, init)
        if self.method == "ptuning-v1":
            return InputPromptEncoder(cfg.d_model, self.prompt_len, hidden, init)
        return None


def adapter_prefix(adapter_id: str) -> str:
    if not ADAPTER_ID.match(adapter_id):
        raise AdapterError(f"invalid adapter id {adapter_id!r}: use 1-96 of A-Z a-z 0-9 . _ -")
    return f"adapters/{adapter_id}"


def save_adapter(store: ObjectStore, adapter_id: str, spec: AdapterSpec, state: dict[str, torch.Tensor]) -> str:
    """Write the adapter's tensors and spec, then its manifest (the commit); returns its URI."""
    prefix = adapter_prefix(adapter_id)
    with tempfile.TemporaryDirectory(prefix="wudao-adapter-") as tmp:
        path = Path(tmp) / WEIGHTS
        # Tied weights share storage and safetensors refuses shared tensors: save contiguous copies.
        save_file({k: v.detach().contiguous().clone().cpu() for k, v in state.items()}, path)
        store.put_file(join_key(prefix, WEIGHTS), path)
    store.put_json(join_key(prefix, SPEC), asdict(spec))
    return store.commit(
        prefix,
        {
            "adapter_id": adapter_id,
            "method": spec.method,
            "files": [WEIGHTS, SPEC],
            "base_checkpoint_uri": spec.base_checkpoint_uri,
        },
    )


def download_adapter(store: ObjectStore, uri: str, into: Path) -> Path:
    """Copy a committed adapter's files into the folder `into` (what the pyfunc model carries)."""
    prefix = key_in_store(store, uri)
    if prefix is None or store.read_manifest(prefix) is None:
        raise AdapterError(f"adapter {uri} is incomplete or not in the platform's store {store.uri}")
    for name in (WEIGHTS, SPEC):
        store.get_file(join_key(prefix, name), into / name)
    return into


def read_adapter(folder: Path) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """An adapter folder's spec and tensors (safetensors: loading never unpickles)."""
    try:
        spec = AdapterSpec(**json.loads((folder / SPEC).read_text(encoding="utf-8")))
        return spec, load_file(folder / WEIGHTS)
    except (OSError, ValueError, TypeError) as e:
        raise AdapterError(f"adapter folder {folder} cannot be read ({type(e).__name__}: {e}): tune it again") from e


@dataclass
class Tuned:
    """A base model (frozen) with an optional adapter's prompts; what answers a task's rows."""

    model: GLMModel
    tokenizer: object
    ids: SpecialIds
    kind: str
    labels: dict[str | None, list[str]]
    prompts: Prompts | None = None

    @classmethod
    def apply(cls, model: GLMModel, tokenizer, spec: AdapterSpec, state: dict[str, torch.Tensor]) -> Tuned:
        """The base `model` answering with the adapter (`spec`, `state`); a finetune adapter replaces its weights."""
        if spec.model_config != model.cfg.to_dict():
            raise AdapterError(
                f"adapter for task {spec.task!r} was tuned on a model of another shape "
                f"({spec.base_checkpoint_uri}): tune it again on this base"
            )
        encoder, prompts = spec.encoder(), None
        try:
            (model if encoder is None else encoder).load_state_dict(state)
        except RuntimeError as e:
            raise AdapterError(f"adapter tensors do not fit its spec ({str(e).splitlines()[0]})") from e
        if encoder is not None:
            with torch.no_grad():
                prompts = encoder.to(model.tok_emb.weight.device)().detach()  # the reparameterisation, folded once
        labels = {None if k == ANY_LANG else k: v for k, v in spec.labels.items()}
        return cls(model.eval(), tokenizer, SpecialIds.from_tokenizer(tokenizer), spec.kind, labels, prompts)

    @property
    def n_input(self) -> int:
        return self.prompts.n_input if self.prompts is not None else 0

    def part_a(self, text: str) -> tuple[list[int], str]:
        """Part A of a row (v1 placeholders first: their embeddings are the prompt's) and the answer's lead."""
        if text.count(MASK) != 1:
            raise AdapterError(
                f"a text for a tuned adapter holds exactly one {MASK} (this one {text.count(MASK)}): {text[:80]!r}"
            )
        blank = blank_prompt(self.tokenizer, text, self.ids)
        return [self.ids.cls] * self.n_input + blank.part_a, blank.lead

    def label_set(self, text: str, lang: str | None) -> list[str]:
        """The labels a row is scored against: its language's. Without `lang`, text with Chinese characters is
        `zh` and other text `en` when the task has those groups; else every label."""
        if lang is not None and lang in self.labels:
            return self.labels[lang]
        if lang is not None:
            raise AdapterError(f"no labels for lang {lang!r}: this adapter knows {sorted(map(str, self.labels))}")
        guess = "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"
        if guess in self.labels:
            return self.labels[guess]
        if None in self.labels:
            return self.labels[None]
        return list(dict.fromkeys(label for group in self.labels.values() for label in group))

    def label_scores(
        self, texts: list[str], langs: list[str | None], grad: bool = False
    ) -> tuple[torch.Tensor, list[list[str]]]:
        """(N, C) cloze scores of each row's labels (Σ log p of label + [eop] in the blank; -inf pads rows with
        fewer labels), and the label lists. `grad` keeps the graph (training)."""
        part_as, cands, spaces = [], [], []
        encoded: dict[tuple[str, ...], list[list[int]]] = {}
        for text, lang in zip(texts, langs):
            part_a, lead = self.part_a(text)
            labels = self.label_set(text, lang)
            key = (lead, *labels)
            if key not in encoded:  # one list object per (labels, lead): its answer tries are built once
                encoded[key] = [self.tokenizer.encode(lead + label).ids for label in labels]
            part_as.append(part_a)
            cands.append(encoded[key])
            spaces.append(labels)
        with torch.enable_grad() if grad else torch.no_grad():
            return cloze_score_matrix(self.model, part_as, self.ids, cands, prompts=self.prompts), spaces

    def classify(self, texts: list[str], langs: list[str | None] | None = None, batch: int = 64) -> list[str]:
        langs = langs or [None] * len(texts)
        out = []
        for i in range(0, len(texts), batch):
            scores_NC, spaces = self.label_scores(texts[i : i + batch], langs[i : i + batch])
            out += [space[int(j)] for space, j in zip(spaces, scores_NC.argmax(-1))]
        return out

    def fill(self, text: str, max_new_tokens: int) -> str:
        """The greedy content of the blank (the answer's lead stripped: a target is compared as written)."""
        part_a, _ = self.part_a(text)
        out = fill_blank(self.model, part_a, self.ids, max_new_tokens=max_new_tokens, prompts=self.prompts)[0]
        return self.tokenizer.decode(out).strip()

    def predict(self, texts: list[str], lang: str | None = None, max_new_tokens: int = 16) -> list[str]:
        """Cloze adapters: each text's label. Generation adapters: each text with its blank filled."""
        if self.kind == "cloze":
            return self.classify(texts, [lang] * len(texts))
        return [t.replace(MASK, self.fill(t, max_new_tokens), 1) for t in texts]
