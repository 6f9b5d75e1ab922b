"""Does knowledge-checked generation contradict the KG less than plain sampling? Side by side, one model, one run.

The model is the platform's default recipe trained on demo slice 1 only (ingest -> train, folder store, no
servers). The KG holds the facts of all three demo slices, so subjects split in two:

    seen      first_slice = slice-01: the model read text about them
    held-out  first_slice = slice-02/03: never in the training text (the issue's "held-out subjects")

For sampled subjects of each split and each language, two kinds of prompt:

    blank         a KG template with [X] = subject and [MASK] where [Y] goes ("The capital of Chad is [MASK].")
    continuation  the subject's name alone; the model writes on (claims about any KG subject count)

and three ways to answer each prompt, all with the same sampling settings and seed:

    plain        one sample (`wudao generate --temperature T`)
    greedy       the argmax answer (`wudao generate`, its default)
    checked      best of K (`wudao generate --check-facts`: the greedy answer and K-1 samples): fewest contradicted
                 claims, then likelihood; a blank whose relation is known takes the KG's answer
    selection    the same without the blank constraint (what choosing among K alone buys)

Reported per split, kind and method: claims the model wrote (claims touching the generated text; the prompt's
own are not counted), supported / contradicted / unverifiable, the contradicted rate per claim and contradicted
claims per prompt, and the ratios checked / plain and checked / greedy. With --rest the same prompts go through the REST API of
`mlflow models serve` (the pyfunc model saved with its KG, served with --env-manager local on a free port), and
the report says how many answers equal the in-process ones.

    .venv/bin/python bench/knowledge.py [--subjects 24] [--candidates 4] [--temperature 1.0] [--steps N]
                                        [--work DIR] [--rest] [--json]

--work keeps the trained model between runs (a finished training is not repeated).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wudao.checked import answer_claims, generate_checked  # noqa: E402
from wudao.config import Settings  # noqa: E402
from wudao.data.demo import write_demo  # noqa: E402
from wudao.data.glm import blank_prompt  # noqa: E402
from wudao.data.tokenizer import MASK  # noqa: E402
from wudao.eval.kg import VERDICTS, ClaimChecker  # noqa: E402
from wudao.model import Sampling  # noqa: E402
from wudao.stages import generator_for, kg_files, load_kg, run_ingest, run_train  # noqa: E402

METHODS = ("plain", "greedy", "checked", "selection")


def prompts_for(kg, split: list[tuple[str, str]], rng: np.random.Generator) -> list[tuple[str, str]]:
    """(kind, prompt) for subjects of one split: a blank per relation the KG knows for them, and a continuation."""
    relations = defaultdict(set)
    for f in kg.facts:
        relations[(f.subject, f.lang)].add(f.relation)
    out = []
    for subject, lang in split:
        for relation in sorted(relations[(subject, lang)]):
            templates = kg.templates[(relation, lang)]
            template = templates[int(rng.integers(len(templates)))]
            out.append(("blank", template.replace("[X]", subject).replace("[Y]", MASK)))
        out.append(("continuation", subject))
    return out


def generated_verdicts(gen, checker: ClaimChecker, prompt: str, text: str) -> list[str]:
    """Verdicts of a plain answer's claims that touch what the model wrote (the rule of the checked result)."""
    claims, generated = answer_claims(checker, prompt, text, blank_prompt(gen.tokenizer, prompt, gen.ids))
    return [c.verdict for c, g in zip(claims, generated) if g]


def summarise(rows: list[dict]) -> dict:
    counts = {k: sum(r[k] for r in rows) for k in ("supported", "contradicted", "unverifiable")}
    claims = sum(counts.values())
    return {
        "prompts": len(rows),
        "claims": claims,
        **counts,
        "contradicted_rate": counts["contradicted"] / claims if claims else None,
        "supported_rate": counts["supported"] / claims if claims else None,
        "contradicted_per_prompt": counts["contradicted"] / len(rows) if rows else None,
        "claims_per_prompt": claims / len(rows) if rows else None,
    }


def answer_all(answer, prompts: list[tuple[str, str]]) -> dict[str, list[dict]]:
    """answer(method, prompt, seed) -> (text, verdicts of the generated claims) for every prompt and method."""
    rows: dict[str, list[dict]] = defaultdict(list)
    for seed, (kind, prompt) in enumerate(prompts):
        if seed % 20 == 0:
            print(f"prompt {seed + 1}/{len(prompts)}", file=sys.stderr, flush=True)
        for method in METHODS:
            if method == "selection" and kind == "continuation":
                continue  # nothing to constrain: the same as checked
            text, verdicts = answer(method, prompt, seed)
            rows[method].append(
                {"kind": kind, "prompt": prompt, "text": text, **{v: verdicts.count(v) for v in VERDICTS}}
            )
    return rows


def report(rows: dict[str, list[dict]]) -> dict:
    out = {}
    for kind in ("blank", "continuation"):
        out[kind] = {m: summarise([r for r in rows[m] if r["kind"] == kind]) for m in METHODS if rows.get(m)}
        out[kind] = {m: v for m, v in out[kind].items() if v["prompts"]}
        checked = out[kind]["checked"]
        for base in ("plain", "greedy"):
            out[kind][f"checked_over_{base}"] = {
                k: (checked[k] / out[kind][base][k] if out[kind][base][k] else None)
                for k in ("contradicted_rate", "contradicted_per_prompt")
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=24, help="subjects per split (both languages pooled)")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's, train.steps)")
    ap.add_argument("--work", type=Path, default=None, help="keep demo data and the trained model here")
    ap.add_argument("--rest", action="store_true", help="also answer through `mlflow models serve`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        demo = work / "demo"
        if not (demo / "kg" / "facts.jsonl").exists():
            write_demo(demo, slices=3, seed=0, images=0)
        settings = Settings(
            home=work / "home", storage_uri=str(work / "objects"), train={"steps": args.steps} if args.steps else {}
        ).resolved()
        run_ingest(settings, str(demo / "corpus" / "slice-01"))  # a no-op when already ingested
        t0 = time.perf_counter()
        trained = run_train(settings, start="scratch")
        train_s = time.perf_counter() - t0
        gen, uri = generator_for(settings, trained["checkpoint_uri"])
        kg = load_kg(settings, str(demo / "kg"))
        checker = ClaimChecker(kg)

        rng = np.random.default_rng(args.seed)
        subjects = sorted({(f.subject, f.lang, f.first_slice == "slice-01") for f in kg.facts})
        splits = {}
        for name, seen in (("seen", True), ("heldout", False)):
            pool = [(s, lang) for s, lang, is_seen in subjects if is_seen == seen]
            pick = sorted(rng.choice(len(pool), min(args.subjects, len(pool)), replace=False))
            splits[name] = prompts_for(kg, [pool[i] for i in pick], rng)
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p)

        def local(method: str, prompt: str, seed: int):
            if method in ("plain", "greedy"):
                text = gen.text(prompt, args.max_new_tokens, sampling if method == "plain" else Sampling(), seed)
                return text, generated_verdicts(gen, checker, prompt, text)
            r = generate_checked(
                gen,
                checker,
                prompt,
                candidates=args.candidates,
                max_new_tokens=args.max_new_tokens,
                sampling=sampling,
                seed=seed,
                constrain=method == "checked",
            )
            return r.text, [c.verdict for c, g in zip(r.claims, r.generated) if g]

        t0 = time.perf_counter()
        answers = {name: answer_all(local, prompts) for name, prompts in splits.items()}
        gen_s = time.perf_counter() - t0
        result = {
            "model": {
                "checkpoint": uri,
                "steps": trained["steps"],
                "final_loss": trained["final_loss"],
                "trained_on": trained["slice_ids"],
                "train_s": round(train_s, 1),
            },
            "split": "seen = KG subjects whose first_slice is slice-01 (the training text); held-out = slice-02/03 "
            "subjects, never in the training text",
            "settings": {
                "subjects_per_split": args.subjects,
                "candidates": args.candidates,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens,
            },
            "in_process": {name: report(rows) for name, rows in answers.items()},
            "generate_s": round(gen_s, 1),
        }
        if args.rest:
            result["rest"] = through_rest(
                settings, trained, kg_files(settings, str(demo / "kg")), gen, checker, splits, answers, args, work
            )
        result["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    for name, kinds in result["in_process"].items():
        for kind, methods in kinds.items():
            for m in METHODS:
                if m in methods:
                    v = methods[m]
                    print(
                        f"{name:8s} {kind:12s} {m:9s} prompts {v['prompts']:4d} claims {v['claims']:4d} "
                        f"contradicted rate {_fmt(v['contradicted_rate'])} per prompt {_fmt(v['contradicted_per_prompt'])} "
                        f"supported rate {_fmt(v['supported_rate'])}"
                    )
            print(
                f"{name:8s} {kind:12s} checked/plain {json.dumps(methods['checked_over_plain'])} "
                f"checked/greedy {json.dumps(methods['checked_over_greedy'])}"
            )
    if "rest" in result:
        print(f"REST: {json.dumps(result['rest']['same_as_in_process'])}")
    print(
        f"model trained {result['model']['train_s']} s, answers {result['generate_s']} s, total {result['seconds']} s"
    )


def _fmt(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:.3f}"


def through_rest(settings, trained, kg, gen, checker, splits, answers, args, work: Path) -> dict:
    """The same prompts, seeds and settings through `mlflow models serve` of the saved pyfunc model."""
    import mlflow
    from mlflow.models import infer_signature

    from wudao.data.tokenizer import tokenizer_key
    from wudao.pyfunc import PARAMS, WudaoLM, model_artifacts
    from wudao.serving import invoke, mlflow_serve
    from wudao.stages import platform_store

    model_dir = work / "pyfunc"
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = model_artifacts(
            platform_store(settings),
            trained["checkpoint_uri"],
            tokenizer_key(trained["tokenizer_version"]),
            settings.ingest.image_size,
            Path(tmp),
            kg=kg,
        )
        if model_dir.exists():
            import shutil

            shutil.rmtree(model_dir)
        mlflow.pyfunc.save_model(
            model_dir,
            python_model=WudaoLM(),
            artifacts=artifacts,
            signature=infer_signature(["x"], ["y"], params=PARAMS),
        )
    base = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    t0 = time.perf_counter()
    with mlflow_serve(str(model_dir), work / "serve.log") as url:

        def remote(method: str, prompt: str, seed: int):
            if method in ("plain", "greedy"):
                params = {**base, "seed": seed, **({"temperature": 0.0} if method == "greedy" else {})}
                text = invoke(url, [prompt], params)[0]
                return text, generated_verdicts(gen, checker, prompt, text)
            out = invoke(
                url,
                [prompt],
                {
                    **base,
                    "seed": seed,
                    "check_facts": True,
                    "candidates": args.candidates,
                    "constrain": method == "checked",
                },
            )[0]
            return out["text"], [c["verdict"] for c in out["claims"] if c["generated"]]

        rest = {name: answer_all(remote, prompts) for name, prompts in splits.items()}
    same = {
        name: {
            m: sum(a["text"] == b["text"] for a, b in zip(answers[name][m], rest[name][m])) / len(rest[name][m])
            for m in rest[name]
        }
        for name in rest
    }
    return {
        "results": {name: report(rows) for name, rows in rest.items()},
        "same_as_in_process": same,
        "seconds": round(time.perf_counter() - t0, 1),
    }


if __name__ == "__main__":
    main()
