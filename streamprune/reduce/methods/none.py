"""`none`: every visual token, unchanged — the unmodified model's input, the reference of every comparison."""

from __future__ import annotations

import torch

from streamprune.reduce.methods.base import Method
from streamprune.tokens import VisualTokens


def no_reduction(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], retain: float = 1.0,
                 **_: object) -> VisualTokens:
    """Keeps all T·N tokens in frame-major raster order, whatever `retain` says."""
    return VisualTokens.unreduced(features, grid_hw)


METHOD = Method("none", "— (the unmodified model)", (), no_reduction)
