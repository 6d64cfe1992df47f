"""`holov`: spread each frame's budget over spatial crops, then keep each crop's best tokens.

Paper: Xin Zou, Di Lu, Yizhou Wang, Yibo Yan, Yuanhuiyi Lyu, Xu Zheng, Linfeng Zhang, Xuming Hu, "Don't
Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention" (HoloV), NeurIPS
2025 (arXiv 2510.02912).

What the sources reachable here state (abstract and summaries; no code, and the paper's reviewers note that
the crop definition and allocation hyper-parameters are under-specified): attention-first pruning keeps
semantically similar tokens from one salient region; HoloV instead "adaptively distributes the pruning
budget across different spatial crops" so the kept tokens carry the global context, scoring tokens by
attention together with how much they differ from the rest of their crop. This module implements exactly
that, with our own concrete choices (flagged):
  1. each frame's grid is cut into `crops` near-square rectangles (`uniform.pooling_cells`; ours: 4);
  2. token score h = (1 − λ)·â + λ·d̂, with â the attention received (share of the frame's total) and
     d̂ the token's diversity 1 − mean cos to the other tokens of its crop (share of the frame's total);
     λ = `diversity` (ours: 0.5);
  3. crop c's budget ∝ Σ_{i∈c} h_i (largest remainder, capped at the crop's size), after a floor of one
     token per crop whenever the frame's quota has room for it — "every crop keeps its share", the holistic
     guarantee; attention-rich crops still get more;
  4. inside a crop, its top tokens by h are kept; the rest are dropped.

Cuts: before the LLM (pre-llm), pure pruning. Per image in the paper; here per frame, with the video budget
round(retain·T·N) split by `frame_quotas`. SigLIP has no [CLS] token, so the attention term is the mean
attention each token received in the last used layer (the `attention` map).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from streamprune.reduce.holitom import host_ints
from streamprune.reduce.methods.base import PRE_LLM, Method, check_inputs, frame_quotas, keep_only, quota_topk
from streamprune.reduce.methods.uniform import _cells, pooling_cells
from streamprune.tokens import VisualTokens

PAPER = ("Zou et al., Don't Just Chase \"Highlighted Tokens\" in MLLMs: Revisiting Visual Holistic Context "
         "Retention (HoloV), NeurIPS 2025 (arXiv 2510.02912)")
DEFAULTS = {"crops": 4, "diversity": 0.5}


def _share(x: torch.Tensor) -> torch.Tensor:
    """x / Σx along the last dim for x ≥ 0 (uniform when the sum is 0), in float32."""
    x = x.float().clamp_min(0)
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / total, 1.0 / x.shape[-1])


def crop_diversity(features: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """1 − mean cosine similarity of each token to the other tokens of its crop.

    features: [..., N, D] (one frame or a batch of frames); crop: [N] long crop ids. Returns [..., N] in
    [0, 2] (1 for a token alone in its crop).
    """
    unit = F.normalize(features.float(), dim=-1)
    sim = unit @ unit.transpose(-1, -2)  # [..., N, N]
    same = (crop[:, None] == crop[None, :]).fill_diagonal_(False)
    others = same.sum(1)
    mean_sim = (sim * same).sum(-1) / others.clamp(min=1)
    return torch.where(others > 0, 1.0 - mean_sim, torch.ones_like(mean_sim))


def holistic_score(features: torch.Tensor, attention: torch.Tensor, crop: torch.Tensor,
                   diversity: float = DEFAULTS["diversity"]) -> torch.Tensor:
    """h = (1 − λ)·attention share + λ·diversity share, both over the frame. features: [..., N, D]; attention:
    [..., N]; crop: [N]. Returns [..., N], summing to 1 over each frame."""
    return (1 - diversity) * _share(attention) + diversity * _share(crop_diversity(features, crop))


def crop_quotas(weights: torch.Tensor, sizes: torch.Tensor, q: int) -> list[int]:
    """Split q tokens over crops. weights, sizes: [C]. One per (non-empty) crop first when q ≥ C, the rest in
    proportion to the weights by largest remainder, each crop at most its size; what a full crop cannot
    take goes to the others. Host bookkeeping: pass CPU tensors (it reads values back while it loops)."""
    quota = torch.zeros(len(sizes), dtype=torch.long, device=sizes.device)
    if q >= len(sizes):
        quota = sizes.clamp(max=1).long()
    left = q - int(quota.sum())
    while left > 0:
        room = sizes - quota
        open_ = (room > 0).nonzero().squeeze(1)
        w = weights[open_].float().clamp_min(0)
        w = w if w.sum() > 0 else room[open_].float()
        exact = left * w / w.sum()
        give = exact.floor().long()
        order = torch.sort(-(exact - give), stable=True).indices  # larger remainder first, earlier crop on ties
        give[order[: left - int(give.sum())]] += 1
        give = torch.minimum(give, room[open_])
        quota[open_] += give
        left -= int(give.sum())
    return quota.tolist()


def holov_keep(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], quotas: list[int],
               crops: int = DEFAULTS["crops"], diversity: float = DEFAULTS["diversity"]) -> torch.Tensor:
    """All frames at once. features: [T, N, D]; attention: [T, N]; quotas: T ints. Returns keep [T, N] bool
    with quotas[t] True per frame.

    The scores and per-crop weights are computed on the device for every frame together; only the [T, C]
    crop weights come to the host, once, for the crop budgets (a small loop per frame), and the per-crop
    budgets go back in one copy. Each crop then keeps its top tokens in one sort over [T·C, N].
    """
    t, n = attention.shape
    device = features.device
    crop = pooling_cells(grid_hw, crops, device)
    score = holistic_score(features, attention, crop, diversity)  # [T, N]
    n_crops = int(_cells(grid_hw, crops).max()) + 1
    weights = torch.zeros(t, n_crops, device=device).index_add_(1, crop, score).cpu()
    sizes = torch.from_numpy(np.bincount(_cells(grid_hw, crops), minlength=n_crops))
    budgets = host_ints([crop_quotas(weights[f], sizes, q) if q else [0] * n_crops
                         for f, q in enumerate(quotas)], device)  # [T, C]
    # per (frame, crop): its own tokens' scores, the rest −inf; top budgets[t, c] of each row
    in_crop = crop[None, :] == torch.arange(n_crops, device=device)[:, None]  # [C, N]
    per_crop = score[:, None, :].masked_fill(~in_crop, float("-inf"))  # [T, C, N]
    keep = quota_topk(per_crop.reshape(t * n_crops, n), budgets.flatten()).view(t, n_crops, n)
    return keep.any(1)


def holov_frame(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], q: int,
                crops: int = DEFAULTS["crops"], diversity: float = DEFAULTS["diversity"]) -> torch.Tensor:
    """One frame. features: [N, D]; attention: [N]. Returns keep [N] bool with exactly q True."""
    return holov_keep(features[None], attention[None], grid_hw, [q], crops, diversity)[0]


def holov_reduce(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], retain: float,
                 crops: int = DEFAULTS["crops"], diversity: float = DEFAULTS["diversity"],
                 **_: object) -> VisualTokens:
    """Keeps, in every frame, its share of round(retain·T·N) tokens spread over `crops` spatial crops: each crop
    gets at least one token and otherwise a budget proportional to its holistic score (attention received
    mixed with within-crop diversity), and keeps its top tokens by that score; the rest are dropped.

    features: [T, N, D]; attention: [T, N]. Kept tokens stay at their frame and position.
    """
    t, n = check_inputs(features, attention, retain)
    if attention is None:
        raise ValueError("holov needs the attention map")
    if grid_hw[0] * grid_hw[1] != n:
        raise ValueError(f"grid {grid_hw} does not hold {n} tokens")
    return keep_only(features, holov_keep(features, attention, grid_hw, frame_quotas(retain, t, n), crops,
                                          diversity), grid_hw)


METHOD = Method("holov", PAPER, (PRE_LLM,), holov_reduce, DEFAULTS, proportional=False)
