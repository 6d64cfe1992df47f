"""VLA-Pruner's dual-level token selection under a budget (Liu et al., 2025), as pure tensor code.

Shapes: M visual tokens of one image (or all cameras of one step), D feature width, k the budget.
1. relevance: C_sem = top-k by semantic importance (language → vision attention in the prefix pass),
   C_act = top-k by the smoothed action importance (action-expert → vision attention of recent steps);
2. union C = C_sem ∪ C_act;
3. redundancy: if |C| > k, keep the k tokens of C that maximise the minimum pairwise cosine distance
   (greedy max–min diversity: start from the token farthest from its nearest neighbour in C, then add
   the token farthest from the chosen set).
`select_tokens` also gives the baselines at the same budget: semantic-only (FastV-style: what the language
attends to now), action-only (the smoothed action importance alone: the paper's ablation) and random.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SELECTIONS = ("vla_pruner", "semantic", "action", "random")


def max_min_diversity(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max–min diversity on cosine distance. features: [n, D]. Returns k indices into 0..n-1."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n)
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.T  # [n, n]
    distance.fill_diagonal_(float("inf"))
    chosen = [int(distance.min(1).values.argmax())]  # the most isolated token
    nearest_chosen = distance[:, chosen[0]].clone()
    nearest_chosen[chosen[0]] = -1.0
    for _ in range(k - 1):
        pick = int(nearest_chosen.argmax())
        chosen.append(pick)
        nearest_chosen = torch.minimum(nearest_chosen, distance[:, pick])
        nearest_chosen[chosen] = -1.0
    return torch.tensor(chosen)


def dual_level_select(features: torch.Tensor, semantic: torch.Tensor, action: torch.Tensor | None,
                      k: int) -> torch.Tensor:
    """Visual tokens to keep: features [M, D], semantic [M], action [M] or None (no history yet).

    Returns k sorted indices. The union of both top-k sets is kept whole when it fits; it always
    contains the top-k of each criterion before the diversity trim.
    """
    m = features.shape[0]
    k = max(0, min(k, m))
    candidates = semantic.topk(k).indices
    if action is not None:
        candidates = torch.unique(torch.cat([candidates, action.topk(k).indices]))
    if len(candidates) > k:
        candidates = candidates[max_min_diversity(features[candidates], k)]
    return candidates.sort().values


def select_tokens(selection: str, features: torch.Tensor, semantic: torch.Tensor, action: torch.Tensor | None,
                  k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k sorted indices of one image's visual tokens by `selection` (one of SELECTIONS).

    features [M, D], semantic [M], action [M] (smoothed; None before any history: vla_pruner and action then
    fall back to semantic); `generator` drives "random".
    """
    if selection == "random":
        return torch.randperm(features.shape[0], generator=generator)[:k].sort().values
    if selection == "semantic" or action is None:
        return dual_level_select(features, semantic, None, k)
    if selection == "action":
        return dual_level_select(features, action, None, k)
    if selection == "vla_pruner":
        return dual_level_select(features, semantic, action, k)
    raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")


def budget(num_tokens: int, retain: float) -> int:
    """Tokens kept at `retain` (at least one)."""
    return max(1, round(retain * num_tokens))
