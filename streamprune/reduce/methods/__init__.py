"""The method zoo: every token-reduction method behind one interface, selectable by name.

Each module of this package defines `METHOD` (or `METHODS`, a list) — a `Method` with its paper, defaults,
where it cuts (`pre-llm`, `inner`, `kv-cache`) and a docstring stating its criterion. Modules are found by
walking the package, so adding a method is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from streamprune.reduce.methods.base import INNER, KV_CACHE, PRE_LLM, Method


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for method in getattr(module, "METHODS", None) or [getattr(module, "METHOD", None)]:
            if method is None:
                continue
            if method.name in found:
                raise RuntimeError(f"method {method.name!r} is defined twice")
            found[method.name] = method
    return found


REGISTRY: dict[str, Method] = _discover()

__all__ = ["INNER", "KV_CACHE", "PRE_LLM", "REGISTRY", "Method"]
