"""ToMe: bipartite soft matching (Bolya et al., ICLR 2023; facebookresearch/ToMe `tome/merge.py`).

Between attention and MLP of a layer, tokens are split alternately into sets A (even) and B (odd);
each A token's most similar B token is its edge (cosine on the attention keys averaged over heads);
the r A tokens with the most similar edges are merged into their B partner by size-weighted mean, and
attention is made size-aware (proportional attention: log(size) added to the logits of each key).
Defaults as the paper: every layer, constant r, keys as the metric. SigLIP has no [CLS] token, so no
token is protected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamprune.reduce.vit.transform import TokenTransform, route

PAPER = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"


def bipartite_soft_matching(metric: torch.Tensor, r: int, segment: torch.Tensor | None = None) -> TokenTransform:
    """Merge r tokens. metric: [B, L, c] (keys averaged over heads). r ≤ ceil(L/2) is clipped to |A|.

    segment [B, L] (optional): only tokens of the same segment are matched (Qwen2.5-VL's attention windows);
    an A token with no B token in its segment ranks last, and merges across only if r leaves no choice."""
    b, length, _ = metric.shape
    unit = F.normalize(metric.float(), dim=-1)
    a, bb = unit[:, ::2], unit[:, 1::2]
    r = min(r, a.shape[1])
    scores = a @ bb.transpose(1, 2)  # [B, |A|, |B|]
    if segment is not None:
        scores = scores.masked_fill(segment[:, ::2, None] != segment[:, None, 1::2], -float("inf"))
    best, partner = scores.max(-1)  # each A token's most similar B token
    merged_a = best.argsort(-1, descending=True)[:, :r]  # [B, r] positions within A
    removed = torch.zeros(b, length, dtype=torch.bool, device=metric.device)
    removed.scatter_(1, 2 * merged_a, True)
    target = torch.zeros(b, length, dtype=torch.long, device=metric.device)
    target[:, ::2] = 2 * partner + 1  # A token i → its partner's input index
    return route(removed, target, r)


def tome(metric: torch.Tensor, r: int, segment: torch.Tensor | None = None, **_: object) -> TokenTransform:
    """The registry entry: ToMe's bipartite soft matching on the keys (within segments when given)."""
    return bipartite_soft_matching(metric, r, segment)
