"""Task folders for `wudao tune`: what a user writes, read strictly, every problem named by file and line.

    TASK_DIR/train.jsonl   examples the prompt (or the model) is trained on
    TASK_DIR/dev.jsonl     held-out examples: dev accuracy, and the zero-shot base on the same rows

One JSON object per line (blank lines are skipped); `text` holds exactly one `[MASK]`, the blank to fill:

    {"text": "Which continent is France in? [MASK]", "label": "Europe", "lang": "en"}   cloze classification
    {"text": "The capital of France is [MASK].", "target": "Paris"}                     generation (free text)

A task is one kind: every row has `label` (a closed label set: GLM's cloze tasks with a verbalizer, each label
scored inside the blank) or every row has `target` (the loss is on the target's tokens in the blank; dev accuracy
is exact match of the greedy fill). With `lang`, a row is scored against the labels of the train rows of its
language only (a 7-way cloze in each language, not 14-way); without it, against every train label. Other fields
are kept for the reader and ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wudao.data.formats import encodable
from wudao.data.tokenizer import MASK
from wudao.errors import WudaoError

TRAIN, DEV = "train.jsonl", "dev.jsonl"


class TaskError(WudaoError):
    """A task folder or one of its lines cannot be used (the message names the file and line and the fix)."""


@dataclass(frozen=True)
class Example:
    text: str
    answer: str
    """The label (cloze tasks) or the target text (generation tasks)."""
    lang: str | None
    where: str
    """`file:line`, for messages."""


@dataclass
class Task:
    name: str
    kind: Literal["cloze", "generation"]
    train: list[Example]
    dev: list[Example]
    labels: dict[str | None, list[str]] = field(default_factory=dict)
    """Cloze tasks: the closed label set of each `lang` (None = rows without one), in order of first use."""
    digest: str = ""
    """sha256 of train.jsonl + dev.jsonl: what the adapter was trained on."""

    def candidates(self, example: Example) -> list[str]:
        return self.labels[example.lang]

    def majority(self) -> dict[str | None, str]:
        """The most common train answer of each language (ties: the first seen): the baseline a model must beat
        to have learned more than the label prior."""
        counts: dict[str | None, Counter] = {}
        for ex in self.train:
            counts.setdefault(ex.lang, Counter())[ex.answer] += 1
        return {lang: c.most_common(1)[0][0] for lang, c in counts.items()}

    def summary(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "train": len(self.train), "dev": len(self.dev)}
        if self.kind == "cloze":
            out["labels"] = {str(k) if k is not None else "*": len(v) for k, v in self.labels.items()}
        return out


def _rows(path: Path) -> tuple[list[Example], str]:
    """The examples of one file and their kind (`label` or `target`)."""
    if not path.is_file():
        raise TaskError(f"{path} does not exist: a task folder holds {TRAIN} and {DEV} (see README, `wudao tune`)")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 (byte {e.start}): save the file as UTF-8") from e
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise TaskError(
                f'{where}: not a JSON object: one object per line, e.g. {{"text": "... [MASK] ...", "label": "..."}}'
            ) from e
        if not isinstance(row, dict):
            raise TaskError(f"{where}: a JSON {type(row).__name__}, not an object with `text` and `label` or `target`")
        text = row.get("text")
        if not isinstance(text, str) or not encodable(text):
            raise TaskError(f"{where}: `text` must be a string (valid Unicode) holding one {MASK}")
        if text.count(MASK) != 1:
            raise TaskError(f"{where}: `text` must hold exactly one {MASK} (it holds {text.count(MASK)})")
        has = [k for k in ("label", "target") if k in row]
        if len(has) != 1:
            raise TaskError(f"{where}: give exactly one of `label` (cloze classification) or `target` (generation)")
        answer = row[has[0]]
        if not isinstance(answer, str) or not answer.strip() or not encodable(answer) or MASK in answer:
            raise TaskError(f"{where}: `{has[0]}` must be a non-empty string")
        lang = row.get("lang")
        if lang is not None and not (isinstance(lang, str) and encodable(lang)):
            raise TaskError(f'{where}: `lang` must be a string such as "en" or "zh"')
        out.append((Example(text, answer.strip() if has[0] == "label" else answer, lang, where), has[0]))
    if not out:
        raise TaskError(f"{path}: no examples")
    kind = out[0][1]
    if mixed := next((ex.where for ex, k in out if k != kind), None):
        raise TaskError(f"{mixed}: mixes `label` and `target` rows: a task is cloze classification or generation")
    return [ex for ex, _ in out], kind


def load_task(folder: Path) -> Task:
    """Read and check a task folder; every problem is one TaskError naming the file and line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TaskError(f"task folder {folder} does not exist (`wudao demo-data OUT` writes one under OUT/tasks/)")
    (train, train_kind), (dev, dev_kind) = _rows(folder / TRAIN), _rows(folder / DEV)
    if dev_kind != train_kind:
        raise TaskError(f"{dev[0].where}: dev rows use `{dev_kind}`, {TRAIN}'s use `{train_kind}`: one task, one kind")
    kind = "cloze" if train_kind == "label" else "generation"
    digest = hashlib.sha256((folder / TRAIN).read_bytes() + b"\0" + (folder / DEV).read_bytes()).hexdigest()
    task = Task(folder.resolve().name, kind, train, dev, digest=digest)
    if kind == "cloze":
        for ex in train:
            group = task.labels.setdefault(ex.lang, [])
            if ex.answer not in group:
                group.append(ex.answer)
        for ex in dev:
            if ex.answer not in task.labels.get(ex.lang, []):
                lang = f" with lang {ex.lang!r}" if ex.lang is not None else ""
                raise TaskError(
                    f"{ex.where}: label {ex.answer!r} never occurs in {TRAIN}{lang}: the closed label set is "
                    "what train.jsonl uses, so this row could never be right; add train rows with it"
                )
        if all(len(v) < 2 for v in task.labels.values()):
            raise TaskError(f"{folder / TRAIN}: a cloze task needs at least two labels; every row has the same one")
    return task
