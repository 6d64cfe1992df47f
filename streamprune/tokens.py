"""`VisualTokens`: the one structure that flows from reduction into the LLM adapters.

Shapes use T frames, N tokens per frame (a grid of H×W = N positions), D feature width and M output
tokens. Every original token (t, p) is accounted for by exactly one output token (`origin[t, p]`), so
`size` — how many original tokens an output token stands for — sums to T·N.

Every tensor lives on the features' device. Which kept token a *dropped* token resembles is bookkeeping
that only reports, pictures and proportional attention read, so a method may leave it to `attribute`: it is
computed on first access of `origin` or `size`, never on the way to the LLM otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

import torch

# fills in the -1 entries of a [T·N] origin (dropped tokens not yet counted against an output token)
Attribution = Callable[[torch.Tensor], None]


class Fate(IntEnum):
    """What happened to an original token."""

    KEPT = 0  # it is (the representative of) an output token
    MERGED = 1  # its value was averaged into another output token (temporal or cluster merge)
    DROPPED = 2  # its value is gone; it is counted against the most similar kept token of its segment


class VisualTokens:
    """Reduced visual tokens of one video, in the order they enter the LLM.

    features: [M, D] token values.
    frame:    [M] long, source frame index (a temporally merged token carries its segment's first frame).
    position: [M] long, flat grid position 0..N-1 within the frame (row-major over grid_hw).
    size:     [M] long, number of original tokens represented; sums to T·N (lazy with `attribute`).
    origin:   [T, N] long, index into the M output tokens that accounts for each original token (lazy).
    fate:     [T, N] uint8, a `Fate` per original token.
    grid_hw:  (H, W) of the per-frame token grid, H·W = N.
    segments: inclusive frame ranges the reduction worked on (one per frame when it did no temporal merge).
    after_temporal: tokens left after temporal (static) merging, before spatial compression.
    attribute: optional; fills the −1 entries `origin` still has for dropped tokens (in place, on a flat
              [T·N] view). Then `size` may be None: both are resolved on first access.
    """

    def __init__(self, features: torch.Tensor, frame: torch.Tensor, position: torch.Tensor,
                 size: torch.Tensor | None, origin: torch.Tensor, fate: torch.Tensor, grid_hw: tuple[int, int],
                 segments: list[tuple[int, int]], after_temporal: int, attribute: Attribution | None = None) -> None:
        m = features.shape[0]
        if not (frame.shape == position.shape == (m,)) or (size is not None and size.shape != (m,)):
            raise ValueError(f"frame/position/size must all be [{m}]")
        if origin.shape != fate.shape or origin.dim() != 2:
            raise ValueError("origin and fate must both be [T, N]")
        if size is None and attribute is None:
            raise ValueError("size is needed unless an attribution computes it")
        self.features, self.frame, self.position, self.fate = features, frame, position, fate
        self.grid_hw, self.segments, self.after_temporal = grid_hw, segments, after_temporal
        self._origin, self._size, self._attribute = origin, size, attribute

    def _resolve(self) -> None:
        if self._attribute is not None:
            attribute, self._attribute = self._attribute, None
            origin = self._origin.clone()
            attribute(origin.view(-1))
            self._origin = origin
            self._size = None
        if self._size is None:
            self._size = torch.bincount(self._origin.flatten(), minlength=len(self))

    @property
    def origin(self) -> torch.Tensor:
        self._resolve()
        return self._origin

    @property
    def size(self) -> torch.Tensor:
        self._resolve()
        return self._size

    @property
    def attributed(self) -> bool:
        """Whether every dropped token has been counted against an output token (origin/size computed)."""
        return self._attribute is None

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def num_frames(self) -> int:
        return self._origin.shape[0]

    @property
    def tokens_per_frame(self) -> int:
        return self._origin.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0]

    def __repr__(self) -> str:
        return (f"VisualTokens(M={len(self)}, T={self.num_frames}, N={self.tokens_per_frame}, "
                f"D={self.features.shape[-1]}, {self.features.dtype}, {self.device})")

    def carry(self, values: torch.Tensor) -> torch.Tensor:
        """Other per-token values [T, N, C] (e.g. Qwen3-VL's DeepStack features) reduced along with the
        tokens: each output token gets the mean over the originals it accounts for, dropped ones excluded
        (exact when nothing was reduced). Returns [M, C] in `values`' dtype and device."""
        flat = values.reshape(-1, values.shape[-1]).float()
        used = self.fate.flatten() != Fate.DROPPED
        origin = self._origin.flatten()[used]  # merged and kept tokens never wait for an attribution
        total = torch.zeros(len(self), flat.shape[1], device=flat.device).index_add_(0, origin, flat[used])
        count = torch.bincount(origin, minlength=len(self)).clamp(min=1)
        return (total / count[:, None]).to(values.dtype)

    @classmethod
    def unreduced(cls, features: torch.Tensor, grid_hw: tuple[int, int]) -> VisualTokens:
        """All T·N tokens of `features` [T, N, D], frame by frame in raster order."""
        t, n, _ = features.shape
        idx = torch.arange(t * n, device=features.device)
        return cls(
            features=features.reshape(t * n, -1),
            frame=idx // n,
            position=idx % n,
            size=torch.ones(t * n, dtype=torch.long, device=features.device),
            origin=idx.view(t, n),
            fate=torch.full((t, n), Fate.KEPT, dtype=torch.uint8, device=features.device),
            grid_hw=grid_hw,
            segments=[(i, i) for i in range(t)],
            after_temporal=t * n,
        )
