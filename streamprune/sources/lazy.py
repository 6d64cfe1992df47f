"""A module imported on first use: PyAV is needed to decode video, not to import streamprune (a benchmark or a
pipeline fed with decoded frames runs where PyAV is not installed)."""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for module `name`; the first attribute read imports it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
