"""The ingest flow: batches as Prefect tasks on the default runner and, unchanged, on a Dask or a Ray cluster; each
gives the same slice as the in-process ingest."""

from __future__ import annotations

import pytest

from tests.test_ingest import build_bad_corpus
from wudao.stages import run_ingest


def _overrides(settings, objects):
    return {
        "home": str(settings.home / objects),
        "storage_uri": str(settings.home / objects / "store"),
        "catalog_url": f"sqlite:///{settings.home / objects / 'catalog.db'}",
        "ingest": {"batch_objects": 2, "image_max_pixels": 1_000_000, "vocab_size": 600},
    }


@pytest.mark.parametrize("runner", ["default", "dask", "ray"])
def test_flow_matches_in_process_ingest(prefect_harness, local_settings, tmp_path, runner):
    from flows.ingest import ingest_flow

    src = tmp_path / "raw"
    build_bad_corpus(src, tmp_path / "outside.txt")
    expected = run_ingest(
        local_settings.model_copy(
            update={
                "ingest": local_settings.ingest.model_copy(
                    update={"batch_objects": 2, "image_max_pixels": 1_000_000, "vocab_size": 600}
                )
            }
        ),
        str(src),
    )
    flow_fn = ingest_flow
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        flow_fn = ingest_flow.with_options(
            task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "processes": True, "threads_per_worker": 1})
        )
    if runner == "ray":
        from prefect_ray import RayTaskRunner

        flow_fn = ingest_flow.with_options(
            task_runner=RayTaskRunner(init_kwargs={"num_cpus": 2, "include_dashboard": False})
        )
    got = flow_fn(source=str(src), overrides=_overrides(local_settings, runner))
    got, expected = got.to_dict(), expected.to_dict()
    for report in (expected, got):
        report.pop("manifest_uri")
    assert got == expected
