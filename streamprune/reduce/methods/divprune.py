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
    """[n, D] → [n, n] pairwise 1 − cos (0 on the diagonal up to rounding), float32."""
    return cosine_matrix(x).neg_().add_(1.0)  # in place: −c + 1 rounds as 1 − c, without a second [n, n]


def most_isolated(dist: torch.Tensor) -> torch.Tensor:
    """DivPrune's first pick: the token whose nearest other token is farthest. dist: [n, n] (left as it is).
    Returns a 0-d long tensor on dist's device (0 for a single token)."""
    return _most_isolated(dist.clone())


def _most_isolated(dist: torch.Tensor) -> torch.Tensor:
    """`most_isolated` that writes +inf on dist's diagonal (its own matrix: saves an [n, n] copy)."""
    nearest = dist.fill_diagonal_(float("inf")).min(1).values  # a single token: [inf], argmax 0
    return nearest.argmax()


def max_min_order(dist: torch.Tensor, k: int, first: int | torch.Tensor) -> torch.Tensor:
    """Greedy max–min (farthest-point) selection starting at `first`.

    dist: [n, n] symmetric distances (left as it is); first: an index (int or 0-d tensor). Returns [min(k, n)]
    long, the picks in selection order: each next pick has the largest minimum distance to the picks before
    it (ties to the earlier index).
    """
    return farthest_points(dist.clone().fill_diagonal_(float("-inf")), k, first)


def farthest_points(dist: torch.Tensor, k: int, first: int | torch.Tensor) -> torch.Tensor:
    """`max_min_order` on a distance matrix whose diagonal is already −inf, so that taking the minimum with
    a pick's row also retires the pick (never chosen again) and one step is three kernels with no host sync.

    dist: [n, n]. Returns [min(k, n)] long picks in selection order.
    """
    k = min(k, dist.shape[0])
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=dist.device)
    pick = torch.as_tensor(first, dtype=torch.long, device=dist.device).view(1)
    picks = [pick]
    nearest = dist.index_select(0, pick)[0]  # each token's distance to its nearest pick so far (picks: −inf)
    for _ in range(1, k):
        pick = nearest.argmax(0, keepdim=True)  # the first maximum: ties to the earlier index
        picks.append(pick)
        nearest = torch.minimum(nearest, dist.index_select(0, pick)[0])
    return torch.cat(picks)


def divprune_order(flat: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's picks over tokens flat [n, D], in selection order: [min(k, n)] long. One distance matrix,
    whose diagonal serves first the isolation test (+inf) and then the max–min loop (−inf)."""
    dist = cosine_distance(flat)
    first = _most_isolated(dist)
    return farthest_points(dist.fill_diagonal_(float("-inf")), k, first)


def divprune_reduce(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
                    **_: object) -> VisualTokens:
    """Keeps round(retain·T·N) tokens chosen over the whole video by greedy max–min diversity on cosine distance
    (first the most isolated token, then each time the token farthest from all kept ones); the rest are
    dropped. Ignores attention.

    features: [T, N, D]. Kept tokens stay at their frame and position (original order).
    """
    t, n = check_inputs(features, attention, retain)
    order = divprune_order(features.reshape(t * n, -1), video_budget(retain, t, n))
    keep = torch.zeros(t * n, dtype=torch.bool, device=features.device).index_fill_(0, order, True)
    return keep_only(features, keep.view(t, n), grid_hw)


METHOD = Method("divprune", PAPER, (PRE_LLM,), divprune_reduce, DEFAULTS, proportional=False)
