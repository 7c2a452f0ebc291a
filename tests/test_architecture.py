"""The floors of the code base (docs/architecture.md): every import goes down or sideways, never up.

    3  pipeline.tools                    CLI table, demo, inspect, data-check, tiny models, synthetic data
    2  pipeline.generation | stage1_teacher | stage2_student   the stages; none imports another
    1  pipeline (all but tools, generation) config, errors, logs, data layer, processors, model mechanics
    0  schemas                           the store format: layout, writer, reader, manifest, verify

Every ``import`` and ``from ... import`` of the four packages is read with ``ast``, including imports
inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipeline", "stage1_teacher", "stage2_student")
STAGES = ("pipeline.generation", "stage1_teacher", "stage2_student")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def stage(module: str) -> str | None:
    """The stage package a floor-2 module belongs to."""
    return next((s for s in STAGES if _within(module, s)), None)


def floor(module: str) -> int | None:
    """The floor of a dotted module name of the project, or None for anything else (torch, ...)."""
    top = module.split(".")[0]
    if top == "schemas":
        return 0
    if _within(module, "pipeline.tools"):
        return 3
    if stage(module) is not None:
        return 2
    if top == "pipeline":
        return 1
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_project_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every project module that ``source`` imports.

    ``from X import Y`` counts as importing ``X.Y`` when that is a module of the project (a
    subpackage's module has its own floor), else as importing ``X``.
    """
    out = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = {f"{name}.{a.name}" if is_project_module(f"{name}.{a.name}") else name for a in node.names}
            out += [(node.lineno, n) for n in sorted(names)]
    return [(line, name) for line, name in out if name.split(".")[0] in PACKAGES]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every import of ``source`` (the text of ``module``) that goes up a floor or across the stages."""
    here = floor(module)
    out = []
    for line, name in imported_modules(source, module, is_package):
        there = floor(name)
        if there is None:
            continue
        if there > here:
            out.append(f"{module}:{line} imports {name} (floor {there}) from floor {here}")
        elif here == there == 2 and stage(name) != stage(module):
            out.append(f"{module}:{line} imports {name}: the stages never import each other")
    return out


def project_modules() -> list[tuple[Path, str]]:
    return [(p, module_name(p)) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_the_project_has_the_four_floors():
    floors = {floor(m) for _, m in project_modules()}
    assert floors == {0, 1, 2, 3}


def test_no_module_imports_from_a_floor_above_or_across_the_stages():
    found = []
    for path, module in project_modules():
        found += violations(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    assert found == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("schemas.reader", "from pipeline.errors import PipelineError\n", "floor 1) from floor 0"),
        ("pipeline.modeling.probe", "import stage1_teacher.topk\n", "floor 2) from floor 1"),
        ("pipeline.data.records", "def f():\n    from pipeline.tools.tiny import build_tiny_vlm\n", "floor 3) from floor 1"),
        ("stage2_student.distill", "from stage1_teacher import dump\n", "the stages never import each other"),
        ("stage1_teacher.teacher", "from stage2_student.losses import forward_kl\n", "the stages never import each other"),
        ("pipeline.generation.shards", "from stage1_teacher.executors import RayExecutor\n", "the stages never import each other"),
        ("pipeline.data.encode", "from pipeline.generation.prompts import render\n", "floor 2) from floor 1"),
        ("schemas.reader", "from . import signals\nfrom pipeline import config\n", "floor 1) from floor 0"),
    ],
)
def test_the_checker_catches_an_upward_import(module, source, expected):
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_imports_down_and_sideways():
    source = (
        "import torch\nfrom schemas.reader import StoreReader\nfrom pipeline.modeling import branches\n"
        "from stage2_student.losses import forward_kl\nfrom . import data\n"
    )
    assert violations(source, "stage2_student.distill") == []
    assert violations("from stage1_teacher.dump import run\nfrom stage2_student import distill\n", "pipeline.tools.demo") == []
    assert violations("from pipeline.data.encode import message\nfrom schemas.layout import shard_name\n", "pipeline.generation.shards") == []
