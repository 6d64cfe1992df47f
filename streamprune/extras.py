"""The optional parts of streamprune and the one line a missing one gets.

The core install (`pip install streamprune`) runs video LLMs: summarize, fidelity, bench, stream, batch
in-process. Each extra adds one feature's packages (setup.cfg's [options.extras_require])."""

from __future__ import annotations

import importlib.util

from streamprune.errors import StreamPruneError

# extra → the module that tells whether it is installed
EXTRAS = {"vla": "lerobot", "ray": "ray.data", "eval": "lmms_eval", "plot": "matplotlib"}


class MissingExtra(StreamPruneError):
    """A feature whose optional packages are not installed."""


def has_extra(extra: str) -> bool:
    module = EXTRAS[extra]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (ray of ray.data) is absent
        return False


def require_extra(extra: str, feature: str) -> None:
    """Raise `MissingExtra` naming the pip command when `feature` needs `extra` and it is not installed."""
    if not has_extra(extra):
        raise MissingExtra(f"{feature} needs streamprune's [{extra}] extra ({EXTRAS[extra].split('.')[0]} is not "
                           f"installed): pip install 'streamprune[{extra}]'")
