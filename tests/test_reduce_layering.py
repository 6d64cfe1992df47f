"""`streamprune.reduce` describes reductions; `streamprune.models` executes them. Nothing under reduce/ may import
models/, neither at module top nor inside a function (the import cycle issue 25 removed)."""

from __future__ import annotations

import ast
from pathlib import Path

import streamprune.reduce

REDUCE = Path(streamprune.reduce.__file__).parent


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import anywhere in `tree` (function-level ones included); relative
    imports resolved against `package`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if not node.module else base) for alias in node.names]
    return found


def test_the_checker_sees_function_level_and_relative_imports():
    source = ("def f():\n    from streamprune.models.inner_stage import InnerConfig\n"
              "from ...models import base\nfrom .. import holitom\nimport streamprune.models.base\n")
    modules = {m for _, m in imported_modules(ast.parse(source), "streamprune.reduce.methods")}
    assert modules == {"streamprune.models.inner_stage", "streamprune.models", "streamprune.reduce.holitom",
                       "streamprune.models.base"}


def test_no_module_under_reduce_imports_models():
    files = sorted(REDUCE.rglob("*.py"))
    assert len(files) > 20  # the methods are there
    offending = []
    for path in files:
        package = ".".join(("streamprune", *path.relative_to(REDUCE.parent).parent.parts))
        for line, module in imported_modules(ast.parse(path.read_text(), str(path)), package):
            if module == "streamprune.models" or module.startswith("streamprune.models."):
                offending.append(f"{path.relative_to(REDUCE.parent)}:{line} imports {module}")
    assert not offending, "\n".join(offending)


def test_the_inner_cut_types_live_in_reduce():
    from streamprune.reduce.inner_cuts import InnerConfig, KVPrune, cut_schedule, default_layer, scaled_layer
    from streamprune.reduce.methods import REGISTRY

    config = REGISTRY["fastv"].inner(0.5, 28)
    assert isinstance(config, InnerConfig) and config.steps[0].layer == scaled_layer(2, 28, 28) == 2
    assert isinstance(REGISTRY["dycoke"].inner(0.5, 28).kv, KVPrune)
    assert default_layer(28) == 18
    assert [k for k, _, _ in cut_schedule((2, 6), (0.5, 0.25), 28, 28)] == [2, 6]
