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

Every function also takes a batch of images ([B, M, D] features, [B, M] scores → [B, k]) and runs on the
inputs' device without reading anything back to the host: a policy selects inside its forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SELECTIONS = ("vla_pruner", "semantic", "action", "random")


def max_min_diversity(features: torch.Tensor, k: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max–min diversity on cosine distance among the `candidates`.

    features: [n, D] or [B, n, D]; candidates: bool [n] / [B, n] (None: all n), at least k per row.
    Returns [k] / [B, k] indices into 0..n-1 in the order they were picked; ties go to the lowest index.
    """
    batched = features.dim() == 3
    if not batched:
        features = features[None]
        candidates = None if candidates is None else candidates[None]
    b, n, _ = features.shape
    if k >= n and candidates is None:
        picks = torch.arange(n, device=features.device).expand(b, n)
        return picks if batched else picks[0]
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.transpose(1, 2)  # [B, n, n]
    # exactly symmetric, so mutual nearest neighbours tie exactly and the tie goes to the lower index
    # (rounding in the matmul would otherwise decide, differently per kernel and device)
    distance = (distance + distance.transpose(1, 2)) / 2
    blocked = torch.eye(n, dtype=torch.bool, device=features.device)
    if candidates is not None:  # a token's nearest neighbour is looked for among the candidates only
        blocked = blocked | ~candidates[:, None, :]
    distance = distance.masked_fill(blocked, float("inf"))
    isolation = distance.min(2).values
    if candidates is not None:
        isolation = isolation.masked_fill(~candidates, float("-inf"))
    # the distances to a pick are its row (symmetric on the candidates' columns); its own entry, now -1,
    # marks it chosen: the running minimum then never picks it again
    distance.diagonal(dim1=1, dim2=2).fill_(-1.0)
    rows = distance.view(b * n, n)
    offsets = torch.arange(0, b * n, n, device=features.device)
    pick = isolation.argmax(1)  # [B] the most isolated token
    picks = [pick]
    nearest_chosen = rows.index_select(0, pick + offsets)  # [B, n]
    if candidates is not None:
        nearest_chosen = nearest_chosen.masked_fill(~candidates, float("-inf"))
    for _ in range(k - 1):  # picks stay on the device: no host sync per step
        pick = nearest_chosen.argmax(1)
        picks.append(pick)
        nearest_chosen = torch.minimum(nearest_chosen, rows.index_select(0, pick + offsets))
    picks = torch.stack(picks, 1)
    return picks if batched else picks[0]


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [..., M]: True at the k highest scores of each row."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k).indices, True)


def _mask_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` True positions of each row of mask [B, M], ascending, as [B, count] (sync-free)."""
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :count]


def dual_level_select(features: torch.Tensor, semantic: torch.Tensor, action: torch.Tensor | None,
                      k: int) -> torch.Tensor:
    """Visual tokens to keep: features [M, D], semantic [M], action [M] or None (no history yet);
    or a batch: [B, M, D], [B, M], [B, M].

    Returns k sorted indices ([k] or [B, k]). The union of both top-k sets is kept whole when it fits (it
    then has exactly k members); it always contains the top-k of each criterion before the diversity trim.
    """
    batched = features.dim() == 3
    if not batched:
        features, semantic = features[None], semantic[None]
        action = None if action is None else action[None]
    m = features.shape[1]
    k = max(0, min(k, m))
    if action is None or k == 0:
        kept = semantic.topk(k).indices.sort().values
        return kept if batched else kept[0]
    union = _topk_mask(semantic, k) | _topk_mask(action, k)  # [B, M], k to 2k members per row
    # the union's members in ascending order (padded with non-members up to 2k): a fixed-size candidate set
    slots = _mask_indices(union, min(2 * k, m))
    candidates = union.gather(1, slots)
    # a union of exactly k members is picked whole by the greedy trim, so one path serves both cases
    chosen = max_min_diversity(_gather_rows(features, slots), k, candidates)
    kept = slots.gather(1, chosen).sort().values
    return kept if batched else kept[0]


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, M, D], index [B, n] → x[b, index[b]] as [B, n, D] (whole rows: faster than a gather)."""
    b, m, d = x.shape
    offsets = torch.arange(0, b * m, m, device=x.device)[:, None]
    return x.reshape(b * m, d).index_select(0, (index + offsets).flatten()).view(b, -1, d)


def select_tokens(selection: str, features: torch.Tensor, semantic: torch.Tensor, action: torch.Tensor | None,
                  k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k sorted indices of one image's visual tokens by `selection` (one of SELECTIONS).

    features [M, D], semantic [M], action [M] (smoothed; None before any history: vla_pruner and action then
    fall back to semantic); or a batch of images: [B, M, D], [B, M], [B, M] → [B, k]. `generator` drives
    "random" (on the features' device; one permutation per image, in batch order).
    """
    if selection == "random":
        return random_select(features, k, generator)
    if selection == "semantic" or action is None:
        return dual_level_select(features, semantic, None, k)
    if selection == "action":
        return dual_level_select(features, action, None, k)
    if selection == "vla_pruner":
        return dual_level_select(features, semantic, action, k)
    raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")


def random_select(features: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k sorted random indices: features [M, D] → [k], or [B, M, D] → [B, k] (one permutation per image, in
    batch order, drawn on the features' device)."""
    m = features.shape[-2]

    def draw() -> torch.Tensor:
        return torch.randperm(m, generator=generator, device=features.device)[:k].sort().values

    return torch.stack([draw() for _ in range(features.shape[0])]) if features.dim() == 3 else draw()


def budget(num_tokens: int, retain: float) -> int:
    """Tokens kept at `retain` (at least one)."""
    return max(1, round(retain * num_tokens))
