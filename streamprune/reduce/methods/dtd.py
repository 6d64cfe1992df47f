"""`dtd` and `evs`: drop a token when the same grid position in the previous frame already showed it.

Both compare every token with the token at the same position in the immediately previous (full, unpruned)
frame, keep frame 0 whole, and cut before the LLM; kept tokens keep their frame and grid position (their
M-RoPE (t, h, w)). Dropped tokens are pruned, not merged (Fate DROPPED).

`dtd` — TimeChat-Online's Differential Token Drop. Paper: Linli Yao, Yicheng Li, Yuancheng Wei, Lei Li,
Shuhuai Ren, Yuanxin Liu, Kun Ouyang, Lean Wang, Shicheng Li, Sida Li, Lingpeng Kong, Qi Liu, Yuanxing Zhang,
Xu Sun, "TimeChat-Online: 80% Visual Tokens are Naturally Redundant in Streaming Videos", ACM MM 2025 (arXiv
2504.17343); code yaolinli/TimeChat-Online (`eval/qwen2_5_vl/modeling_qwen2_5_vl_DTD.py::token_drop`,
`feature` method). Two modes:
- fixed threshold (`threshold=`, the paper's absolute mode; README example 0.5): drop every token of frames
  1.. whose cosine to the previous frame's token at its position exceeds `threshold`. The output has as many
  tokens as the threshold leaves; `retain` is then not used.
- relative (default, the paper's `--drop_relative`): each frame 1.. drops its most similar tokens, the number
  set by the budget: frame 0 keeps N, the other frames share round(retain·T·N) − N by largest remainder (the
  paper drops int(N·ratio) per frame). So the output has exactly the budget.
The paper's other criterion (`pixel`: mean absolute RGB difference of the patch) needs pixels and is not
ported. TimeChat-Online fine-tunes Qwen2.5-VL with DTD on; applied to other models it is the zero-shot use the
README reports.

`evs` — vLLM's Efficient Video Sampling. Paper: Natan Bagrov et al. (NVIDIA), "Efficient Video Sampling:
Pruning Temporally Redundant Tokens for Faster VLM Inference", arXiv 2510.14624; code vllm `multimodal/evs.py`
(`compute_retention_mask`). Dissimilarity 1 − cos to the previous frame per position, frame 0 forced to the
top (255), one stable descending argsort over the whole video keeps the top count: budget-driven and global,
where `dtd` is per frame. vLLM keeps max(tpf, int(T·tpf·(1−q))) tokens for pruning rate q; here exactly
round(retain·T·N), i.e. q = 1 − retain with round instead of int. The paper computes the differences on RGB
patches; vLLM (followed here) on the embeddings.

Below one frame's worth of budget (retain < 1/T) neither method can keep frame 0 whole. Then only frame 0
keeps tokens, at evenly spaced grid positions (vLLM never goes below one frame; TimeChat-Online never drops in
frame 0).
"""

from __future__ import annotations

import torch

from streamprune.reduce.holitom import adjacent_similarity, allocate_budget, host_ints
from streamprune.reduce.methods.base import PRE_LLM, Method, check_inputs, keep_only, quota_topk, video_budget
from streamprune.reduce.methods.dycoke import spread_positions
from streamprune.tokens import VisualTokens

DTD_PAPER = ("Yao et al., TimeChat-Online: 80% Visual Tokens are Naturally Redundant in Streaming Videos, "
             "ACM MM 2025 (arXiv 2504.17343)")
EVS_PAPER = ("Bagrov et al., Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM "
             "Inference, arXiv 2510.14624 (vLLM multimodal/evs.py)")
PAPER = DTD_PAPER
DTD_DEFAULTS = {"threshold": None}
EVS_DEFAULTS: dict = {}
DEFAULTS = DTD_DEFAULTS


def previous_frame_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine of each token with the same position in the previous frame (float32); frame 0 gets −inf (nothing
    before it).

    features: [T, N, D] → [T, N].
    """
    t, n, _ = features.shape
    first = torch.full((1, n), float("-inf"), device=features.device)
    return torch.cat([first, adjacent_similarity(features)]) if t > 1 else first


def first_frame_only(t: int, n: int, budget: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T, N] keep mask on `device` for a budget below one frame: evenly spaced positions of frame 0."""
    keep = torch.zeros(t, n, dtype=torch.bool, device=device)
    keep[0] = spread_positions(n, budget, device)
    return keep


def dtd(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
        threshold: float | None = DTD_DEFAULTS["threshold"], **_: object) -> VisualTokens:
    """Drops tokens whose cosine to the same position in the previous frame is high: above `threshold` when
    given (any count), else each frame's most similar ones down to round(retain·T·N) tokens; frame 0 is kept
    whole.

    features: [T, N, D]; attention unused.
    """
    t, n = check_inputs(features, attention, retain)
    similarity = previous_frame_similarity(features)
    if threshold is not None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"dtd threshold is a cosine similarity in [-1, 1], got {threshold}")
        return keep_only(features, ~(similarity > threshold), grid_hw)
    budget = video_budget(retain, t, n)
    if budget < n:
        return keep_only(features, first_frame_only(t, n, budget, features.device), grid_hw)
    # frame 0 (similarity −inf) keeps all N; the others keep their least similar tokens, ties to the earlier
    # position, all frames in one sort
    quotas = [n, *allocate_budget([n] * (t - 1), budget - n)]
    return keep_only(features, quota_topk(-similarity, host_ints(quotas, features.device)), grid_hw)


def evs(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
        **_: object) -> VisualTokens:
    """Keeps the round(retain·T·N) tokens most dissimilar (1 − cos) to the same position in the previous
    frame, ranked over the whole video by one stable sort, frame 0 first.

    features: [T, N, D]; attention unused.
    """
    t, n = check_inputs(features, attention, retain)
    budget = video_budget(retain, t, n)
    if budget < n:
        return keep_only(features, first_frame_only(t, n, budget, features.device), grid_hw)
    dissimilarity = 1 - previous_frame_similarity(features)
    dissimilarity[0] = 255.0  # vLLM's marker: frame 0 outranks any 1 − cos ∈ [0, 2]
    order = torch.sort(dissimilarity.flatten(), descending=True, stable=True).indices
    keep = torch.zeros(t * n, dtype=torch.bool, device=features.device)
    keep[order[:budget]] = True
    return keep_only(features, keep.view(t, n), grid_hw)


METHODS = [
    Method("dtd", DTD_PAPER, (PRE_LLM,), dtd, DTD_DEFAULTS, proportional=False),
    Method("evs", EVS_PAPER, (PRE_LLM,), evs, EVS_DEFAULTS, proportional=False),
]
