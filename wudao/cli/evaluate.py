"""The `eval` group: a model's KG fact probe (`eval kg`) and its MS-COCO FID/KID (`eval fid`) outside a cycle, with
their renderers (`flows.cli` reuses `_follows_line` for the cycle's report)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from wudao.cli.common import JsonOpt, _run, _settings

# Added to `app` in `wudao/cli/__init__.py`, where the order of the groups in `wudao --help` is set.
eval_app = typer.Typer(help="Evaluate a model outside a cycle.", no_args_is_help=True)


@eval_app.command("kg")
def eval_kg(
    kg: Annotated[str, typer.Option(help="KG folder (facts.jsonl + templates.jsonl), local or s3://.")],
    model_uri: Annotated[
        str, typer.Option("--model", help="champion (default), a checkpoint URI, or models:/name/version.")
    ] = "champion",
    limit: Annotated[int | None, typer.Option(min=1, help="Probe a seeded sample of N facts.")] = None,
    slice_id: Annotated[
        str | None,
        typer.Option(
            "--slice",
            help="Probe only facts whose facts.jsonl first_slice is this id (the demo KG: slice-01..); catalog slice ids (slice-00001.. unless `ingest --slice NAME`) match only if named alike.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Cloze-probe every fact against its relation's closed answer space (P@1 beside chance and majority, MRR, CI)
    and check generated claims."""
    from wudao import stages

    _run(json_out, lambda: stages.run_eval_kg(_settings(), model_uri, kg, limit, slice_id=slice_id), _render_kg)


def _render_kg(r: dict[str, Any]) -> None:
    def p1(v: dict[str, Any]) -> str:
        return f"P@1 {v['p_at_1']:.2f} (chance {v['chance']:.2f}, majority {v['majority']:.2f})  MRR {v['mrr']:.2f}"

    only = f" of slice {r['slice_id']}" if r.get("slice_id") else ""
    typer.echo(f"{p1(r)}  95% CI [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
    typer.echo(f"facts: {r['n_facts']}{only}, model {r['model']}, KG {r['kg']}")
    for title, key in (("relation", "by_relation"), ("language", "by_language"), ("slice", "by_slice")):
        for name, v in r[key].items():
            typer.echo(f"  {title:8s} {name:16s} {p1(v)}  n={v['n_facts']}")
    c = r["claims"]
    typer.echo(
        f"claims: {c['claims']} from {c['subjects']} subjects: supported {c['supported_rate']:.2f}, "
        f"contradicted {c['contradicted_rate']:.2f}, unverifiable {c['unverifiable_rate']:.2f}"
    )
    if r["problems"]:
        typer.echo(f"problems: {json.dumps(r['problems'], ensure_ascii=False)}")


@eval_app.command("fid")
def eval_fid(
    coco: Annotated[
        str, typer.Option(help="MS-COCO root: annotations/captions_<split>.json + <split>/ images, local or s3://.")
    ],
    model_uri: Annotated[
        str, typer.Option("--model", help="champion (default), a checkpoint URI, or models:/name/version.")
    ] = "champion",
    n: Annotated[
        int | None,
        typer.Option(min=2, help="Captions to draw, one per image (default: eval.fid_n, 30000 as in CogView)."),
    ] = None,
    candidates: Annotated[
        int | None,
        typer.Option(
            min=1, help="Images per caption; CogView self-reranking keeps the best (default: eval.fid_candidates)."
        ),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Inception weights file, local or s3:// (default: eval.fid_weights_uri).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """MS-COCO FID and KID of text -> image generation against the captions' real images (reference statistics cached)."""
    from wudao import stages

    def work():
        settings = _settings(**({"eval": {"fid_weights_uri": weights}} if weights else {}))
        return stages.run_eval_fid(settings, model_uri, coco, n, candidates)

    _run(json_out, work, _render_fid)


def _follows_line(f: dict[str, Any]) -> str:
    return (
        f"images follow their captions: {f['both_accuracy']:.2f} (chance {f['chance_both']:.2f}); background colour "
        f"{f['background_accuracy']:.2f} (chance {f['chance_background']:.2f}), shape colour {f['shape_accuracy']:.2f} "
        f"(chance {f['chance_shape']:.2f}) over {f['n_probed']} captions"
    )


def _render_fid(r: dict[str, Any]) -> None:
    biased = f"   (N={r['n_images']} < 2048: biased upward, see warning)" if r.get("warning") else ""
    typer.echo(f"FID {r['fid']:.3f}{biased}")
    typer.echo(f"KID {r['kid_mean']:.5f} ± {r['kid_std']:.5f}  ({r['kid_subsets']} subsets of {r['kid_subset_size']})")
    for radius, value in r.get("fid_blur", {}).items():
        typer.echo(f"FID-{radius} {value:.3f}  (images blurred with radius {radius})")
    if follows := r.get("follows"):
        typer.echo(_follows_line(follows))
    cached = "reused from the cache" if r["reference_cached"] else "computed and cached"
    skipped = f" {json.dumps(r['skipped'])}" if r["skipped"] else ""
    typer.echo(
        f"images: {r['n_images']} generated from {r['model']}; {r['n_real']} real, {r['n_skipped']} skipped{skipped}"
    )
    typer.echo(f"reference statistics: {cached} ({r['reference_key']})")
    for key in ("warning", "weights_note"):
        if r.get(key):
            typer.echo(f"{'warning' if key == 'warning' else 'weights'}: {r[key]}")
    typer.echo(f"samples: {r['samples_uri']}")
