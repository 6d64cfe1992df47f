"""GTP-ViT (Xu et al., WACV 2024): graph-based token propagation (official code: Ackesnal/GTP-ViT).

Between a layer's attention and MLP, the r tokens that are easiest to regenerate from the others are
propagated into their graph neighbours and removed:
- score = (max over heads of a token's attention to itself: regeneration difficulty) × (max over heads of
  the attention it receives: broadcasting ability) — the code's default `MixedAttnMax`, in its no-[CLS] mode;
  the lowest r are propagated;
- graph: the 8-neighbour spatial grid of the patches, normalised once as D^-1/2 G D^-1/2 over the full grid
  and sliced to the current tokens, never renormalised (the code's default when no graph is named);
- propagation: x_kept ← x_kept + α·Ĝ[kept, propagated]·x_propagated, α = 0.1; token scales (proportional
  attention) off, as the code's default.
A propagated token without a kept neighbour loses its information, as in the reference; for the bookkeeping
every propagated token is accounted for by its strongest kept neighbour, or its most similar kept token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamprune.reduce.vit.transform import TokenTransform, route

PAPER = "Xu et al., GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation, WACV 2024"
ALPHA = 0.1


def spatial_graph(position: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Normalised 8-neighbour adjacency among tokens at grid `position` [B, L] → [B, L, L]."""
    h, w = grid
    row, col = position // w, position % w
    near = ((row[:, :, None] - row[:, None, :]).abs() <= 1) & ((col[:, :, None] - col[:, None, :]).abs() <= 1)
    near &= position[:, :, None] != position[:, None, :]
    # degree in the full grid: 8 inside, 5 on an edge, 3 in a corner
    rows_near = 3 - (row == 0).long() - (row == h - 1).long()
    cols_near = 3 - (col == 0).long() - (col == w - 1).long()
    degree = (rows_near * cols_near - 1).float()
    return near.float() / (degree[:, :, None] * degree[:, None, :]).sqrt()


def gtp(metric: torch.Tensor, r: int, *, attention: torch.Tensor, position: torch.Tensor, grid: tuple[int, int],
        alpha: float = ALPHA, **_: object) -> TokenTransform:
    """Propagate r tokens. metric [B, L, d]; attention [B, h, L, L]; position [B, L] on `grid`."""
    b, length, _ = metric.shape
    regeneration = attention.diagonal(dim1=-2, dim2=-1).amax(1)  # [B, L]
    broadcasting = attention.sum(-2).amax(1)  # column sums: attention received
    propagated = (regeneration * broadcasting).topk(r, -1, largest=False).indices
    removed = torch.zeros(b, length, dtype=torch.bool, device=metric.device).scatter_(1, propagated, True)
    graph = spatial_graph(position, grid) * (~removed)[:, :, None] * removed[:, None, :]  # kept ← propagated
    unit = F.normalize(metric.float(), dim=-1)
    similar = (unit @ unit.transpose(1, 2)).masked_fill(removed[:, None, :], -float("inf"))
    strongest = graph.transpose(1, 2)  # [B, propagated, kept]
    target = torch.where(strongest.amax(-1) > 0, strongest.argmax(-1), similar.argmax(-1))
    step = route(removed, target, r)
    weights = graph.gather(1, step.kept[..., None].expand(-1, -1, length)) * alpha
    weights.scatter_(2, step.kept[..., None], 1.0)
    step.weights, step.normalize = weights, False
    return step
