"""The named extension points hold: every quarantine reason is in the README's table (and only those), every error
the platform names shares one base, a gate is one registered function, and a text format is one row of a table."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import wudao
from wudao.config import GateSettings
from wudao.data.quarantine import Reason
from wudao.errors import WudaoError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_quarantine_table_lists_exactly_the_reasons():
    text = README.read_text()
    table = text[text.index("| reason | what |") :].split("\n\n")[0]
    documented = re.findall(r"^\| `([a-z_0-9]+)` \|", table, flags=re.M)
    assert sorted(documented) == sorted(r.value for r in Reason)


def _all_modules():
    import flows

    for package in (wudao, flows):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".migrations" not in info.name:
                yield importlib.import_module(info.name)


def test_every_named_error_is_a_wudao_error():
    errors = {
        cls
        for module in _all_modules()
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__.startswith(("wudao", "flows"))
    }
    signals = {"ImageRejected"}  # not an error: how the image reader says "quarantine this, for this reason"
    outside = sorted(c.__qualname__ for c in errors if not issubclass(c, WudaoError) and c.__name__ not in signals)
    assert not outside, f"derive these from wudao.errors.WudaoError: {outside}"
    assert len(errors) >= 12


def test_an_error_keeps_its_cause(tmp_path):
    import pytest

    from wudao.storage import LocalStore, StorageError

    with pytest.raises(StorageError) as raised:
        LocalStore(tmp_path).get_bytes("missing.txt")
    assert isinstance(raised.value.__cause__, FileNotFoundError)


def test_a_new_gate_is_one_registered_function():
    from wudao import gates
    from wudao.results import Evaluation

    @gate_for_test
    def _(cfg: GateSettings, evaluation: Evaluation, parent: gates.ParentRecord) -> gates.GateResult:
        return gates.GateResult(
            "tiny_loss", "failed" if max(evaluation.candidate.values()) > 1 else "passed", None, None, "", ""
        )

    try:
        evaluation = Evaluation(checkpoint_uri="c", slices=["s"], candidate={"s": 2.0}, parent={"s": 2.0})
        results = gates.evaluate_gates(GateSettings(), evaluation, gates.ParentRecord(version="1", slices=["s"]))
        assert [r.name for r in results][-1] == "tiny_loss" and results[-1].status == "failed"
        assert gates.verdict(results)[0] is False
    finally:
        gates.GATES.pop("tiny_loss")


def gate_for_test(fn):
    from wudao.gates import gate

    return gate("tiny_loss")(fn)


def test_text_formats_are_the_readers_table():
    from wudao.data.formats import TEXT_READERS

    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| text |"))
    for suffix in TEXT_READERS:
        assert f"`*{suffix}`" in row, f"README's input table names {suffix}"
