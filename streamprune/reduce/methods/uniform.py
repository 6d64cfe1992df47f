"""`uniform`: spatial average pooling of every frame down to the budget — the content-blind baseline.

LLaVA-OneVision's own 2×2 pooling is this at retain 0.25. To hit the budget exactly (not only at 1/4, 1/9,
...) each frame's quota q is split into near-square cells: ⌈√(q·H/W)⌉-ish bands of rows, q spread over
the bands by largest remainder, each band cut into equal-width column pieces.
"""

from __future__ import annotations

import math

import torch

from streamprune.reduce.holitom import allocate_budget
from streamprune.reduce.methods.base import PRE_LLM, Method, assemble, check_inputs, frame_quotas
from streamprune.tokens import VisualTokens

PAPER = "baseline (spatial average pooling, as LLaVA-OneVision's 2×2 video pooling)"


def pooling_cells(grid_hw: tuple[int, int], q: int) -> torch.Tensor:
    """Partition an H×W grid into exactly q near-square rectangles. Returns [H·W] long cell ids 0..q−1
    in raster order of the cells."""
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
    cell = torch.empty(h, w, dtype=torch.long)
    base = 0
    for b in range(bands):
        pieces = min(per_band[b], w * heights[b])
        if pieces <= w:
            col_edges = [round(i * w / pieces) for i in range(pieces + 1)]
            for i in range(pieces):
                cell[row_edges[b]:row_edges[b + 1], col_edges[i]:col_edges[i + 1]] = base + i
        else:  # more pieces than columns (tall bands): split rows of the band too, raster runs
            flat = torch.arange(heights[b] * w)
            cell[row_edges[b]:row_edges[b + 1]] = (base + flat * pieces // len(flat)).view(heights[b], w)
        base += pieces
    return cell.flatten()


def uniform_reduce(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
                   **_: object) -> VisualTokens:
    """Average-pools each frame's grid into its share of round(retain·T·N) near-square cells; each cell becomes
    one token (the mean) at the cell's centre-most position. Ignores attention and content."""
    t, n = check_inputs(features, attention, retain)
    h, w = grid_hw
    rows, cols = torch.arange(n) // w, torch.arange(n) % w
    rep = torch.empty(t, n, dtype=torch.long)
    for f, q in enumerate(frame_quotas(retain, t, n)):
        cell = pooling_cells(grid_hw, q)
        for c in range(int(cell.max()) + 1):
            members = (cell == c).nonzero().squeeze(1)
            # centre-most member: nearest to the cell's mean row/column
            dist = (rows[members] - rows[members].float().mean()) ** 2 + (cols[members] - cols[members].float().mean()) ** 2
            rep[f, members] = f * n + members[dist.argmin()]
    return assemble(features, rep, torch.zeros(t, n, dtype=torch.bool), grid_hw)


METHOD = Method("uniform", PAPER, (PRE_LLM,), uniform_reduce)
