"""ToMe: bipartite soft matching (Bolya et al., ICLR 2023; facebookresearch/ToMe `tome/merge.py`).

Between attention and MLP of a layer, tokens are split alternately into sets A (even) and B (odd);
each A token's most similar B token is its edge (cosine on the attention keys averaged over heads);
the r A tokens with the most similar edges are merged into their B partner by size-weighted mean, and
attention is made size-aware (proportional attention: log(size) added to the logits of each key).
Defaults as the paper: every layer, constant r, keys as the metric, r at most ⌊L/2⌋. SigLIP has no [CLS]
token, so no token is protected.

Token order after a merge (`order`), which decides the next layer's A/B split and so what stacked layers merge:
- `tome` (default, the released code's): [the unmerged A tokens, most similar edge first (the order of the
  similarity sort), then every B token in order]. Over stacked layers this is what the paper ran.
- `raster`: survivors keep their input order (the patch grid's raster order while nothing moved tokens).
  Registered as `tome-raster`: the same single step, a different sequence of steps from the second layer on.
The default is the release's for faithfulness; fidelity barely moves: on the random-weight SigLIP-so400m proxy
(4 frames each of two sample videos) the two orders' mean tower-output cosines differ by at most 0.0003.
The bookkeeping is exact for both: each output token carries its grid position and owns its patches, so
unmerging and the runners (SigLIP's and Qwen's towers, reuse caches, merged visual tokens) read the same grid
whatever the token order. Qwen2.5-VL's windowed blocks regroup tokens by window after each merge (stable, so
ToMe's order holds inside each window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamprune.reduce.vit.transform import TokenTransform, route

PAPER = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"
ORDERS = ("tome", "raster")


def bipartite_soft_matching(metric: torch.Tensor, r: int, segment: torch.Tensor | None = None,
                            order: str = "tome") -> TokenTransform:
    """Merge r tokens. metric: [B, L, c] (keys averaged over heads); r is clipped to ⌊L/2⌋ (the release's cap).

    segment [B, L] (optional): only tokens of the same segment are matched (Qwen2.5-VL's attention windows);
    an A token with no B token in its segment ranks last, and merges across only if r leaves no choice.
    order: the output token order, `tome` or `raster` (module docstring). Ties in similarity rank the earlier
    A token first (a stable sort; the release leaves ties to the sort)."""
    if order not in ORDERS:
        raise ValueError(f"unknown ToMe order {order!r}; choose one of: {', '.join(ORDERS)}")
    b, length, _ = metric.shape
    unit = F.normalize(metric.float(), dim=-1)
    a, bb = unit[:, ::2], unit[:, 1::2]
    r = max(0, min(r, length // 2))
    scores = a @ bb.transpose(1, 2)  # [B, |A|, |B|]
    if segment is not None:
        scores = scores.masked_fill(segment[:, ::2, None] != segment[:, None, 1::2], -float("inf"))
    best, partner = scores.max(-1)  # each A token's most similar B token
    ranked = best.argsort(dim=-1, descending=True, stable=True)  # [B, |A|] positions within A, most similar first
    if order == "tome":
        return _tome_order(ranked, partner, r, length)
    removed = torch.zeros(b, length, dtype=torch.bool, device=metric.device)
    removed.scatter_(1, 2 * ranked[:, :r], True)
    target = torch.zeros(b, length, dtype=torch.long, device=metric.device)
    target[:, ::2] = 2 * partner + 1  # A token i → its partner's input index
    return route(removed, target, r)


def _tome_order(ranked: torch.Tensor, partner: torch.Tensor, r: int, length: int) -> TokenTransform:
    """The transform with the release's output order: [unmerged A in `ranked` order, then all B].

    ranked: [B, |A|] A positions by descending edge similarity (the first r merge); partner: [B, |A|] each A
    token's B position. Input index of A position i is 2i, of B position j is 2j + 1."""
    b, num_a = ranked.shape
    num_b = length - num_a
    unmerged = num_a - r
    device = ranked.device
    merged_a, kept_a = ranked[:, :r], ranked[:, r:]
    b_out = unmerged + torch.arange(num_b, device=device)  # output index of each B token
    kept = torch.cat([2 * kept_a, (2 * torch.arange(num_b, device=device) + 1).expand(b, num_b)], 1)
    dest_a = torch.empty(b, num_a, dtype=torch.long, device=device)
    dest_a.scatter_(1, kept_a, torch.arange(unmerged, device=device).expand(b, unmerged))
    dest_a.scatter_(1, merged_a, b_out[partner.gather(1, merged_a)])
    dest = torch.empty(b, length, dtype=torch.long, device=device)
    dest[:, ::2], dest[:, 1::2] = dest_a, b_out.expand(b, num_b)
    return TokenTransform(dest=dest, kept=kept)


def tome(metric: torch.Tensor, r: int, segment: torch.Tensor | None = None, order: str = "tome",
         **_: object) -> TokenTransform:
    """The registry entry: ToMe's bipartite soft matching on the keys (within segments when given)."""
    return bipartite_soft_matching(metric, r, segment, order)


def tome_raster(metric: torch.Tensor, r: int, segment: torch.Tensor | None = None, **_: object) -> TokenTransform:
    """The `tome-raster` registry entry: ToMe's matching with survivors left in their input order."""
    return bipartite_soft_matching(metric, r, segment, order="raster")
