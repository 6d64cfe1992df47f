"""Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024): prune by importance on the attention graph, and by similarity.

Within a pruning step (here between a layer's attention and MLP, where every method of this package runs):
1. I′: one Weighted-PageRank iteration ranks the tokens (s ← Aᵀs from uniform s: attention received,
   weighted by the importance of the tokens giving it);
2. S-stage: the less important half is matched to the other half by cosine similarity of the keys, and
   the most similar of them are pruned (pairs that repeat each other);
3. I-stage: full WPR on the remaining tokens' attention graph (30 iterations in the first three layers, 5
   in the middle, 1 in the last three) and the least important are pruned.
Heads are combined by EIR: the root mean square over heads whose score variance (scores scaled to mean 1)
lies in [0.01, 0.7] (all heads if none does). Pruned tokens are dropped, not merged; for the bookkeeping
they are accounted for by their most similar survivor, and attention is not size-weighted.

Adaptations (not fixed by the paper for this setting): SigLIP has no [CLS] token, so WPR starts uniform
(the paper's "-uni" variant); the r tokens of a step are split evenly between the S- and I-stage; the
schedule is the shared constant one (the paper's per-layer keep rates for DeiT are not used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamprune.reduce.vit.transform import TokenTransform, route

PAPER = "Wang, Dedhia & Jha, Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph, CVPR 2024"
HEAD_VARIANCE = (0.01, 0.7)


def weighted_page_rank(attention: torch.Tensor, iterations: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """attention [B, h, L, L] (rows = queries, softmax) → scores [B, h, L] after `iterations` of s ← Aᵀs.

    keep [B, L] bool: run on the graph of these tokens only, each row renormalised over them (without
    materialising it: G[q, k] = A[q, k]·keep[k] / Σ_k' A[q, k']·keep[k'] for kept q)."""
    length = attention.shape[-1]
    if keep is None:
        scores = attention.new_full(attention.shape[:-1], 1.0 / length)
        weight = None
    else:
        kept = keep.to(attention.dtype)[:, None, :]  # [B, 1, L]
        scores = kept.expand(-1, attention.shape[1], -1) / kept.sum(-1, keepdim=True)
        weight = kept / (attention @ kept.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12)  # keep[q] / rowsum[q]
    for _ in range(iterations):
        # row vector times A (Σ_q s_q·A[q, k]): a matrix-vector product, far faster than einsum here
        scores = ((scores if weight is None else scores * weight).unsqueeze(-2) @ attention).squeeze(-2)
        if keep is not None:
            scores = scores * kept
    return scores


def emphasize_informative_region(scores: torch.Tensor, variance: tuple[float, float] = HEAD_VARIANCE) -> torch.Tensor:
    """EIR: root mean square over the heads whose score variance is in range. scores [B, h, L] → [B, L]."""
    length = scores.shape[-1]
    var = (scores * length).var(-1)  # scores scaled to mean 1 per head
    use = ((var >= variance[0]) & (var <= variance[1])).float()
    use = torch.where(use.sum(1, keepdim=True) > 0, use, torch.ones_like(use))
    return ((scores ** 2 * use[..., None]).sum(1) / use.sum(1)[:, None]).sqrt()


def iterations_for(layer: int, num_layers: int) -> int:
    """WPR iterations by depth, as the paper: 30 in the first three layers, 1 in the last three, else 5."""
    if layer < 3:
        return 30
    if layer >= num_layers - 3:
        return 1
    return 5


def zero_tprune(metric: torch.Tensor, r: int, *, attention: torch.Tensor, layer: int = 0, num_layers: int = 12,
                **_: object) -> TokenTransform:
    """Prune r tokens. metric [B, L, d] keys (head mean); attention [B, h, L, L] softmax attention."""
    b, length, _ = metric.shape
    unit = F.normalize(metric.float(), dim=-1)
    removed = torch.zeros(b, length, dtype=torch.bool, device=metric.device)
    # I′ and S-stage: the less important half A, matched to the rest B; prune the most similar of A
    rank = emphasize_informative_region(weighted_page_rank(attention, 1)).argsort(-1)  # ascending importance
    half = length // 2
    group_a, group_b = rank[:, :half], rank[:, half:]
    r_similar = min(r // 2, half)
    if r_similar > 0:
        sim = unit.gather(1, group_a[..., None].expand(-1, -1, unit.shape[-1])) @ \
            unit.gather(1, group_b[..., None].expand(-1, -1, unit.shape[-1])).transpose(1, 2)
        most_similar = sim.amax(-1).topk(r_similar, -1).indices  # positions within A
        removed.scatter_(1, group_a.gather(1, most_similar), True)
    # I-stage: WPR on the survivors' graph, rows renormalised over the survivors
    r_important = r - r_similar
    if r_important > 0:
        scores = emphasize_informative_region(weighted_page_rank(attention, iterations_for(layer, num_layers),
                                                                 keep=~removed))
        scores = scores.masked_fill(removed, float("inf"))
        removed.scatter_(1, scores.topk(r_important, -1, largest=False).indices, True)
    # bookkeeping: a pruned token is accounted for by its most similar survivor
    sim_all = (unit @ unit.transpose(1, 2)).masked_fill(removed[:, None, :], -float("inf"))
    step = route(removed, sim_all.argmax(-1), r_similar + r_important)
    step.contributes = ~removed
    return step
