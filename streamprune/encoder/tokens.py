"""Merged tower tokens straight to the LLM as `VisualTokens`, without unmerging to the patch grid first.

The LLM's visual tokens are cells of the grid the connector makes (LLaVA-OneVision: 27×27 patches pooled
bilinearly to 14×14; SmolVLM: 32×32 pixel-shuffled to 8×8). Each cell is read at its centre, so it belongs
to the merged token that owns the patch nearest that centre; a merged token becomes one visual token of
`size` = the cells it owns. Tokens owning no cell (merged regions smaller than a cell) are dropped.
"""

from __future__ import annotations

import torch

from streamprune.reduce.vit import TokenState
from streamprune.tokens import Fate, VisualTokens


def cell_sources(patch_grid: tuple[int, int], cell_grid: tuple[int, int]) -> torch.Tensor:
    """Flat index of the patch nearest each cell's centre (align_corners=False geometry), [cells]."""
    def axis(patches: int, cells: int) -> torch.Tensor:
        centre = (torch.arange(cells) + 0.5) * patches / cells - 0.5
        return centre.round().long().clamp(0, patches - 1)

    rows, cols = axis(patch_grid[0], cell_grid[0]), axis(patch_grid[1], cell_grid[1])
    return (rows[:, None] * patch_grid[1] + cols[None, :]).flatten()


def merged_visual_tokens(state: TokenState, values: torch.Tensor, patch_grid: tuple[int, int],
                         cell_grid: tuple[int, int]) -> VisualTokens:
    """state: merged tokens of T frames (owner [T, N patches]); values [T, L, D] (e.g. projected) → VisualTokens
    over the T × cells grid, frame by frame, tokens in the order of their first cell."""
    cell_owner = state.owner[:, cell_sources(patch_grid, cell_grid)]  # [T, cells]
    t_frames, cells = cell_owner.shape
    features, frame, position, size = [], [], [], []
    origin = torch.empty(t_frames, cells, dtype=torch.long)
    fate = torch.full((t_frames, cells), Fate.MERGED, dtype=torch.uint8)
    count = 0
    for t in range(t_frames):
        used, first = [], {}
        for c, token in enumerate(cell_owner[t].tolist()):
            if token not in first:
                first[token] = len(used)
                used.append(token)
                fate[t, c] = Fate.KEPT
                position.append(c)
            origin[t, c] = count + first[token]
        index = torch.tensor(used)
        features.append(values[t, index])
        size.append(torch.bincount(origin[t] - count, minlength=len(used)))
        frame += [t] * len(used)
        count += len(used)
    return VisualTokens(features=torch.cat(features), frame=torch.tensor(frame), position=torch.tensor(position),
                        size=torch.cat(size), origin=origin, fate=fate, grid_hw=cell_grid,
                        segments=[(t, t) for t in range(t_frames)], after_temporal=count)
