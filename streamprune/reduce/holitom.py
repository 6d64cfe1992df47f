"""HoliTom outer-LLM reduction (Shao et al., NeurIPS'25): temporal segmentation, static-token merging,
density-peak clustering of static tokens and attention top-k of dynamic tokens.

Shapes: T frames, N tokens per frame (grid H×W), D feature width, M output tokens.
Defaults follow the authors' released code and scripts: τ = 0.8 (0.65 at retain ≤ 0.1), β = 0.6,
kNN k = 7, unbounded windows (1024), and dynamic tokens by pure attention top-k (their D = 0).

Two deliberate departures, both about bookkeeping rather than the algorithm:
- the budget is split over the parts (static part of each segment, dynamic part of each frame) by
  largest remainder, so the output has exactly round(retain·T·N) tokens; the reference rounds each part
  separately (ceil per frame), which overshoots by up to one token per frame;
- density ties are broken by seeded noise, so a run is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError
from streamprune.tokens import Fate, VisualTokens

DEFAULT_BETA = 0.6
DEFAULT_KNN = 7
DEFAULT_MAX_WINDOW = 1024


def default_tau(retain: float) -> float:
    """τ as the authors run it: 0.65 at retain ≤ 0.1, else 0.8."""
    return 0.65 if retain <= 0.1 else 0.8


def adjacent_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each position with the same position in the next frame.

    features: [T, N, D] -> [T-1, N]
    """
    x = features.float()
    norms = x.norm(dim=-1).clamp_min(1e-12)
    # batched dot products: no [T-1, N, D] temporaries
    return torch.einsum("tnd,tnd->tn", x[:-1], x[1:]) / (norms[:-1] * norms[1:])


def static_gains(similarity: torch.Tensor, tau: float, max_window: int = DEFAULT_MAX_WINDOW) -> np.ndarray:
    """Tokens merged away by collapsing window [s, e] to one token per static position.

    similarity: [T-1, N] adjacent-frame cosine similarity.
    Returns gains [T, T] float64 with gains[s, e] = (e - s)·|{p : sim[k, p] > τ for all k in s..e-1}|
    for s < e < s + max_window, else 0.
    """
    ok = (similarity > tau).cpu().numpy()  # [T-1, N]
    t = ok.shape[0] + 1
    gains = np.zeros((t, t), dtype=np.float64)
    longest = min(max_window - 1, t - 1)
    if longest < 1:
        return gains
    # run[s, p]: how many consecutive transitions from s on are static at p
    run = np.zeros((t, ok.shape[1]), dtype=np.int32)
    for s in range(t - 2, -1, -1):
        run[s] = np.where(ok[s], run[s + 1] + 1, 0)
    lengths = np.arange(1, longest + 1)
    counts = (run[:, :, None] >= lengths).sum(1)  # [T, longest]: static positions of window [s, s+L]
    starts = np.arange(t)[:, None]
    ends = starts + lengths[None, :]
    valid = ends < t
    gains[np.broadcast_to(starts, ends.shape)[valid], ends[valid]] = (lengths * counts)[valid]
    return gains


def segment_by_gains(gains: np.ndarray, max_window: int = DEFAULT_MAX_WINDOW) -> tuple[list[tuple[int, int]], float]:
    """Partition frames into contiguous segments maximising total merged-away tokens.

    dp[i] = max(dp[i-1], max_w dp[i-w] + gains[i-w+1, i]), w = 2..min(i+1, max_window), dp[-1] = 0.
    Ties go to the singleton, then to the shortest window (as the reference code does).
    Returns (inclusive segments in order, total merged-away tokens).
    """
    t = gains.shape[0]
    best = np.zeros(t + 1)  # best[i + 1] = dp[i]; best[0] = dp[-1] = 0
    start = np.zeros(t, dtype=np.int64)
    for i in range(t):
        best[i + 1], start[i] = best[i], i
        widths = np.arange(2, min(i + 1, max_window) + 1)
        if len(widths):
            first = i - widths + 1  # segment start for each width
            values = best[first] + gains[first, i]
            w = int(np.argmax(values))
            if values[w] > best[i + 1]:
                best[i + 1], start[i] = values[w], first[w]
    segments = []
    i = t - 1
    while i >= 0:
        segments.append((int(start[i]), i))
        i = int(start[i]) - 1
    return segments[::-1], float(best[t])


def temporal_segments(
    features: torch.Tensor, tau: float = 0.8, max_window: int = DEFAULT_MAX_WINDOW
) -> list[tuple[int, int]]:
    """HoliTom's global redundancy-aware temporal segmentation.

    features: [T, N, D]. Returns inclusive frame ranges covering all T frames in order.
    """
    if features.dim() != 3 or features.shape[0] == 0:
        raise ValueError(f"features must be [T, N, D] with T >= 1, got {tuple(features.shape)}")
    if features.shape[0] == 1:
        return [(0, 0)]
    gains = static_gains(adjacent_similarity(features), tau, max_window)
    return segment_by_gains(gains, max_window)[0]


def allocate_budget(part_sizes: list[int], budget: int) -> list[int]:
    """Split `budget` over parts in proportion to their sizes (largest remainder), each at most its size."""
    total = sum(part_sizes)
    if budget >= total:
        return list(part_sizes)
    exact = np.array(part_sizes, dtype=np.float64) * (budget / total)
    quota = np.floor(exact).astype(np.int64)
    # stable order: larger fractional part first, earlier part on ties
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: budget - int(quota.sum())]] += 1
    return quota.tolist()


def dpc_knn(x: torch.Tensor, num_centres: int, k: int = DEFAULT_KNN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering centres (DPC-KNN).

    x: [n, D]. Returns (centre indices [num_centres] sorted ascending, distance matrix [n, n]).
    distance = ‖xi − xj‖/√D; density ρ = exp(−mean of the k smallest squared distances) (self included,
    as in the reference); separation δ = distance to the nearest denser token (max distance for the
    densest); centres = top `num_centres` of ρ·δ.
    """
    n, d = x.shape
    dist = torch.cdist(x.float(), x.float()) / math.sqrt(d)
    k = max(1, min(k, n))
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    gen = torch.Generator().manual_seed(seed)
    density = density + torch.rand(n, generator=gen, dtype=density.dtype) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    separation = torch.where(denser, dist, dist.max()).min(-1).values
    centres = (separation * density).topk(num_centres).indices.sort().values
    return centres, dist


def merge_into_centres(
    x: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor, beta: float = DEFAULT_BETA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every token to its nearest centre and merge.

    x: [n, D], centres: [c] indices, dist: [n, n].
    Returns (merged [c, D], assignment [n] in 0..c-1). A centre with members becomes
    β·centre + (1−β)·mean(members); one without keeps its value.
    """
    n = x.shape[0]
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(len(centres))
    is_member = torch.ones(n, dtype=torch.bool)
    is_member[centres] = False
    c = len(centres)
    member_sum = torch.zeros(c, x.shape[1], dtype=x.dtype).index_add_(0, assign[is_member], x[is_member])
    member_count = torch.bincount(assign[is_member], minlength=c).to(x.dtype)
    merged = x[centres].clone()
    has = member_count > 0
    merged[has] = beta * x[centres][has] + (1 - beta) * member_sum[has] / member_count[has, None]
    return merged, assign


def holitom_reduce(
    features: torch.Tensor,
    attention: torch.Tensor,
    grid_hw: tuple[int, int],
    retain: float,
    tau: float | None = None,
    beta: float = DEFAULT_BETA,
    knn: int = DEFAULT_KNN,
    max_window: int = DEFAULT_MAX_WINDOW,
    protected: torch.Tensor | None = None,
) -> VisualTokens:
    """Segments the video where its static content changes, averages each segment's static tokens over time and
    clusters them by density peaks, and keeps each frame's dynamic tokens by attention (HoliTom's outer-LLM
    stages I and II).

    features:  [T, N, D] projected (and pooled) visual tokens.
    attention: [T, N] attention each patch received in the vision tower's last used layer.
    protected: optional [N] bool grid positions that are never merged across time and come first in
               every frame's top-k (the streaming engine protects what questions looked at).
    Returns VisualTokens with min(round(retain·T·N), tokens left after temporal merge) tokens, in
    HoliTom's order: per segment, its static tokens, then each frame's dynamic tokens (grid order).
    """
    t, n, _ = features.shape
    if attention.shape != (t, n):
        raise ValueError(f"attention must be [{t}, {n}], got {tuple(attention.shape)}")
    if not 0.0 < retain <= 1.0:
        raise ConfigError(f"retain must be in (0, 1], got {retain}")
    tau = default_tau(retain) if tau is None else tau
    features = features.float()
    if protected is not None:
        attention = attention.float() + protected.float() * (attention.max() + 1)

    similarity = adjacent_similarity(features) if t > 1 else features.new_zeros(0, n)
    segments = segment_by_gains(static_gains(similarity, tau, max_window), max_window)[0] if t > 1 else [(0, 0)]

    # Stage I result: per segment a static mask [N]; static tokens are temporal means.
    static_masks = []
    for s, e in segments:
        mask = (similarity[s:e] > tau).all(0) if e > s else torch.zeros(n, dtype=torch.bool)
        static_masks.append(mask if protected is None else mask & ~protected)

    # Parts that share the budget: (segment, frame or None for static, positions)
    parts: list[tuple[int, int | None, torch.Tensor]] = []
    for seg, ((s, e), mask) in enumerate(zip(segments, static_masks, strict=True)):
        if mask.any():
            parts.append((seg, None, mask.nonzero().squeeze(1)))
        dynamic_pos = (~mask).nonzero().squeeze(1)
        for f in range(s, e + 1):
            if len(dynamic_pos):
                parts.append((seg, f, dynamic_pos))
    budget = max(1, round(retain * t * n))
    quotas = allocate_budget([len(p[2]) for p in parts], budget)

    out_feat, out_frame, out_pos = [], [], []
    origin = torch.full((t, n), -1, dtype=torch.long)
    fate = torch.full((t, n), Fate.MERGED, dtype=torch.uint8)
    out_segment = []  # segment of each output token, for attributing dropped tokens
    for (seg, f, pos), quota in zip(parts, quotas, strict=True):
        s, e = segments[seg]
        base = sum(len(x) for x in out_feat)
        if f is None:  # static part: temporal mean, then DPC-KNN clustering
            static = features[s : e + 1, pos].mean(0)  # [n_static, D]
            if quota >= len(pos):
                merged, assign, centres = static, torch.arange(len(pos)), torch.arange(len(pos))
            elif quota > 0:
                centres, dist = dpc_knn(static, quota, k=min(knn, quota))
                merged, assign = merge_into_centres(static, centres, dist, beta)
            else:
                fate[s : e + 1, pos] = Fate.DROPPED
                continue
            origin[s : e + 1, pos] = base + assign
            fate[s, pos[centres]] = Fate.KEPT
            out_feat.append(merged)
            out_frame.append(torch.full((len(merged),), s))
            out_pos.append(pos[centres])
        else:  # dynamic part of frame f: attention top-k, kept in grid order
            keep = attention[f, pos].topk(quota).indices.sort().values
            dropped = torch.ones(len(pos), dtype=torch.bool)
            dropped[keep] = False
            fate[f, pos[dropped]] = Fate.DROPPED
            fate[f, pos[keep]] = Fate.KEPT
            origin[f, pos[keep]] = base + torch.arange(len(keep))
            out_feat.append(features[f, pos[keep]])
            out_frame.append(torch.full((len(keep),), f))
            out_pos.append(pos[keep])
        out_segment.append(torch.full((len(out_pos[-1]),), seg))

    out = torch.cat(out_feat)
    out_segment_t = torch.cat(out_segment)
    _attribute_dropped(features, out, out_segment_t, segments, origin)
    return VisualTokens(
        features=out,
        frame=torch.cat(out_frame),
        position=torch.cat(out_pos),
        size=torch.bincount(origin.flatten(), minlength=len(out)),
        origin=origin,
        fate=fate,
        grid_hw=grid_hw,
        segments=segments,
        after_temporal=t * n - sum((e - s) * int(m.sum()) for (s, e), m in zip(segments, static_masks, strict=True)),
    )


def _attribute_dropped(
    features: torch.Tensor,
    out: torch.Tensor,
    out_segment: torch.Tensor,
    segments: list[tuple[int, int]],
    origin: torch.Tensor,
) -> None:
    """Count each dropped token against the most similar output token of its segment (any segment if
    its own kept none), so `size` sums to T·N. Values are not touched: HoliTom drops these tokens."""
    out_unit = F.normalize(out, dim=-1)
    for seg, (s, e) in enumerate(segments):
        frames, pos = (origin[s : e + 1] < 0).nonzero(as_tuple=True)
        if len(frames) == 0:
            continue
        candidates = (out_segment == seg).nonzero().squeeze(1)
        if len(candidates) == 0:
            candidates = torch.arange(len(out))
        sim = F.normalize(features[s + frames, pos], dim=-1) @ out_unit[candidates].T
        origin[s + frames, pos] = candidates[sim.argmax(-1)]
