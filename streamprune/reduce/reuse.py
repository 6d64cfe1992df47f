"""Which patches of a frame can reuse the previous encode: a pure test on pixels (VLA-Cache's static tokens,
run-length tokenization's repeated patches), before anything reaches the vision tower.

Shapes: N patches per frame on an H×W grid, each patch `p` pixels square; pixel values as the model's
processor makes them (SigLIP: (x/255 − 0.5)/0.5, so one 0–255 level is 2/255).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_change(reference: torch.Tensor, current: torch.Tensor, level: float = 2 / 255) -> torch.Tensor:
    """Mean absolute difference per patch in 0–255 levels, in float32. reference, current: [N, K] patch
    pixels → [N]."""
    return (current.float() - reference.float()).abs().mean(-1) / level


def reuse_mask(change: torch.Tensor, grid: tuple[int, int], threshold: float, halo: int,
               max_fraction: float) -> torch.Tensor:
    """Patches to take from the cache: bool [N].

    change [N] (levels). A patch is recomputed if it changed by more than `threshold` or lies within `halo`
    patches (Chebyshev distance) of one that did; of the rest, at most round(max_fraction·N) — the least
    changed — are reused. No host sync: the cap is a rank test, a no-op when fewer candidates than the cap.
    """
    n = change.numel()
    changed = (change > threshold).float().view(1, 1, *grid)
    if halo > 0:
        changed = F.max_pool2d(changed, 2 * halo + 1, stride=1, padding=halo)
    candidate = changed.view(n) == 0
    cap = round(max_fraction * n)
    if cap >= n:
        return candidate
    # rank the candidates by change, least first (stable: ties go to the lower index), the others after them
    order = torch.argsort(change, stable=True)
    order = order[torch.argsort((~candidate[order]).to(torch.uint8), stable=True)]
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=change.device))
    return candidate & (rank < cap)
