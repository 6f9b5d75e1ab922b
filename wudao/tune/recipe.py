"""The tuning recipe: P-tuning (v2 or v1) of a frozen GLM, or full fine-tuning, on a task folder.

Cloze tasks (GLM's ClozeModel): every label of the row's language is scored inside the blank as the sum of its
tokens' and `[eop]`'s log-probabilities, and the loss is the cross-entropy of the gold label over those scores.
Generation tasks: the GLM loss on the target's tokens (and `[eop]`) in the blank. AdamW, linear warm-up then cosine
to 0.1x, gradients clipped at 1; each step's batch is drawn (with replacement) from the seed and the step alone.

Reported beside the dev accuracy: the same base model zero-shot on the same dev rows, the majority baseline
(always the most common train label of the row's language) and uniform chance, so that a prompt that learned
only the label prior is not mistaken for one that learned the task.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from wudao.config import TrainSettings, TuneSettings
from wudao.data.glm import SpecialIds, glm_sample, stack_rows
from wudao.data.tokenizer import MASK
from wudao.model import GLMModel
from wudao.train.loop import lr_at
from wudao.tune.adapter import ANY_LANG, AdapterSpec, Tuned
from wudao.tune.task import Example, Task, TaskError


@dataclass
class TuneOutcome:
    spec: AdapterSpec
    state: dict[str, torch.Tensor]
    """The adapter's tensors: the prompt encoder's (P-tuning) or the whole model's (finetune)."""
    metrics: dict
    history: list[float] = field(default_factory=list)
    """Training loss per step."""


def _seed_tokens(model: GLMModel, tokenizer, task: Task, n: int) -> list[int]:
    """The first n tokens of the train texts (blanks removed): real words the prompts start from."""
    text = " ".join(ex.text.replace(MASK, " ") for ex in task.train[:32])
    toks = [t for t in tokenizer.encode(text).ids if t < model.cfg.vocab_size] or [0]
    return (toks * math.ceil(n / len(toks)))[:n]


@torch.no_grad()
def _prompt_init(model: GLMModel, method: str, tokens: list[int]) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """v2: the keys/values every layer computes for real tokens (prefix tuning trains better from real activations
    than from noise); v1: those tokens' input embeddings."""
    device = model.tok_emb.weight.device
    if method == "ptuning-v1":
        return model.tok_emb.weight[torch.tensor(tokens, device=device)].float().cpu()
    cache = model.new_kv_cache(1, len(tokens))
    model.hidden(
        torch.tensor([tokens], device=device), sep_B=torch.tensor([len(tokens)], device=device), kv_cache=cache
    )
    return cache.k_LBHSK[:, 0].float().cpu(), cache.v_LBHSK[:, 0].float().cpu()


def check_fits(tuned: Tuned, task: Task, max_new_tokens: int) -> None:
    """Every row must fit the model's context with its longest answer: else a TaskError naming the row."""
    limit = tuned.model.cfg.max_seq_len
    for ex in task.train + task.dev:
        part_a, lead = tuned.part_a(ex.text)
        answers = tuned.label_set(ex.text, ex.lang) if task.kind == "cloze" else [ex.answer]
        longest = max(len(tuned.tokenizer.encode(lead + a).ids) for a in answers)
        if task.kind == "generation":  # the greedy fill of accuracy() needs room for max_new_tokens
            longest = max(longest, max_new_tokens)
        if len(part_a) + 1 + longest > limit:
            raise TaskError(
                f"{ex.where}: {len(part_a) + 1 + longest} tokens with its answer, the model holds {limit}: "
                "shorten the text (or the prompt: --prompt-len)"
            )


def accuracy(tuned: Tuned, task: Task, rows: list[Example], max_new_tokens: int) -> float:
    """Share of rows answered exactly: the argmax label (cloze), or the greedy fill equal to the target."""
    if not rows:
        return 0.0
    if task.kind == "cloze":
        got = tuned.classify([ex.text for ex in rows], [ex.lang for ex in rows])
        return float(np.mean([g == ex.answer for g, ex in zip(got, rows)]))
    return float(np.mean([tuned.fill(ex.text, max_new_tokens) == ex.answer.strip() for ex in rows]))


def baselines(task: Task) -> dict[str, float]:
    """Dev accuracy of always answering the most common train label (target) of the row's language, and of
    guessing uniformly among its labels (cloze only)."""
    top = task.majority()
    out = {"majority_accuracy": float(np.mean([top.get(ex.lang) == ex.answer for ex in task.dev]))}
    if task.kind == "cloze":
        out["chance_accuracy"] = float(np.mean([1 / len(task.candidates(ex)) for ex in task.dev]))
    return out


def _generation_batch(tuned: Tuned, rows: list[Example], rng: np.random.Generator, device) -> dict[str, torch.Tensor]:
    """GLM rows: Part A with the blank, Part B = [sop] + target, trained against target + [eop]."""
    samples = []
    for ex in rows:
        part_a, lead = tuned.part_a(ex.text)
        m = part_a.index(tuned.ids.mask)
        target = tuned.tokenizer.encode(lead + ex.answer).ids
        samples.append((np.array(part_a[:m] + target + part_a[m + 1 :]), (m, m + len(target))))
    seq_len = max(len(t) for t, _ in samples) + 2  # a [MASK] in Part A and a [sop] in Part B
    return stack_rows(
        [glm_sample(t, [span], tuned.ids.mask, tuned.ids, seq_len, rng) for t, span in samples], "token"
    ).tensors(device)


def tune(
    model: GLMModel,
    tokenizer,
    task: Task,
    cfg: TuneSettings,
    *,
    base_checkpoint_uri: str,
    tokenizer_version: str,
    on_step=None,
) -> TuneOutcome:
    """Train an adapter for `task` on the base `model` (left unchanged) with the settings `cfg`."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    ids = SpecialIds.from_tokenizer(tokenizer)
    spec = AdapterSpec(
        method=cfg.method,
        prompt_len=0 if cfg.method == "finetune" else cfg.prompt_len,
        reparam_hidden=0 if cfg.method == "finetune" else cfg.reparam_hidden,
        kind=task.kind,
        labels={ANY_LANG if k is None else k: v for k, v in task.labels.items()},
        task=task.name,
        task_digest=task.digest,
        base_checkpoint_uri=base_checkpoint_uri,
        tokenizer_version=tokenizer_version,
        model_config=model.cfg.to_dict(),
    )
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]  # handed back trainable, as they came
    if cfg.method == "finetune":
        encoder, trained = None, copy.deepcopy(model).train()
        params = list(trained.parameters())
    else:
        encoder = spec.encoder(_prompt_init(model, cfg.method, _seed_tokens(model, tokenizer, task, cfg.prompt_len)))
        encoder = encoder.to(model.tok_emb.weight.device)
        trained = model
        for p in frozen:
            p.requires_grad_(False)
        params = list(encoder.parameters())
    tuned = Tuned(trained, tokenizer, ids, task.kind, task.labels)
    check_fits(replace(tuned, prompts=encoder() if encoder is not None else None), task, cfg.max_new_tokens)
    base_accuracy = accuracy(Tuned(model, tokenizer, ids, task.kind, task.labels), task, task.dev, cfg.max_new_tokens)
    lr = cfg.finetune_lr if cfg.method == "finetune" else cfg.lr
    schedule = TrainSettings(lr=lr, warmup_fraction=cfg.warmup_fraction)  # the pre-training schedule's shape
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    device = model.tok_emb.weight.device
    history = []
    try:
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.steps, schedule)
            rng = np.random.default_rng([cfg.seed, step])
            rows = [task.train[i] for i in rng.integers(len(task.train), size=cfg.batch_size)]
            tuned.prompts = encoder() if encoder is not None else None
            if task.kind == "cloze":
                scores_NC, spaces = tuned.label_scores([ex.text for ex in rows], [ex.lang for ex in rows], grad=True)
                gold_N = torch.tensor(
                    [space.index(ex.answer) for space, ex in zip(spaces, rows)], device=scores_NC.device
                )
                loss = F.cross_entropy(scores_NC, gold_N)
            else:
                loss = trained.loss(**_generation_batch(tuned, rows, rng, device), prompts=tuned.prompts).lm_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append(loss.item())
            if on_step is not None:
                on_step(step, history[-1])
    finally:
        for p in frozen:
            p.requires_grad_(True)
    trained.eval()
    with torch.no_grad():
        tuned.prompts = encoder().detach() if encoder is not None else None
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params)
    metrics = {
        "dev_accuracy": accuracy(tuned, task, task.dev, cfg.max_new_tokens),
        "base_accuracy": base_accuracy,
        **baselines(task),
        "train_accuracy": accuracy(tuned, task, task.train, cfg.max_new_tokens),
        "trainable_params": trainable,
        "model_params": total,
        "trainable_fraction": trainable / total,
        "steps": cfg.steps,
        "final_loss": float(np.mean(history[-10:])),
        "seconds": round(time.perf_counter() - started, 1),
    }
    spec.metrics = metrics
    state = (encoder if encoder is not None else trained).state_dict()
    return TuneOutcome(spec, {k: v.detach().cpu() for k, v in state.items()}, metrics, history)
