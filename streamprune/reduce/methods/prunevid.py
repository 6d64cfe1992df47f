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

import torch
import torch.nn.functional as F

from streamprune.reduce.holitom import allocate_budget, dpc_knn
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
    labels[centres] = torch.arange(len(centres))
    return centres, labels


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
    """
    t, n = check_inputs(features, attention, retain)
    budget = video_budget(retain, t, n)
    x = features.float()
    windows = temporal_windows(x, temporal_ratio, knn, seed)

    # static positions per window, then put the least static back until the temporal merge leaves ≥ budget
    no_static = torch.full((n,), float("-inf"))  # a one-frame window has nothing to merge over time
    scores = [window_static_score(x[s : e + 1]) if e > s else no_static for s, e in windows]
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

    # parts sharing the budget: (first frame, frames covered, positions, values [size, D])
    parts: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    for (s, e), mask in zip(windows, static, strict=True):
        if mask.any():
            pos = mask.nonzero().squeeze(1)
            parts.append((s, e - s + 1, pos, x[s : e + 1, pos].mean(0)))
        dynamic = (~mask).nonzero().squeeze(1)
        if len(dynamic):
            parts.extend((f, 1, dynamic, x[f, dynamic]) for f in range(s, e + 1))

    rep = torch.full((t, n), -1, dtype=torch.long)
    dropped = torch.zeros(t, n, dtype=torch.bool)
    quotas = part_quotas([len(p[2]) for p in parts], budget, small_part)
    for (first, frames, pos, values), quota in zip(parts, quotas, strict=True):
        if quota == 0:
            dropped[first : first + frames, pos] = True
            continue
        if quota >= len(pos):
            centre_of = torch.arange(len(pos))
        else:
            centres, labels = dpc_clusters(values, quota, knn, seed)
            centre_of = centres[labels]
        # every token of the part points at its cluster centre's token in the part's first frame
        rep[first : first + frames, pos] = first * n + pos[centre_of]
    return assemble(features, rep, dropped, grid_hw, segments=windows, after_temporal=after_temporal)


def prunevid_share(retain: float, inner_keep: float = DEFAULTS["inner_keep"], **_: object) -> float:
    """What the merge before the LLM keeps so that the inner cut (keep `inner_keep`) ends at `retain`."""
    return min(1.0, retain / inner_keep)


def prunevid_inner(retain: float, num_layers: int, inner_layer: int = DEFAULTS["inner_layer"],
                   inner_keep: float = DEFAULTS["inner_keep"], **_: object):
    """PruneVid's cut inside the LLM: keep the visual tokens the instruction attends to most at layer 10."""
    from streamprune.models.inner_stage import InnerConfig, InnerStep, scaled_layer

    keep = retain / prunevid_share(retain, inner_keep)
    return InnerConfig(steps=(InnerStep(scaled_layer(inner_layer, 28, num_layers), 1 - keep, "text", "drop"),))


METHOD = Method("prunevid", PAPER, (PRE_LLM, INNER), prunevid, DEFAULTS, inner=prunevid_inner,
                before_share=prunevid_share)
