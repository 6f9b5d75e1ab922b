"""Register: the trained checkpoint becomes a model version; the promotion gates decide whether it is champion."""

from __future__ import annotations

import sys

from wudao import registry
from wudao.config import Settings
from wudao.results import Evaluation, Registration, Trained
from wudao.stages.common import StageError, platform_store
from wudao.stages.evaluate import kg_files
from wudao.storage import StorageError


def run_register(
    settings: Settings,
    trained: Trained,
    evaluation: Evaluation,
    cycle_run_id: str,
    stage_run_id: str | None = None,
    prefect_flow_run_id: str | None = None,
) -> Registration:
    """Register the trained checkpoint as a model version, apply the promotion gates, move the aliases."""
    # The parent is the version the candidate was trained from, else the champion it would replace.
    parent = registry.version_of_checkpoint(settings, trained.resumed_from) or registry.champion(settings)
    kg = None
    if kg_uri := evaluation.kg.get("kg") if evaluation.kg else None:  # the KG it was evaluated with travels with it
        try:
            kg = {"uri": kg_uri, "files": kg_files(settings, kg_uri)}
        except (StageError, StorageError, OSError) as e:
            # Gone since the evaluation: the version is still registered, and says why it has no KG.
            warning = f"warning: KG {kg_uri} not logged with the version ({e}): it cannot check facts when served"
            print(warning, file=sys.stderr)
            kg = {"uri": kg_uri, "error": str(e).splitlines()[0]}
    return registry.register_cycle(
        settings,
        kg_artifact=kg,
        store=platform_store(settings),
        trained=trained,
        evaluation=evaluation,
        parent=parent,
        cycle_run_id=cycle_run_id,
        stage_run_id=stage_run_id,
        prefect_flow_run_id=prefect_flow_run_id,
    )
