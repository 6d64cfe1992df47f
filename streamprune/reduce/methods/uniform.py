"""`uniform`: spatial average pooling of every frame down to the budget — the content-blind baseline.

LLaVA-OneVision's own 2×2 pooling is this at retain 0.25. To hit the budget exactly (not only at 1/4, 1/9,
...) each frame's quota q is split into near-square cells: ⌈√(q·H/W)⌉-ish bands of rows, q spread over
the bands by largest remainder, each band cut into equal-width column pieces.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from streamprune.reduce.holitom import allocate_budget, host_ints
from streamprune.reduce.methods.base import PRE_LLM, Method, assemble, check_inputs, frame_quotas
from streamprune.tokens import VisualTokens

PAPER = "baseline (spatial average pooling, as LLaVA-OneVision's 2×2 video pooling)"


def pooling_cells(grid_hw: tuple[int, int], q: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Partition an H×W grid into exactly q near-square rectangles. Returns [H·W] long cell ids 0..q−1
    in raster order of the cells, on `device`."""
    return host_ints(_cells(grid_hw, q), device)


@lru_cache(maxsize=256)
def _cells(grid_hw: tuple[int, int], q: int) -> np.ndarray:
    """`pooling_cells` on the host (read-only [H·W] int64): pure grid arithmetic, the same for every frame."""
    h, w = grid_hw
    q = max(1, min(q, h * w))
    bands = max(1, min(h, q, round(math.sqrt(q * h / w))))
    row_edges = [round(i * h / bands) for i in range(bands + 1)]
    heights = [row_edges[i + 1] - row_edges[i] for i in range(bands)]
    per_band = allocate_budget([hh * w for hh in heights], q)
    # a band can hold at most its width of column pieces; shift any excess to the next bands
    per_band = [max(1, c) for c in per_band]
    while sum(per_band) > q:
        per_band[per_band.index(max(per_band))] -= 1
    cell = np.empty((h, w), dtype=np.int64)
    base = 0
    for b in range(bands):
        pieces = min(per_band[b], w * heights[b])
        if pieces <= w:
            col_edges = [round(i * w / pieces) for i in range(pieces + 1)]
            for i in range(pieces):
                cell[row_edges[b]:row_edges[b + 1], col_edges[i]:col_edges[i + 1]] = base + i
        else:  # more pieces than columns (tall bands): split rows of the band too, raster runs
            flat = np.arange(heights[b] * w)
            cell[row_edges[b]:row_edges[b + 1]] = (base + flat * pieces // len(flat)).reshape(heights[b], w)
        base += pieces
    cell = cell.ravel()
    cell.flags.writeable = False
    return cell


@lru_cache(maxsize=256)
def cell_centres(grid_hw: tuple[int, int], q: int) -> np.ndarray:
    """For each grid position, the centre-most position of its pooling cell (nearest to the cell's mean row and
    column, in float32; the earlier position on ties). Returns a read-only [H·W] int64 host array."""
    h, w = grid_hw
    cell = _cells(grid_hw, q)
    count = np.bincount(cell).astype(np.float32)
    rows, cols = np.divmod(np.arange(h * w), w)
    # float32 means and squared distances, as the per-cell torch code computed them
    mean_row = np.bincount(cell, weights=rows).astype(np.float32) / count
    mean_col = np.bincount(cell, weights=cols).astype(np.float32) / count
    dist = (rows.astype(np.float32) - mean_row[cell]) ** 2 + (cols.astype(np.float32) - mean_col[cell]) ** 2
    order = np.lexsort((np.arange(h * w), dist, cell))  # by cell, then distance, then position
    first = np.ones(h * w, dtype=bool)
    first[1:] = cell[order[1:]] != cell[order[:-1]]
    centre = np.empty(int(cell.max()) + 1, dtype=np.int64)
    centre[cell[order[first]]] = order[first]
    out = centre[cell]
    out.flags.writeable = False
    return out


def uniform_reduce(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
                   **_: object) -> VisualTokens:
    """Average-pools each frame's grid into its share of round(retain·T·N) near-square cells; each cell becomes
    one token (the mean) at the cell's centre-most position. Ignores attention and content.

    The cells depend only on the grid and the quota, so the representative map is host arithmetic (cached)
    that reaches the device in one copy.
    """
    t, n = check_inputs(features, attention, retain)
    rep = np.stack([f * n + cell_centres(grid_hw, q) for f, q in enumerate(frame_quotas(retain, t, n))])
    dropped = torch.zeros(t, n, dtype=torch.bool, device=features.device)
    return assemble(features, host_ints(rep, features.device), dropped, grid_hw)


METHOD = Method("uniform", PAPER, (PRE_LLM,), uniform_reduce)
