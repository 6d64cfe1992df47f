"""`VisualTokens`: the one structure that flows from reduction into the LLM adapters.

Shapes use T frames, N tokens per frame (a grid of H×W = N positions), D feature width and M output
tokens. Every original token (t, p) is accounted for by exactly one output token (`origin[t, p]`), so
`size` — how many originals an output token stands for — sums to T·N.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch


class Fate(IntEnum):
    """What happened to an original token."""

    KEPT = 0  # it is (the representative of) an output token
    MERGED = 1  # its value was averaged into another output token (temporal or cluster merge)
    DROPPED = 2  # its value is gone; it is counted against the most similar kept token of its segment


@dataclass
class VisualTokens:
    """Reduced visual tokens of one video, in the order they enter the LLM.

    features: [M, D] token values.
    frame:    [M] long, source frame index (a temporally merged token carries its segment's first frame).
    position: [M] long, flat grid position 0..N-1 within the frame (row-major over grid_hw).
    size:     [M] long, number of original tokens represented; sums to T·N.
    origin:   [T, N] long, index into the M output tokens that accounts for each original token.
    fate:     [T, N] uint8, a `Fate` per original token.
    grid_hw:  (H, W) of the per-frame token grid, H·W = N.
    segments: inclusive frame ranges the reduction worked on (one per frame when it did no temporal merge).
    after_temporal: tokens left after temporal (static) merging, before spatial compression.
    """

    features: torch.Tensor
    frame: torch.Tensor
    position: torch.Tensor
    size: torch.Tensor
    origin: torch.Tensor
    fate: torch.Tensor
    grid_hw: tuple[int, int]
    segments: list[tuple[int, int]]
    after_temporal: int

    def __post_init__(self) -> None:
        m = self.features.shape[0]
        if not (self.frame.shape == self.position.shape == self.size.shape == (m,)):
            raise ValueError(f"frame/position/size must all be [{m}]")
        if self.origin.shape != self.fate.shape or self.origin.dim() != 2:
            raise ValueError("origin and fate must both be [T, N]")

    @property
    def num_frames(self) -> int:
        return self.origin.shape[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.origin.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0]

    def carry(self, values: torch.Tensor) -> torch.Tensor:
        """Other per-token values [T, N, C] (e.g. Qwen3-VL's DeepStack features) reduced along with the
        tokens: each output token gets the mean over the originals it accounts for, dropped ones excluded
        (exact when nothing was reduced). Returns [M, C]."""
        flat = values.reshape(-1, values.shape[-1]).float()
        used = self.fate.flatten() != Fate.DROPPED
        origin = self.origin.flatten()[used]
        total = torch.zeros(len(self), flat.shape[1]).index_add_(0, origin, flat[used])
        count = torch.bincount(origin, minlength=len(self)).clamp(min=1)
        return (total / count[:, None]).to(values.dtype)

    @classmethod
    def unreduced(cls, features: torch.Tensor, grid_hw: tuple[int, int]) -> VisualTokens:
        """All T·N tokens of `features` [T, N, D], frame by frame in raster order."""
        t, n, _ = features.shape
        idx = torch.arange(t * n)
        return cls(
            features=features.reshape(t * n, -1),
            frame=idx // n,
            position=idx % n,
            size=torch.ones(t * n, dtype=torch.long),
            origin=idx.view(t, n),
            fate=torch.full((t, n), Fate.KEPT, dtype=torch.uint8),
            grid_hw=grid_hw,
            segments=[(i, i) for i in range(t)],
            after_temporal=t * n,
        )
