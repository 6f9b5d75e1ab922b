"""Checked generation through the REST API: a version registered after an evaluation with a KG carries that KG,
and `mlflow models serve --env-manager local` of the registered version answers `check_facts` requests with
annotated claims (a known blank constrained to the KG's answer), honours the declared params, and answers a
request it cannot run with HTTP 400 and the fix."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import stack_env
from wudao import stages, tracking
from wudao.serving import invoke, mlflow_serve

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_served_version_checks_facts_against_its_kg(local_stack, s3_settings, demo_dir, tmp_path):
    s = s3_settings.model_copy(
        update={
            "eval": s3_settings.eval.model_copy(
                update={"kg_uri": str(demo_dir / "kg"), "kg_limit": 20, "kg_claim_subjects": 2}
            )
        }
    )
    stages.run_ingest(s, str(demo_dir / "corpus" / "slice-01"))
    trained = stages.run_train(s, None, "scratch")
    evaluation = stages.run_evaluate(s, trained["checkpoint_uri"], None)
    registration = stages.run_register(s, trained, evaluation, tracking.begin_cycle(s, "cycle-checked"))
    name, version = s.registry.model_name, registration["model_version"]
    c = MlflowClient(s.mlflow_tracking_uri)
    assert c.get_model_version(name, version).tags["wudao.kg"] == str(demo_dir / "kg")
    mlflow.set_tracking_uri(s.mlflow_tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl")))
    kg_copy = next(local.rglob("kg/facts.jsonl"))
    assert kg_copy.read_bytes() == (demo_dir / "kg" / "facts.jsonl").read_bytes(), "the version carries its KG"

    with mlflow_serve(f"models:/{name}/{version}", tmp_path / "serve.log", env=stack_env(s, None)) as url:
        blank = invoke(
            url,
            ["The capital of France is [MASK].", "法国的首都是[MASK]。"],
            {"check_facts": True, "candidates": 3, "temperature": 1.0},
        )
        assert [b["text"] for b in blank] == ["The capital of France is Paris.", "法国的首都是巴黎。"]
        assert blank[0]["claims"] == [
            {
                "claim": "The capital of France is Paris.",
                "subject": "France",
                "relation": "capital",
                "object": "Paris",
                "lang": "en",
                "verdict": "supported",
                "generated": True,
            }
        ]
        assert blank[0]["constrained"] == {
            "subject": "France",
            "relation": "capital",
            "lang": "en",
            "applied": True,
            "answers": ["Paris"],
        }

        free = invoke(
            url, ["France"], {"check_facts": True, "candidates": 3, "temperature": 1.0, "max_new_tokens": 12}
        )[0]
        assert free["candidates_tried"] == 3 and free["text"].startswith("France") and free["constrained"] is None
        counts = [cand["contradicted"] for cand in free["candidates"]]
        assert free["candidates"][free["chosen"]]["contradicted"] == min(counts)

        # Without check_facts the answer is the plain text, as before. (That check_facts above reached the model at
        # all shows the params are declared: MLflow drops undeclared ones silently, mlflow#14908.)
        plain = invoke(url, ["France"], {"max_new_tokens": 4, "temperature": 1.0, "seed": 3})
        assert isinstance(plain[0], str) and plain[0].startswith("France")
        with pytest.raises(RuntimeError, match=r"HTTP 400.*temperature > 0"):
            invoke(url, ["France"], {"check_facts": True, "candidates": 3, "temperature": 0.0})
