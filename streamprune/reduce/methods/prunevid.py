"""`prunevid`: PruneVid's merge before the LLM — temporal windows, static tokens averaged over time, clusters.

Paper: Xiaohu Huang, Hao Zhou, Kai Han, "PruneVid: Visual Token Pruning for Efficient Video Large Language
Models", Findings of ACL 2025 (arXiv 2412.16117); code Visual-AI/PruneVid
(`modeling_pllava.py::merge_frames_dynamic`).

Criterion (this module), as in the released code:
1. Temporal segmentation: DPC-KNN over the frame means (cluster_num = int(T·0.25), at least 1, k = 7); every
   frame takes its nearest centre's label; each label keeps only its longest run(s) of consecutive frames (a
   label whose longest run is one frame is dissolved) and the freed runs join the neighbour with the longer
   adjacent run (left on ties); the contiguous runs of equal label are the windows.
2. Static tokens: in a window of w ≥ 2 frames, a position is static when the mean cosine similarity over all
   pairs of distinct frames at that position exceeds τ = 0.8. Its w tokens merge into one (Fate MERGED,
   representative at the window's first frame) whose value is their temporal mean.
3. Spatial merging: DPC-KNN clustering (k = 7) of each window's static tokens and of each frame's dynamic
   tokens; every token joins its nearest centre and a cluster becomes the plain mean of its members.

Where it cuts: before the LLM (this function), then inside the LLM (`prunevid_inner`): at layer 10 the
text→image attention (max over heads and text queries) keeps 0.4 of each window's static tokens and of each
frame's dynamic tokens, slicing the KV cache of the earlier layers. Here the inner cut keeps 0.4 of all visual
tokens by the instruction tokens' attention averaged over heads and queries (the shared `text` criterion), at
layer 10 of 28 scaled to the decoder's depth, and shortens only layers ≥ 10 (earlier layers keep their cache).
So that the method ends at `retain`, the merge before the LLM keeps retain / 0.4 (at most all).

Budget: the reference clusters each part to int(size·0.5) (cluster_ratio) and leaves parts of ≤ 14 tokens
alone, so its count depends on the video. Here the cluster counts come from the budget so the output has
exactly B = round(retain·T·N) tokens: parts of ≤ 14 tokens stay whole while the budget allows, the others
share the rest in proportion to their size (largest remainder). A part whose share is 0 is dropped (Fate
DROPPED). When the temporal merge alone would leave fewer than B tokens, the least static positions (lowest
mean similarity first) are put back as dynamic until it does not.

Adaptations: the reference runs on PLLaVA's pooled CLIP features; here on whichever [T, N, D] tokens the model
gives (LLaVA-OneVision's projected SigLIP tokens, ...). Density ties are broken by seeded noise
(reproducible).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from streamprune.reduce.holitom import allocate_budget, dpc_knn, host_ints
from streamprune.reduce.inner_cuts import InnerConfig, InnerStep, scaled_layer
from streamprune.reduce.methods.base import INNER, PRE_LLM, Method, assemble, check_inputs, video_budget
from streamprune.tokens import VisualTokens

PAPER = ("Huang et al., PruneVid: Visual Token Pruning for Efficient Video Large Language Models, "
         "Findings of ACL 2025 (arXiv 2412.16117)")
DEFAULTS = {"tau": 0.8, "temporal_ratio": 0.25, "knn": 7, "small_part": 14,
            "inner_layer": 10, "inner_keep": 0.4}  # inner_*: the INNER stage's, unused here


def dpc_clusters(x: torch.Tensor, num_centres: int, k: int,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of x [n, D]: (centre row indices [num_centres] ascending, labels [n] in
    0..num_centres−1). Every row takes its nearest centre (Euclidean), a centre its own label."""
    centres, dist = dpc_knn(x, num_centres, k=min(k, x.shape[0]), seed=seed)
    labels = dist[:, centres].argmin(-1)
    labels[centres] = torch.arange(len(centres), device=x.device)
    return centres, labels


def dpc_centre_of(x: torch.Tensor, num_centres: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """`dpc_clusters` of B same-size groups at once (one frame's dynamic tokens each), with its own number of
    centres per group. x: [B, m, D]; num_centres: [B] long in 1..m. Returns [B, m] long: the row of each
    token's centre within its group.

    The same computation as `dpc_knn` per group (same distances, same seeded noise), batched: centres are the
    top num_centres[b] of ρ·δ (ties to the earlier row), taken from one sort of all groups."""
    b, m, d = x.shape
    dist = torch.cdist(x.float(), x.float()) / math.sqrt(d)  # [B, m, m]
    nearest = dist.topk(max(1, min(k, m)), dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    density = density + torch.rand(m, generator=gen, dtype=density.dtype, device=x.device) * 1e-6
    denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: j is denser than i
    separation = torch.where(denser, dist, dist.amax((1, 2), keepdim=True)).min(-1).values
    order = torch.sort(separation * density, dim=-1, descending=True, stable=True).indices
    width = torch.arange(m, device=x.device)
    is_centre = width[None, :] < num_centres[:, None]  # [B, m] by rank
    centres = torch.where(is_centre, order, m).sort(-1).values.clamp(max=m - 1)  # ascending, padding last
    to_centre = dist.gather(2, centres[:, None, :].expand(b, m, m)).masked_fill(~is_centre[:, None, :], float("inf"))
    labels = to_centre.argmin(-1)  # [B, m] rank of the nearest centre
    # a centre takes its own label; padding ranks write into a spare column that is cut off
    slots = torch.where(is_centre, centres, m)
    labels = torch.cat([labels, labels.new_zeros(b, 1)], 1).scatter_(1, slots, width.expand(b, m))[:, :m]
    return centres.gather(1, labels)


def runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values: [(label, start, end inclusive), ...] in order."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append((labels[start], start, i - 1))
            start = i
    return out


def refine_labels(labels: list[int]) -> list[int]:
    """PruneVid's `refine_clusters`: per label keep only its longest run(s) (none if the longest is one
    frame), then give each freed run, left to right, the label of the neighbour whose adjacent run is longer
    (left on ties, label 0 with no neighbour)."""
    refined = list(labels)
    by_label: dict[int, list[tuple[int, int]]] = {}
    for label, s, e in runs(labels):
        by_label.setdefault(label, []).append((s, e))
    for spans in by_label.values():
        longest = max(e - s + 1 for s, e in spans)
        for s, e in spans:
            if longest == 1 or e - s + 1 < longest:
                refined[s : e + 1] = [-1] * (e - s + 1)
    n, i = len(refined), 0
    while i < n:
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < n and refined[i] == -1:
            i += 1
        end = i - 1
        left = right = None
        left_len = right_len = 0
        if start > 0:
            left, j = refined[start - 1], start - 1
            while j >= 0 and refined[j] == left:
                j -= 1
            left_len = start - 1 - j
        if end < n - 1:
            right, j = refined[end + 1], end + 1
            while j < n and refined[j] == right:
                j += 1
            right_len = j - end - 1
        if left_len != right_len:
            label = left if left_len > right_len else right
        else:
            label = left if left is not None else right
        refined[start : end + 1] = [0 if label is None else label] * (end - start + 1)
    return refined


def temporal_windows(features: torch.Tensor, ratio: float = 0.25, k: int = 7,
                     seed: int = 0) -> list[tuple[int, int]]:
    """PruneVid's segmentation: features [T, N, D] → inclusive contiguous frame windows covering 0..T−1."""
    t = features.shape[0]
    if t == 1:
        return [(0, 0)]
    _, labels = dpc_clusters(features.float().mean(1), max(1, int(t * ratio)), k, seed)
    return [(s, e) for _, s, e in runs(refine_labels(labels.tolist()))]


def window_static_score(window: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs of distinct frames, per position. window [w ≥ 2, N, D] → [N]."""
    w = window.shape[0]
    unit = F.normalize(window.float(), dim=-1)
    total = unit.sum(0)  # Σ_t u_t; |Σ u|² = Σ_{s,t} u_s·u_t, the diagonal is Σ |u_t|²
    pair_sum = (total * total).sum(-1) - (unit * unit).sum((0, 2))
    return pair_sum / (w * (w - 1))


def part_quotas(sizes: list[int], budget: int, small_part: int) -> list[int]:
    """Budget per part: parts of ≤ small_part tokens whole when they fit, the rest by size (largest
    remainder)."""
    small = [s <= small_part for s in sizes]
    whole = sum(s for s, is_small in zip(sizes, small, strict=True) if is_small)
    if whole > budget:
        return allocate_budget(sizes, budget)
    large = allocate_budget([s for s, is_small in zip(sizes, small, strict=True) if not is_small],
                            budget - whole)
    shares = iter(large)
    return [s if is_small else next(shares) for s, is_small in zip(sizes, small, strict=True)]


def prunevid(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
             tau: float = DEFAULTS["tau"], temporal_ratio: float = DEFAULTS["temporal_ratio"],
             knn: int = DEFAULTS["knn"], small_part: int = DEFAULTS["small_part"], seed: int = 0,
             **_: object) -> VisualTokens:
    """Splits the video into DPC-KNN windows, averages each window's static positions over time into one
    token, and clusters static and per-frame dynamic tokens by DPC-KNN (cluster mean) down to the budget.

    features: [T, N, D]; attention unused. Returns exactly round(retain·T·N) tokens (module docstring).

    Host round trips: the frame labels (segmentation) and the [W, N] static scores (budget split) come to the
    host once each; the part layout goes back in one copy. Each window's static part is clustered on its own,
    its frames' dynamic parts together (`dpc_centre_of`).
    """
    t, n = check_inputs(features, attention, retain)
    device = features.device
    budget = video_budget(retain, t, n)
    windows = temporal_windows(features, temporal_ratio, knn, seed)

    # static positions per window, then put the least static back until the temporal merge leaves ≥ budget
    no_static = torch.full((n,), float("-inf"), device=device)  # a one-frame window has nothing to merge over time
    scores = torch.stack([window_static_score(features[s : e + 1]) if e > s else no_static
                          for s, e in windows]).cpu()
    static = [score > tau for score in scores]
    after_temporal = t * n - sum((e - s) * int(m.sum()) for (s, e), m in zip(windows, static, strict=True))
    if after_temporal < budget:
        candidates = [(float(scores[w][p]), w, p)
                      for w in range(len(windows)) for p in static[w].nonzero().squeeze(1).tolist()]
        for _score, w, p in sorted(candidates):
            if after_temporal >= budget:
                break
            static[w][p] = False
            after_temporal += windows[w][1] - windows[w][0]

    # parts sharing the budget, in order: per window its static part, then each frame's dynamic part
    counts = [int(mask.sum()) for mask in static]
    sizes: list[int] = []
    for (s, e), count in zip(windows, counts, strict=True):
        sizes += ([count] if count else []) + ([n - count] * (e - s + 1) if count < n else [])
    quotas = iter(part_quotas(sizes, budget, small_part))
    plan = [(next(quotas) if count else 0, [next(quotas) for _ in range(s, e + 1)] if count < n else [])
            for (s, e), count in zip(windows, counts, strict=True)]
    # one copy to the device: per window its static positions then its dynamic ones, then the cluster counts
    order = torch.cat([torch.sort(~m, stable=True).indices for m in static]).numpy()
    clusters = [q for static_quota, frame_quotas in plan for q in [static_quota, *frame_quotas]]
    layout = host_ints(np.concatenate([order, [min(max(q, 1), n) for q in clusters]]), device)
    order, clusters = layout[: len(order)], layout[len(order) :]

    rep = torch.full((t, n), -1, dtype=torch.long, device=device)
    dropped = torch.zeros(t, n, dtype=torch.bool, device=device)
    offset = 0  # into `clusters`
    for w, ((s, e), count, (static_quota, frame_quotas)) in enumerate(zip(windows, counts, plan, strict=True)):
        static_pos, dynamic_pos = order[w * n : w * n + count], order[w * n + count : (w + 1) * n]
        if count and static_quota == 0:
            dropped[s : e + 1, static_pos] = True
        elif count:  # the window's static part: temporal means, clustered
            means = features[s : e + 1, static_pos].float().mean(0)
            centre_of = _cluster(means[None], [static_quota], clusters[offset : offset + 1], knn, seed)[0]
            rep[s : e + 1, static_pos] = s * n + static_pos[centre_of]
        offset += 1
        if frame_quotas:  # each frame's dynamic part, clustered on its own (all frames in one batch)
            values = features[s : e + 1, dynamic_pos].float()
            centre_of = _cluster(values, frame_quotas, clusters[offset : offset + len(frame_quotas)], knn, seed)
            frames = torch.arange(s, e + 1, device=device)[:, None]
            rep[s : e + 1, dynamic_pos] = frames * n + dynamic_pos[centre_of]
            for f, quota in zip(range(s, e + 1), frame_quotas, strict=True):
                if quota == 0:  # a part whose share is 0 is dropped
                    rep[f, dynamic_pos], dropped[f, dynamic_pos] = -1, True
            offset += len(frame_quotas)
    return assemble(features, rep, dropped, grid_hw, segments=windows, after_temporal=after_temporal)


def _cluster(values: torch.Tensor, quotas: list[int], centres: torch.Tensor, knn: int, seed: int) -> torch.Tensor:
    """Each token's cluster centre (row index) for B groups values [B, m, D]: DPC-KNN with quotas[b] centres
    where 0 < quota < m, the token itself otherwise (a part that fits whole; one with quota 0 is dropped by
    the caller). quotas: B host ints; centres: the same on the device, clamped to 1..m."""
    b, m, _ = values.shape
    own = torch.arange(m, device=values.device).expand(b, m)
    clustered = [0 < q < m for q in quotas]
    if not any(clustered):
        return own
    centre_of = dpc_centre_of(values, centres.clamp(max=m), knn, seed)
    if all(clustered):
        return centre_of
    return torch.where(host_ints(clustered, values.device)[:, None].bool(), centre_of, own)


def prunevid_share(retain: float, inner_keep: float = DEFAULTS["inner_keep"], **_: object) -> float:
    """What the merge before the LLM keeps so that the inner cut (keep `inner_keep`) ends at `retain`."""
    return min(1.0, retain / inner_keep)


def prunevid_inner(retain: float, num_layers: int, inner_layer: int = DEFAULTS["inner_layer"],
                   inner_keep: float = DEFAULTS["inner_keep"], **_: object):
    """PruneVid's cut inside the LLM: keep the visual tokens the instruction attends to most at layer 10."""
    keep = retain / prunevid_share(retain, inner_keep)
    return InnerConfig(steps=(InnerStep(scaled_layer(inner_layer, 28, num_layers), 1 - keep, "text", "drop"),))


METHOD = Method("prunevid", PAPER, (PRE_LLM, INNER), prunevid, DEFAULTS, inner=prunevid_inner,
                before_share=prunevid_share)
