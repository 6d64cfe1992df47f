"""`divprune`: keep the most diverse subset of visual tokens (greedy max–min on cosine distance).

Paper: Saeed Ranjbar Alvar, Gursimran Singh, Mohammad Akbari, Yong Zhang, "DivPrune: Diversity-based Visual
Token Pruning for Large Multimodal Models", CVPR 2025 (arXiv 2503.02175). Code: vbdi/divprune.

Criterion: subset selection as a max–min diversity problem on the projected visual tokens, solved greedily
with distance d(i, j) = 1 − cos(x_i, x_j). The first token is the one whose *nearest* other token is
farthest (the reference takes, per token, the second-smallest distance — its own 0 being the smallest — and
the argmax of that); each next token maximises its minimum distance to the tokens already chosen. The kept
tokens stay in their original order; the rest are dropped.

Cuts: before the LLM (pre-llm), on the projector output, pure pruning.
Defaults: none besides the budget (the paper's runs use SUBSET_RATIO = 0.098, i.e. retain ≈ 0.1).

Whole set, not per frame: the reference selects over all visual tokens it is given, so a video's
budget round(retain·T·N) is chosen over all T·N tokens at once — diversity then also removes
frame-to-frame repeats. Ties (exact duplicates) go to the earlier token; already chosen tokens are
never picked again.
"""

from __future__ import annotations

import torch

from streamprune.reduce.methods.base import (
    PRE_LLM,
    Method,
    check_inputs,
    cosine_matrix,
    keep_only,
    video_budget,
)
from streamprune.tokens import VisualTokens

PAPER = ("Alvar, Singh, Akbari, Zhang, DivPrune: Diversity-based Visual Token Pruning for Large Multimodal "
         "Models, CVPR 2025 (arXiv 2503.02175)")
DEFAULTS: dict = {}


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[n, D] → [n, n] pairwise 1 − cos (0 on the diagonal up to rounding)."""
    return 1.0 - cosine_matrix(x)


def most_isolated(dist: torch.Tensor) -> int:
    """DivPrune's first pick: the token whose nearest other token is farthest. dist: [n, n]."""
    nearest = dist.clone().fill_diagonal_(float("inf")).min(1).values
    if not torch.isfinite(nearest).any():  # a single token
        return 0
    return int(nearest.argmax())


def max_min_order(dist: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Greedy max–min (farthest-point) selection starting at `first`.

    dist: [n, n] symmetric distances. Returns [k] long, the picks in selection order: each next pick has the
    largest minimum distance to the picks before it (ties to the earlier index).
    """
    n = dist.shape[0]
    k = min(k, n)
    order = torch.empty(k, dtype=torch.long)
    if k == 0:
        return order
    order[0] = first
    nearest = dist[first].clone()  # each token's distance to its nearest pick so far
    nearest[first] = float("-inf")  # a pick is never chosen again
    for i in range(1, k):
        j = int(nearest.argmax())  # argmax returns the first maximum: ties to the earlier index
        order[i] = j
        nearest = torch.minimum(nearest, dist[j])  # earlier picks stay at -inf
        nearest[j] = float("-inf")
    return order


def divprune_reduce(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
                    **_: object) -> VisualTokens:
    """Keeps round(retain·T·N) tokens chosen over the whole video by greedy max–min diversity on cosine distance
    (first the most isolated token, then each time the token farthest from all kept ones); the rest are
    dropped. Ignores attention.

    features: [T, N, D]. Kept tokens stay at their frame and position (original order).
    """
    t, n = check_inputs(features, attention, retain)
    flat = features.reshape(t * n, -1)
    dist = cosine_distance(flat)
    order = max_min_order(dist, video_budget(retain, t, n), most_isolated(dist))
    keep = torch.zeros(t * n, dtype=torch.bool)
    keep[order] = True
    return keep_only(features, keep.view(t, n), grid_hw)


METHOD = Method("divprune", PAPER, (PRE_LLM,), divprune_reduce, DEFAULTS, proportional=False)
