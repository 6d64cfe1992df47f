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
from typing import NamedTuple

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
    return window_gains((similarity > tau).cpu().numpy(), max_window)


def window_gains(ok: np.ndarray, max_window: int = DEFAULT_MAX_WINDOW) -> np.ndarray:
    """`static_gains` on the host mask ok [T-1, N] bool (similarity > τ). Returns gains [T, T] float64."""
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


def host_ints(values, device: torch.device | str) -> torch.Tensor:
    """Small host-side integers (a list or numpy array: quotas, offsets, index maps) as a long tensor on
    `device`, in one copy that does not wait for the device's queue (the staging copy of pageable memory
    happens before the call returns). Never aliases `values`."""
    return torch.from_numpy(np.array(values, dtype=np.int64)).to(device, non_blocking=True)


def dpc_knn(x: torch.Tensor, num_centres: int, k: int = DEFAULT_KNN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering centres (DPC-KNN).

    x: [n, D]. Returns (centre indices [num_centres] sorted ascending, distance matrix [n, n] float32).
    distance = ‖xi − xj‖/√D; density ρ = exp(−mean of the k smallest squared distances) (self included,
    as in the reference); separation δ = distance to the nearest denser token (max distance for the
    densest); centres = top `num_centres` of ρ·δ. The tie-breaking noise comes from a generator on x's
    device (the same noise on every CPU run; a CUDA run draws its own).
    """
    n, d = x.shape
    dist = torch.cdist(x.float(), x.float()) / math.sqrt(d)
    k = max(1, min(k, n))
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    density = density + torch.rand(n, generator=gen, dtype=density.dtype, device=x.device) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    separation = torch.where(denser, dist, dist.max()).min(-1).values
    centres = (separation * density).topk(num_centres).indices.sort().values
    return centres, dist


def merge_into_centres(
    x: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor, beta: float = DEFAULT_BETA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every token to its nearest centre and merge.

    x: [n, D], centres: [c] indices, dist: [n, n].
    Returns (merged [c, D] in x's dtype, assignment [n] in 0..c-1). A centre with members becomes
    β·centre + (1−β)·mean(members); one without keeps its value.
    """
    c = len(centres)
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(c, device=x.device)
    # members add into their centre's row; the centres themselves into a spare row c (masks, no host sync)
    group = assign.index_fill(0, centres, c)
    member_sum = x.new_zeros(c + 1, x.shape[1]).index_add_(0, group, x)[:c]
    member_count = torch.zeros(c + 1, dtype=torch.long, device=x.device).index_add_(
        0, group, torch.ones_like(group))[:c].to(x.dtype)
    centre_values = x[centres]
    merged = beta * centre_values + (1 - beta) * member_sum / member_count.clamp(min=1)[:, None]
    return torch.where(member_count[:, None] > 0, merged, centre_values), assign


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
    HoliTom's order: per segment, its static tokens, then each frame's dynamic tokens (grid order). Features
    keep the input's dtype and device (temporal means and merges are computed in float32); each frame's
    dynamic top-k breaks attention ties towards the earlier position. Dropped tokens are counted against
    the most similar output token of their segment when `size` or `origin` is first read.

    One host round trip per call: the [T-1, N] static mask goes to the CPU for the segmentation DP and the
    budget split; the layout that follows (which part owns which output slots) comes back in one copy.
    """
    t, n, d = features.shape
    if attention.shape != (t, n):
        raise ValueError(f"attention must be [{t}, {n}], got {tuple(attention.shape)}")
    if not 0.0 < retain <= 1.0:
        raise ConfigError(f"retain must be in (0, 1], got {retain}")
    tau = default_tau(retain) if tau is None else tau
    device = features.device
    scores = attention.float()
    if protected is not None:
        protected = protected.to(device)
        scores = scores + protected.float() * (attention.max() + 1)

    similarity = adjacent_similarity(features) if t > 1 else features.new_zeros(0, n, dtype=torch.float32)
    host = similarity > tau
    if protected is not None:
        host = torch.cat([host, protected[None]])
    host = host.cpu().numpy()
    static_ok, unprotected = host[: t - 1], ~host[t - 1] if protected is not None else np.ones(n, dtype=bool)
    segments = segment_by_gains(window_gains(static_ok, max_window), max_window)[0] if t > 1 else [(0, 0)]
    plan = _plan(segments, static_ok, unprotected, t, n, max(1, round(retain * t * n)))

    # dynamic tokens: each frame's quota of its highest-attention non-static positions, in grid order
    layout = host_ints(plan.layout, device)
    static_at = layout[: t * n].view(t, n).bool()  # [T, N] static in the frame's segment
    dyn_quota, dyn_base, frame_segment = layout[t * n : t * n + 3 * t].view(3, t)
    static_pos = layout[t * n + 3 * t :]
    keep = _rowwise_topk(scores.masked_fill(static_at, float("-inf")), dyn_quota)
    origin = torch.where(keep, dyn_base[:, None] + keep.cumsum(1) - 1, -1)
    fate = torch.full((t, n), Fate.DROPPED, dtype=torch.uint8, device=device)
    fate.masked_fill_(keep, Fate.KEPT).masked_fill_(static_at, Fate.MERGED)

    # static tokens: per segment, the temporal mean of each static position, clustered to its quota
    static_values = []  # (first output slot, float32 values) per segment that keeps static tokens
    for (s, e), (start, count, quota, base) in zip(segments, plan.static, strict=True):
        if count == 0:
            continue
        pos = static_pos[start : start + count]
        if quota == 0:
            fate[s : e + 1, pos] = Fate.DROPPED
            continue
        static = features[s : e + 1, pos].float().mean(0)  # [count, D]
        if quota >= count:
            merged, assign = static, torch.arange(count, device=device)
            centres = assign
        else:
            centres, dist = dpc_knn(static, quota, k=min(knn, quota))
            merged, assign = merge_into_centres(static, centres, dist, beta)
        origin[s : e + 1, pos] = base + assign
        fate[s, pos[centres]] = Fate.KEPT
        static_values.append((base, merged))

    # output slot → the original token that sits there (its frame and position)
    m = plan.num_out
    kept = fate.flatten() == Fate.KEPT
    rep = torch.zeros(m + 1, dtype=torch.long, device=device).scatter_(
        0, torch.where(kept, origin.flatten(), m), torch.arange(t * n, device=device))[:m]
    flat = features.reshape(t * n, d)
    out = flat[rep]
    for base, merged in static_values:
        out[base : base + len(merged)] = merged.to(out.dtype)
    attribute = None
    if plan.drops:
        attribute = _attribute_dropped(flat, out, static_values, frame_segment[rep // n], frame_segment, n)
    return VisualTokens(
        features=out,
        frame=rep // n,
        position=rep % n,
        size=None if plan.drops else _count(origin.flatten(), m),
        origin=origin,
        fate=fate,
        grid_hw=grid_hw,
        segments=segments,
        after_temporal=plan.after_temporal,
        attribute=attribute,
    )


class _Plan(NamedTuple):
    """HoliTom's host-side layout: which output slots each part owns, before any token is chosen.

    layout: int64 [T·N + 3·T + P]: static-in-its-segment flags [T·N], then per frame its dynamic quota,
            its first dynamic output slot and its segment [3, T], then every segment's static positions.
    static: per segment (offset of its static positions in the tail of `layout`, count, quota, first slot).
    """

    layout: np.ndarray
    static: list[tuple[int, int, int, int]]
    num_out: int
    drops: bool  # some token is dropped (not merged into an output token)
    after_temporal: int


def _plan(segments: list[tuple[int, int]], static_ok: np.ndarray, unprotected: np.ndarray, t: int, n: int,
          budget: int) -> _Plan:
    """Split the budget over the parts (static part of each segment, dynamic part of each frame) by largest
    remainder and lay out their output slots in HoliTom's order. static_ok: [T-1, N] bool; unprotected: [N]."""
    masks = [static_ok[s:e].all(0) & unprotected if e > s else np.zeros(n, dtype=bool) for s, e in segments]
    sizes: list[int] = []
    for (s, e), mask in zip(segments, masks, strict=True):
        count = int(mask.sum())
        sizes += ([count] if count else []) + ([n - count] * (e - s + 1) if count < n else [])
    quotas = iter(allocate_budget(sizes, budget))
    static_at = np.zeros((t, n), dtype=np.int64)
    per_frame = np.zeros((3, t), dtype=np.int64)  # dynamic quota, first dynamic slot, segment
    static, positions = [], []
    slot, offset, drops = 0, 0, False
    for seg, ((s, e), mask) in enumerate(zip(segments, masks, strict=True)):
        count = int(mask.sum())
        quota = next(quotas) if count else 0
        static.append((offset, count, quota, slot))
        positions.append(np.flatnonzero(mask))
        offset, slot, drops = offset + count, slot + quota, drops or (count > 0 and quota == 0)
        static_at[s : e + 1] = mask
        for f in range(s, e + 1):
            quota = next(quotas) if count < n else 0
            per_frame[:, f] = quota, slot, seg
            slot, drops = slot + quota, drops or quota < n - count
    after = t * n - sum((e - s) * int(m.sum()) for (s, e), m in zip(segments, masks, strict=True))
    layout = np.concatenate([static_at.ravel(), per_frame.ravel(), *positions])
    return _Plan(layout, static, slot, drops, after)


def _rowwise_topk(scores: torch.Tensor, quotas: torch.Tensor) -> torch.Tensor:
    """[T, N] bool: per row the quotas[row] highest scores, ties to the earlier index (one sort for all rows)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank_ok = torch.arange(scores.shape[-1], device=scores.device)[None, :] < quotas[:, None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank_ok)


def _count(origin: torch.Tensor, m: int) -> torch.Tensor:
    """[m] long: how many entries of origin [T·N] point at each output token (no host sync, unlike bincount)."""
    return torch.zeros(m, dtype=torch.long, device=origin.device).index_add_(0, origin, torch.ones_like(origin))


def _attribute_dropped(flat: torch.Tensor, out: torch.Tensor, static_values: list[tuple[int, torch.Tensor]],
                       out_segment: torch.Tensor, frame_segment: torch.Tensor, n: int):
    """The deferred attribution: count each dropped token against the most similar output token of its
    segment (any segment if its own kept none), so `size` sums to T·N. Values are not touched: HoliTom drops
    these tokens. flat: [T·N, D] original tokens; out: [M, D] output tokens (static ones compared at their
    float32 value); out_segment: [M]; frame_segment: [T]."""
    def attribute(origin: torch.Tensor) -> None:
        values = out.float()
        if values is not out:  # rounded outputs (bf16): compare the static tokens at their float32 value
            for base, merged in static_values:
                values[base : base + len(merged)] = merged
        loose = (origin < 0).nonzero().squeeze(1)
        sim = F.normalize(flat[loose].float(), dim=-1) @ F.normalize(values, dim=-1).T  # [n_loose, M]
        same = out_segment[None, :] == frame_segment[loose // n][:, None]
        sim = sim.masked_fill(same.any(1, keepdim=True) & ~same, float("-inf"))
        origin[loose] = sim.argmax(-1)
    return attribute
