"""Dependencies point one way (DESIGN.md): each part of `wudao` imports only its own layer and the layers below it,
`wudao/model` imports nothing of the package but itself, data / train / eval never import each other sideways, and
nothing in `wudao` imports `flows`. Every import counts, module level or inside a function; `TYPE_CHECKING`-only
imports (annotations) do not. README's Layout block names every module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[set[str]] = [
    {"errors", "results", "model", "stack.state"},  # leaves: import nothing of the package
    {"config", "storage"},
    {"catalog"},
    {"data"},
    {"train", "eval"},  # siblings: both read data, neither imports the other
    {"tune"},  # adapting a trained model: the training schedule of `train`, the model, the data
    {"serving", "checked", "pyfunc", "gates", "tracking", "registry", "history", "stack"},
    {"stages", "tune.run"},
    {"cli"},
]
SIBLINGS = [("train", "eval"), ("eval", "train")]
OWN_LAYER = {"stack.state", "tune.run"}
"""Modules placed apart from their package: the stack's state is a leaf, a tuning run orchestrates like a stage."""


def _part(module: str) -> str:
    """`wudao.data.ingest` -> `data`; `wudao.stack.state` -> `stack.state` (OWN_LAYER)."""
    parts = module.split(".")[1:]
    if ".".join(parts[:2]) in OWN_LAYER:
        return ".".join(parts[:2])
    return parts[0] if parts else "wudao"


def _layer(part: str) -> int:
    if part == "wudao":  # `import wudao` (the version) or `from wudao import <part>`
        return 0
    return next(n for n, layer in enumerate(LAYERS) if part in layer)


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from wudao import stages` imports the module wudao.stages
            found += [f"{node.module}.{a.name}" for a in node.names] if node.module == "wudao" else [node.module]
    return found


def _modules(folder: str) -> list[Path]:
    return [p for p in (ROOT / folder).rglob("*.py") if "migrations" not in p.parts]


def test_every_part_of_wudao_has_a_layer():
    parts = {_part("wudao." + ".".join(p.relative_to(ROOT / "wudao").with_suffix("").parts)) for p in _modules("wudao")}
    parts -= {"__init__"}
    unplaced = sorted(p for p in parts if not any(p in layer for layer in LAYERS))
    assert not unplaced, f"add these to a layer in LAYERS (and DESIGN.md): {unplaced}"


def test_dependencies_point_one_way():
    wrong = []
    for path in _modules("wudao"):
        rel = path.relative_to(ROOT / "wudao").with_suffix("")
        here = "__init__" if rel.parts == ("__init__",) else _part("wudao." + ".".join(rel.parts))
        for module in _imports(path):
            if module.split(".")[0] == "flows":
                wrong.append(f"{rel}: imports {module} (flows sit on top of wudao, never below)")
                continue
            if module.split(".")[0] != "wudao" or here == "__init__":
                continue
            there = _part(module)
            if there == here:
                continue
            if here == "model" or here in ("errors", "results", "stack.state"):
                wrong.append(f"{rel}: imports {module} ({here} imports nothing else of the package)")
            elif (here, there) in SIBLINGS or _layer(there) > _layer(here):
                wrong.append(f"{rel}: imports {module} ({there} is not below {here})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_violation(tmp_path):
    """The parser finds imports inside functions and ignores TYPE_CHECKING ones (so the check above can fail)."""
    sample = tmp_path / "m.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from wudao.train import loop\n"
        "def f():\n    from wudao.eval.kg import parse_kg\n    import flows.cli\n"
    )
    assert _imports(sample) == ["typing", "wudao.eval.kg", "flows.cli"]


def test_the_readme_layout_names_every_module():
    """README's Layout block names every module of wudao/ and flows/ (a new module is placed there with a word on
    what it holds), and nothing that no longer exists."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    top = folder = ""
    named = set()
    for line in block.splitlines():
        indent, first = len(line) - len(line.lstrip()), (line.split() or [""])[0]
        if indent == 0:  # `wudao/`, `flows/`, `prefect.yaml`
            top = folder = first if first.endswith("/") else ""
        elif indent == 2:  # `  data/` (a folder whose files the description lists) or `  gates.py`
            folder = top + first if first.endswith("/") else top
        words = line.translate(str.maketrans(",()`:;", "      ")).split()
        named |= {folder + w for w in words if w.endswith(".py")} if folder else set()
    modules = {p.relative_to(ROOT).as_posix() for top in ("wudao", "flows") for p in _modules(top)}
    modules = {m for m in modules if not m.endswith("__init__.py")}  # a package is named by its folder
    missing = sorted(m for m in modules if m not in named)
    stale = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"add to README's Layout: {missing}"
    assert not stale, f"README's Layout names modules that do not exist: {stale}"
