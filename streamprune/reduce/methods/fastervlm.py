"""`fastervlm`: keep the visual tokens the vision tower's attention points at most, drop the rest.

Paper: Qizhe Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make
VLM Inference Faster" (FasterVLM), arXiv 2412.01818 (preprint). Code: Theia-4869/FasterVLM.

Criterion: the [CLS] token's attention to each patch in the vision encoder's selected layer, averaged over
heads; the top tokens are kept before the projector/LLM, the rest dropped. The released code does this per
image (LLaVA) and per frame (Video-LLaVA: top-k within each of the frames), keeping the kept tokens in
their original order.

Cuts: before the LLM (pre-llm), pure pruning.
Defaults: none besides the budget (the paper reports 90% / 95% pruning; the budget is `retain`).

Adaptation, stated plainly: SigLIP (our vision towers) has no [CLS] token, so the score is the attention
each token *received* in the last used layer, averaged over heads and queries (the `attention` map) — the
same substitution HoliTom's VisionZip port makes. The video budget round(retain·T·N) is split over frames
by `frame_quotas` (per-frame top-k, as the Video-LLaVA code does) so every method compares at the same
token count.
"""

from __future__ import annotations

import torch

from streamprune.reduce.methods.base import PRE_LLM, Method, check_inputs, frame_quotas, keep_only, quota_topk
from streamprune.tokens import VisualTokens

PAPER = ("Zhang et al., [CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM "
         "Inference Faster (FasterVLM), arXiv 2412.01818")
DEFAULTS: dict = {}


def attention_keep(attention: torch.Tensor, quotas: list[int]) -> torch.Tensor:
    """Per-frame top-k by attention, all frames in one sort.

    attention: [T, N]; quotas: T ints. Returns keep [T, N] bool with quotas[t] True in frame t
    (ties to the earlier position).
    """
    return quota_topk(attention, quotas)


def fastervlm_reduce(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], retain: float,
                     **_: object) -> VisualTokens:
    """Keeps, in every frame, its share of round(retain·T·N) tokens with the highest attention received in the
    vision tower's last used layer (FasterVLM's [CLS] attention; SigLIP has no [CLS], so the mean attention
    received stands in); the rest are dropped.

    features: [T, N, D]; attention: [T, N]. Kept tokens stay at their frame and position.
    """
    t, n = check_inputs(features, attention, retain)
    if attention is None:
        raise ValueError("fastervlm needs the attention map")
    keep = attention_keep(attention.float(), frame_quotas(retain, t, n))
    return keep_only(features, keep, grid_hw)


METHOD = Method("fastervlm", PAPER, (PRE_LLM,), fastervlm_reduce, DEFAULTS, proportional=False)
