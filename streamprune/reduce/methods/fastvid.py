"""`fastvid`: FastVID's dynamic density pruning — segments (DySeg), salient + density context tokens
(STPrune), and anchor-frame merging within segments (DTM).

Paper: Leqi Shen, Guoqiang Gong, Tao He, Yifeng Zhang, Pengzhang Liu, Sicheng Zhao, Guiguang Ding, "FastVID:
Dynamic Density Pruning for Fast Video Large Language Models", NeurIPS 2025 (arXiv 2503.11187); code
LunarShen/FastVID (`fastvid_llavaonevision/.../modeling_qwen2.py`).

Criterion, following the released code:
- DySeg: cosine similarity of adjacent frames' global features; cut after the c−1 least similar transitions
  (c = 8) and after every transition below τ = 0.9. The pieces are the segments.
- STPrune, per frame with quota q: q − int(q·d) salient tokens (d = 0.4) by attention, kept as they are; the
  rest of the frame is "filtered" and scored by DPC density (k = 4 nearest, self included): ρ = exp(−mean d²)
  with d = ‖xi − xj‖/√D, δ = distance to the nearest denser token, score ρ·δ.
- DTM: in a segment, anchor frames are its last frame and every p = 4th frame before it; they share the
  segment's whole context budget Σ int(q·d). Each anchor frame takes its top-scored filtered tokens as
  anchors; every filtered token of the segment joins the cosine-most-similar anchor of that frame, and an
  anchor becomes w·anchor + (1−w)·mean(joined), w = max(1/(n+1), β), β = 0.6, n tokens joined (the anchor
  joins itself, so w = β in practice). As in the code, each anchor frame merges the whole segment
  independently, so a filtered token feeds one anchor per anchor frame; for `size`/`origin` it is counted
  against the most similar anchor of all (Fate MERGED). A single-frame segment is its own anchor frame: it
  merges its own filtered tokens.

Where it cuts: on the LLM input embeddings right before the decoder layers, i.e. before the LLM; kept tokens
keep their original positions.

Budget: the code keeps int(N·r) per frame and gives each anchor seg_context // anchors, so it falls a little
short of r. Here the per-frame quotas are the video budget B = round(retain·T·N) split by largest remainder
and a segment's context is split over its anchors by largest remainder, so the output has exactly B tokens.
When the anchor frames cannot hold the segment's context (only above retain ≈ 0.38 with p = 4, d = 0.4, where
the code fails), the surplus becomes extra salient tokens of the segment's other frames.

Adaptations: FastVID takes the global feature and the patch attention from a second copy of SigLIP's MAP
pooling head. Here the global feature is the mean of the frame's tokens and the attention is the mean
attention each token received in the vision tower's last used layer. Density ties are broken by seeded noise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from streamprune.reduce.holitom import allocate_budget, host_ints
from streamprune.reduce.methods.base import PRE_LLM, Method, assemble, check_inputs, frame_quotas, quota_topk
from streamprune.tokens import VisualTokens

PAPER = ("Shen et al., FastVID: Dynamic Density Pruning for Fast Video Large Language Models, NeurIPS 2025 "
         "(arXiv 2503.11187)")
DEFAULTS = {"min_segments": 8, "tau": 0.9, "context_share": 0.4, "knn": 4, "anchor_stride": 4, "beta": 0.6}


def dynamic_segments(global_features: torch.Tensor, min_segments: int = 8,
                     tau: float = 0.9) -> list[tuple[int, int]]:
    """DySeg: global_features [T, D] → inclusive segments. Cuts after the min_segments−1 least similar
    adjacent transitions (ties to the earlier) and after every transition with cosine similarity < tau.
    The T−1 similarities come to the host once; the cuts are host bookkeeping."""
    t = global_features.shape[0]
    if t == 1:
        return [(0, 0)]
    unit = F.normalize(global_features.float(), dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(-1).cpu()  # [T-1]: frame i vs frame i+1
    lowest = torch.sort(similarity, stable=True).indices[: max(0, min(min_segments - 1, t - 1))]
    cuts = sorted(set(lowest.tolist()) | set((similarity < tau).nonzero().squeeze(1).tolist()))
    starts = [0] + [c + 1 for c in cuts]
    ends = [*cuts, t - 1]
    return list(zip(starts, ends, strict=True))


def anchor_frames(start: int, end: int, stride: int = 4) -> list[int]:
    """The segment's last frame and every `stride`-th frame before it, ascending."""
    return list(range(end, start - 1, -stride))[::-1]


def density_scores(x: torch.Tensor, k: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """DPC score ρ·δ per row of x [m, D] → [m] float32 (ρ from the k nearest incl. self, δ to the nearest denser
    row). The tie-breaking noise is drawn on x's device (`generator` must live there too)."""
    m, d = x.shape
    dist = torch.cdist(x.float(), x.float()) / math.sqrt(d)
    nearest = dist.topk(min(k, m), dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp() + torch.rand(m, generator=generator, device=x.device) * 1e-6
    denser = density[None, :] > density[:, None]
    separation = torch.where(denser, dist, dist.max()).min(-1).values
    return separation * density


def merge_into_anchors(anchors: torch.Tensor, pool: torch.Tensor, beta: float = 0.6) -> torch.Tensor:
    """DTM merge: each row of pool [m, D] joins its cosine-most-similar anchor [c, D]; an anchor with n joined
    becomes w·anchor + (1−w)·mean(joined), w = max(1/(n+1), β) (unchanged when n = 0). Returns [c, D]."""
    assign = (F.normalize(pool, dim=-1) @ F.normalize(anchors, dim=-1).T).argmax(-1)
    count = torch.zeros(len(anchors), dtype=torch.long, device=pool.device).index_add_(
        0, assign, torch.ones_like(assign)).to(pool.dtype)
    joined = torch.zeros_like(anchors).index_add_(0, assign, pool) / count.clamp(min=1)[:, None]
    weight = (1 / (count + 1)).clamp(min=beta)[:, None]
    return weight * anchors + (1 - weight) * joined


class _Segment(NamedTuple):
    """One DySeg segment's share of the work, all host ints: its filtered tokens are entries
    [start, start + count) of the non-salient order; each anchor frame (offset of its own filtered tokens in
    that order, their count, its context share)."""

    start: int
    count: int
    anchors: list[tuple[int, int, int]]


def _plan(segments: list[tuple[int, int]], quotas: list[int], n: int, context_share: float,
          anchor_stride: int) -> tuple[list[int], list[_Segment]]:
    """Salient count per frame (after moving any context surplus of full anchor frames onto the segment's other
    frames) and every segment's layout of filtered tokens and anchor shares."""
    salient_count = [q - int(q * context_share) for q in quotas]
    layout = []
    for s, e in segments:
        frames = list(range(s, e + 1))
        anchors = anchor_frames(s, e, anchor_stride)
        context = sum(quotas[f] - salient_count[f] for f in frames)
        capacity = sum(n - salient_count[f] for f in anchors)
        if context > capacity:  # anchors are full: the surplus becomes salient tokens of the other frames
            others = [f for f in frames if f not in anchors]
            extras = allocate_budget([n - salient_count[f] for f in others], context - capacity)
            for f, extra in zip(others, extras, strict=True):
                salient_count[f] += extra
            context = capacity
        shares = allocate_budget([n - salient_count[f] for f in anchors], context)
        layout.append((s, e, anchors, shares))
    offsets = np.concatenate([[0], np.cumsum([n - c for c in salient_count])]).tolist()
    plan = [_Segment(offsets[s], offsets[e + 1] - offsets[s],
                     [(offsets[f], offsets[f + 1] - offsets[f], share)
                      for f, share in zip(anchors, shares, strict=True)])
            for s, e, anchors, shares in layout]
    return salient_count, plan


def fastvid(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], retain: float,
            min_segments: int = DEFAULTS["min_segments"], tau: float = DEFAULTS["tau"],
            context_share: float = DEFAULTS["context_share"], knn: int = DEFAULTS["knn"],
            anchor_stride: int = DEFAULTS["anchor_stride"], beta: float = DEFAULTS["beta"], seed: int = 0,
            **_: object) -> VisualTokens:
    """Cuts the video where adjacent frames differ (DySeg), keeps each frame's top-attention tokens, and
    spends the context share of each segment on density-peak tokens of its anchor frames that absorb the
    segment's remaining tokens (DTM).

    features: [T, N, D]; attention: [T, N] attention each token received. Returns exactly round(retain·T·N)
    tokens.

    The salient tokens of all frames come from one top-k (ties to the earlier position); the filtered tokens of
    every frame, in raster order, from one stable sort, so each segment and anchor frame reads a slice whose
    size the host knows. Only the density peaks and merges loop, over anchor frames, without host syncs.
    """
    t, n = check_inputs(features, attention, retain)
    if attention is None:
        raise ValueError("fastvid needs the attention each token received")
    device = features.device
    flat = features.reshape(t * n, -1)
    gen = torch.Generator(device=device).manual_seed(seed)
    segments = dynamic_segments(features.float().mean(1), min_segments, tau)
    salient_count, plan = _plan(segments, frame_quotas(retain, t, n), n, context_share, anchor_stride)
    salient = quota_topk(attention, host_ints(salient_count, device))
    filtered_order = torch.sort(salient.flatten().to(torch.uint8), stable=True).indices  # filtered, then salient

    rep = torch.arange(t * n, device=device)
    dropped = torch.zeros(t * n, dtype=torch.bool, device=device)
    merges = []  # (anchor tokens, their DTM values)
    for segment in plan:
        filtered = filtered_order[segment.start : segment.start + segment.count]  # flat indices
        pool = flat[filtered].float()
        chosen = []
        for start, count, share in segment.anchors:
            if share == 0:
                continue
            candidates = filtered_order[start : start + count]
            top = torch.sort(density_scores(flat[candidates], knn, gen), descending=True, stable=True).indices
            picked = candidates[top[:share].sort().values]  # raster order
            merges.append((picked, merge_into_anchors(flat[picked].float(), pool, beta)))
            chosen.append(picked)
        if not chosen:  # no context budget in this segment: the filtered tokens are pruned
            rep[filtered], dropped[filtered] = -1, True
            continue
        chosen_t = torch.cat(chosen)
        similarity = F.normalize(pool, dim=-1) @ F.normalize(flat[chosen_t].float(), dim=-1).T
        rep[filtered] = chosen_t[similarity.argmax(-1)]
        rep[chosen_t] = chosen_t
    is_rep = (rep == torch.arange(t * n, device=device)) & ~dropped
    slot = is_rep.cumsum(0) - 1
    values = flat[is_rep]  # representatives in output order (one host sync)
    if merges:
        picked, merged = (torch.cat(parts) for parts in zip(*merges, strict=True))
        values[slot[picked]] = merged.to(values.dtype)
    return assemble(features, rep.view(t, n), dropped.view(t, n), grid_hw, values=values, segments=segments)


METHOD = Method("fastvid", PAPER, (PRE_LLM,), fastvid, DEFAULTS)
