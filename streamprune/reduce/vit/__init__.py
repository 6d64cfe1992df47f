"""Token reduction inside a ViT encoder: pure functions over one layer's tokens.

Every method is `plan(metric, r, *, x, size, attention, position, grid, layer, num_layers) -> TokenTransform`,
called between a layer's attention and its MLP, removing `r` of the L tokens:
  metric    [B, L, d]     the layer's keys averaged over heads (ToMe's similarity metric),
  x         [B, L, C]     hidden states after the attention residual,
  size      [B, L]        patches each token stands for,
  attention [B, h, L, L]  softmax attention among the tokens per head (only for `needs_attention`),
  position  [B, L]        grid position of the patch each token continues, on `grid` (H, W),
  layer / num_layers      where in the tower the step runs.
The encoder runner (`streamprune.encoder.tower`) applies the transform and keeps the bookkeeping
(sizes, which patch each token accounts for) so the output can be unmerged back to the patch grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from streamprune.reduce.vit.transform import (
    TokenState,
    TokenTransform,
    apply_transform,
    merge_schedule,
    unmerge,
)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    plan: Callable[..., TokenTransform]
    paper: str
    needs_attention: bool = False  # the runner computes the attention matrix of the layer for it
    proportional: bool = True  # size-aware attention after merging (off for pure pruning)


def _methods() -> dict[str, MergeMethod]:
    from streamprune.reduce.vit import gtp, token_transforming, tome, zero_tprune

    return {
        "tome": MergeMethod("tome", tome.tome, tome.PAPER),
        # the same matching, survivors kept in raster order instead of the release's order (see tome.py)
        "tome-raster": MergeMethod("tome-raster", tome.tome_raster, tome.PAPER),
        "zero-tprune": MergeMethod("zero-tprune", zero_tprune.zero_tprune, zero_tprune.PAPER, needs_attention=True,
                                   proportional=False),
        "gtp": MergeMethod("gtp", gtp.gtp, gtp.PAPER, needs_attention=True, proportional=False),
        "token-transforming": MergeMethod("token-transforming", token_transforming.token_transforming,
                                          token_transforming.PAPER, needs_attention=True),
    }


MERGE_METHODS: dict[str, MergeMethod] = _methods()

__all__ = ["MERGE_METHODS", "MergeMethod", "TokenState", "TokenTransform", "apply_transform", "merge_schedule",
           "unmerge"]
