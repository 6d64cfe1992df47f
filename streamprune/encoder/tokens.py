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


def cell_sources(patch_grid: tuple[int, int], cell_grid: tuple[int, int],
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Flat index of the patch nearest each cell's centre (align_corners=False geometry), [cells]."""
    def axis(patches: int, cells: int) -> torch.Tensor:
        centre = (torch.arange(cells, device=device) + 0.5) * patches / cells - 0.5
        return centre.round().long().clamp(0, patches - 1)

    rows, cols = axis(patch_grid[0], cell_grid[0]), axis(patch_grid[1], cell_grid[1])
    return (rows[:, None] * patch_grid[1] + cols[None, :]).flatten()


def merged_visual_tokens(state: TokenState, values: torch.Tensor, patch_grid: tuple[int, int],
                         cell_grid: tuple[int, int]) -> VisualTokens:
    """state: merged tokens of T frames (owner [T, N patches]); values [T, L, D] (e.g. projected) → VisualTokens
    over the T × cells grid, frame by frame, tokens in the order of their first cell.

    Vectorised over frames and cells; one host sync (the number of tokens)."""
    device = state.owner.device
    cell_owner = state.owner[:, cell_sources(patch_grid, cell_grid, device)]  # [T, cells]: a token per cell
    t_frames, cells = cell_owner.shape
    cell_index = torch.arange(cells, device=device).expand(t_frames, cells)
    # each merged token's first cell (cells, an out-of-range value, for tokens owning none)
    first = cell_owner.new_full((t_frames, values.shape[1]), cells)
    first.scatter_reduce_(1, cell_owner, cell_index, "amin")
    first_of_owner = first.gather(1, cell_owner)  # [T, cells]
    leads = first_of_owner == cell_index  # the cell a token is read at: its first one
    # output tokens in frame order, then first-cell order: the row-major order of `leads`
    index = leads.flatten().cumsum(0).view(t_frames, cells) - 1  # output index at each leading cell
    frame, position = leads.nonzero(as_tuple=True)  # the call's one sync
    count = frame.shape[0]
    origin = index.gather(1, first_of_owner)
    fate = torch.where(leads, int(Fate.KEPT), int(Fate.MERGED)).to(torch.uint8)
    size = torch.zeros(count, dtype=torch.long, device=device).scatter_add_(
        0, origin.flatten(), torch.ones(t_frames * cells, dtype=torch.long, device=device))
    return VisualTokens(features=values[frame, cell_owner[frame, position]], frame=frame, position=position,
                        size=size, origin=origin, fate=fate, grid_hw=cell_grid,
                        segments=[(t, t) for t in range(t_frames)], after_temporal=count)
