"""Token reduction methods, selectable by name: pure tensor functions over [T, N, D] token grids.

The registry (`METHODS`, from `streamprune.reduce.methods`) holds every method with its paper, defaults and
where it cuts. Before the LLM a method takes (features [T, N, D], attention [T, N], grid_hw, retain,
**options) and returns a `VisualTokens`; what it cuts inside the LLM is an `InnerConfig` from its `inner`.
Methods know shapes, not models.
"""

from __future__ import annotations

import torch

from streamprune.errors import ConfigError
from streamprune.reduce.holitom import holitom_reduce, temporal_segments
from streamprune.reduce.methods import PRE_LLM, Method
from streamprune.reduce.methods import REGISTRY as METHODS
from streamprune.reduce.methods.none import no_reduction
from streamprune.tokens import VisualTokens


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_retain(retain: float) -> None:
    if not 0.0 < retain <= 1.0:
        raise ConfigError(f"--retain must be in (0, 1], got {retain}")


def outer_retain(method: str, retain: float, **options: object) -> float:
    """The share the part before the LLM keeps: all of `retain` for outer-only methods, everything for methods
    that only cut inside, the method's own split for the rest (retain is always the final share)."""
    spec = get_method(method)
    if retain >= 1.0 or spec.reduce is None or PRE_LLM not in spec.cuts:
        return 1.0
    return spec.before_share(retain, **options) if spec.before_share else retain


def reduce_tokens(method: str, features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int],
                  retain: float, text: torch.Tensor | None = None, **options: object) -> VisualTokens:
    """Run the part of `method` before the LLM; retain = 1.0 means no reduction whatever the method.

    text: [L, D] the prompt's token embeddings, for methods that read the question (others ignore it)."""
    spec = get_method(method)
    check_retain(retain)
    first = outer_retain(method, retain, **options)
    if first >= 1.0:  # also every method without a cut before the LLM
        return no_reduction(features, attention, grid_hw)
    if spec.uses_text:
        options["text"] = text
    return spec.reduce(features, attention, grid_hw, first, **options)


__all__ = ["METHODS", "Method", "check_retain", "get_method", "holitom_reduce", "no_reduction", "outer_retain",
           "reduce_tokens", "temporal_segments"]
