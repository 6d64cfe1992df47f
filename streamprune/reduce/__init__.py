"""Outer-LLM reduction methods: pure tensor functions over [T, N, D] token grids.

Every method takes (features [T, N, D], attention [T, N], grid_hw, retain, **options) and returns a
`VisualTokens`. Methods know shapes, not models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from streamprune.errors import ConfigError
from streamprune.reduce.holitom import holitom_reduce, temporal_segments
from streamprune.tokens import VisualTokens


def no_reduction(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], retain: float = 1.0,
                 **_: object) -> VisualTokens:
    """Every token, unchanged: the unmodified model's input."""
    return VisualTokens.unreduced(features, grid_hw)


METHODS: dict[str, Callable[..., VisualTokens]] = {"holitom": holitom_reduce, "none": no_reduction}


def reduce_tokens(method: str, features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int],
                  retain: float, **options: object) -> VisualTokens:
    """Run `method`; retain = 1.0 means no reduction whatever the method."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if not 0.0 < retain <= 1.0:
        raise ConfigError(f"--retain must be in (0, 1], got {retain}")
    if retain >= 1.0:
        method = "none"
    return METHODS[method](features, attention, grid_hw, retain, **options)


__all__ = ["METHODS", "holitom_reduce", "no_reduction", "reduce_tokens", "temporal_segments"]
