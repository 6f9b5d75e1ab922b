"""Commands that make and use models: `train` (continued pre-training, also under torchrun), `train-vq` (the image
tokenizer), `generate` (text, images, fact-checked text) and `tune` (P-tuning or finetuning for a task)."""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from wudao.cli.common import JsonOpt, _print_kv, _run, _settings, app


@app.command("train")
def train_cmd(
    slice_id: Annotated[
        str | None, typer.Option("--slice", help="Slice to learn: an id or `latest` (default).")
    ] = None,
    start: Annotated[
        str, typer.Option("--from", help="champion (default; scratch when none), scratch, or a checkpoint URI.")
    ] = "champion",
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: train.steps).")] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            help="Resume or name a run (default: derived from slices, start and settings, so a rerun after a crash resumes)."
        ),
    ] = None,
    keep_history: Annotated[
        bool, typer.Option("--keep-history", hidden=True, help="Keep the per-step history in the result.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Continue pre-training on a slice with replay of the earlier slices; resumes an interrupted run.

    Runs under `torchrun --nproc-per-node N` as well (DDP; rank 0 reports).
    """
    from wudao import stages

    def work():
        overrides = {"train": {"steps": steps}} if steps else {}
        result = stages.run_train(_settings(**overrides), slice_id, start, run_id).to_dict()
        if not keep_history:
            result.pop("history")
        return result

    if int(os.environ.get("RANK", "0")) == 0:
        _run(json_out, work, _print_kv)
    else:
        _run(False, work, lambda r: None)  # other ranks train silently


@app.command("train-vq")
def train_vq_cmd(
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 300,
    json_out: JsonOpt = False,
) -> None:
    """Train the VQ-VAE image tokenizer on the images of every committed slice and make it current."""
    from wudao import stages
    from wudao.train.vq import train_vq

    def work():
        s = _settings()
        return train_vq(
            stages.platform_store(s),
            stages.committed_slices(s),
            s.home / "cache",
            image_size=s.ingest.image_size,
            codebook_size=s.model.image_codebook_size,
            steps=steps,
            hidden=s.train.vq_hidden,
            seed=s.train.seed,
        )

    _run(json_out, work, _print_kv)


@app.command("generate")
def generate_cmd(
    model_uri: Annotated[
        str, typer.Option("--model", help="champion (default), a checkpoint URI, or models:/name/version.")
    ] = "champion",
    text: Annotated[
        str | None, typer.Option(help='A prompt with a blank ("The capital of France is [MASK].") or to continue.')
    ] = None,
    image_prompt: Annotated[str | None, typer.Option(help="A caption to draw (needs --out and a VQ model).")] = None,
    out: Annotated[Path | None, typer.Option(help="PNG file for --image-prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    temperature: Annotated[
        float | None, typer.Option(min=0.0, help="0 = greedy (default; 1.0 with --check-facts).")
    ] = None,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    candidates: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Images to sample (CogView self-reranking keeps the best; default 1), or texts with --check-facts (default 4).",
        ),
    ] = None,
    check_facts: Annotated[
        bool,
        typer.Option(
            "--check-facts",
            help="Keep the candidate text with the fewest claims the KG contradicts; annotate every claim.",
        ),
    ] = False,
    kg: Annotated[
        str | None, typer.Option(help="KG folder for --check-facts, local or s3:// (default: eval.kg_uri).")
    ] = None,
    constrain: Annotated[
        bool, typer.Option(help="With --check-facts: a blank whose relation the KG knows takes the KG's answer.")
    ] = True,
    seed: int = 0,
    json_out: JsonOpt = False,
) -> None:
    """Fill a blank, continue a text, or draw an image from a caption with a trained model."""
    if (text is None) == (image_prompt is None):
        typer.echo("error: give exactly one of --text or --image-prompt", err=True)
        raise typer.Exit(2)
    if image_prompt is not None and out is None:
        typer.echo("error: --image-prompt needs --out FILE.png", err=True)
        raise typer.Exit(2)
    if check_facts and text is None:
        typer.echo("error: --check-facts checks text: give --text", err=True)
        raise typer.Exit(2)
    temperature = temperature if temperature is not None else 1.0 if check_facts else 0.0
    candidates = candidates or (4 if check_facts else 1)
    if check_facts and candidates > 1 and temperature == 0:
        typer.echo(
            f"error: --candidates {candidates} needs --temperature > 0 (greedy decoding draws one candidate {candidates} times)",
            err=True,
        )
        raise typer.Exit(2)
    kg = kg or (_settings().eval.kg_uri if check_facts else None)
    if check_facts and not kg:
        typer.echo("error: --check-facts needs --kg DIR (or eval.kg_uri; `wudao kg build OUT` writes one)", err=True)
        raise typer.Exit(2)
    from wudao import stages
    from wudao.model import Sampling

    def work():
        s = _settings()
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        if check_facts:
            from wudao.checked import generate_checked
            from wudao.eval.kg import ClaimChecker

            checker = ClaimChecker(stages.load_kg(s, kg))  # a bad KG fails before the model loads
            gen, uri = stages.generator_for(s, model_uri)
            result = generate_checked(
                gen,
                checker,
                text,
                candidates=candidates,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                seed=seed,
                constrain=constrain,
            )
            return {"model": uri, "kg": kg, "prompt": text, **result.to_dict()}
        gen, uri = stages.generator_for(s, model_uri)
        if text is not None:
            return {"model": uri, "prompt": text, "text": gen.text(text, max_new_tokens, sampling, seed)}
        return {"model": uri, "prompt": image_prompt, **stages.draw(s, gen, image_prompt, out, candidates, seed)}

    _run(json_out, work, _render_checked if check_facts else _print_kv)


def _render_checked(r: dict[str, Any]) -> None:
    typer.echo(r["text"])
    for c in r["claims"]:
        typer.echo(f"  [{c['verdict']}] {c['claim']}" + ("" if c["generated"] else "  (in the prompt)"))
    if (con := r["constrained"]) is not None:
        said = (
            f"constrained to the KG's {', '.join(con['answers'])}"
            if con["applied"]
            else f"not constrained: {con['reason']}"
        )
        typer.echo(f"blank = {con['relation']} of {con['subject']} ({con['lang']}): {said}")
    counts = [f"{c['contradicted']} contradicted" for c in r["candidates"]]
    typer.echo(f"candidates tried: {r['candidates_tried']} ({', '.join(counts)}); kept #{r['chosen'] + 1}")


class TuneMethod(StrEnum):
    ptuning = "ptuning"
    ptuning_v1 = "ptuning-v1"
    finetune = "finetune"


@app.command("tune")
def tune_cmd(
    task_dir: Annotated[
        Path,
        typer.Argument(
            help='Task folder: train.jsonl + dev.jsonl of {"text": "... [MASK] ...", "label"|"target": ...}.'
        ),
    ],
    model_uri: Annotated[
        str, typer.Option("--model", help="champion (default), candidate, models:/name/version, or a checkpoint URI.")
    ] = "champion",
    method: Annotated[
        TuneMethod | None,
        typer.Option(
            help="ptuning (v2: prefix keys/values in every layer), ptuning-v1 (input prompts) or finetune (every weight); default tune.method."
        ),
    ] = None,
    prompt_len: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Prefix entries (v2) or pseudo tokens (v1); default tune.prompt_len."),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default tune.steps).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Adapt a trained model to a task with the model frozen (P-tuning) or not (finetune); store the adapter,
    register it in MLflow (`wudao-adapters`, tagged with the base version) and report dev accuracy beside the
    zero-shot base and the majority baseline."""
    from wudao.tune.run import run_tune

    def work():
        given = {"method": method.value if method else None, "prompt_len": prompt_len, "steps": steps}
        overrides = {k: v for k, v in given.items() if v is not None}
        return run_tune(_settings(**({"tune": overrides} if overrides else {})), task_dir, model_uri)

    _run(json_out, work, _render_tune)


def _render_tune(r: dict[str, Any]) -> None:
    t = r["task"]
    labels = f", labels {json.dumps(t['labels'], ensure_ascii=False)}" if "labels" in t else ""
    typer.echo(f"task:    {t['name']} ({t['kind']}{labels}): {t['train']} train, {t['dev']} dev rows")
    prompt = f", {r['prompt_len']} prompt positions" if r["prompt_len"] else ""
    typer.echo(
        f"method:  {r['method']}{prompt}: {r['trainable_params']:,} trainable parameters = "
        f"{100 * r['trainable_fraction']:.2f}% of {r['model_params']:,}; {r['steps']} steps in {r['seconds']} s"
    )
    chance = f", chance {r['chance_accuracy']:.2f}" if "chance_accuracy" in r else ""
    typer.echo(
        f"dev:     accuracy {r['dev_accuracy']:.2f}  (zero-shot base {r['base_accuracy']:.2f}, "
        f"majority {r['majority_accuracy']:.2f}{chance}; train {r['train_accuracy']:.2f})"
    )
    base = f"base {r['base']}" + ("" if r["base_version"] else " (unregistered checkpoint)")
    typer.echo(f"adapter: {r['adapter_uri']}  ({base})")
    typer.echo(f"MLflow:  {r['adapter_model_uri']}  run {r['run_url']}")
