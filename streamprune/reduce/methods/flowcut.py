"""`flowcut`: prune by information flow — importance accumulated over vision layers, pruned progressively.

Paper: Jintao Tong, Wenwei Jin, Pengda Qin, Anqi Li, Yixiong Zou, Yuhong Li, Yuhua Li, Ruixuan Li,
"FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models", NeurIPS 2025
(arXiv 2505.19536). Code: TungChintao/FlowCut (read: `utils_flowcut.py`, `modeling_clip_flowcut.py`).

Criterion (inside the vision encoder, layer by layer): each patch's score in a layer is
  s = (a / Σa + σ / Σσ) · ‖v‖₁,
a = the [CLS] query's attention to the patch (head mean), σ = softmax over patches of ⟨v_CLS, v_patch⟩ (the
"semantic" flow through the values, head mean), ‖v‖₁ = the patch value's L1 norm. Scores accumulate over
layers as an exponential average, c ← ½·c + ½·s. Every second layer (counting the layers left to the
feature-select layer, rpl, when rpl is even) the tokens are cut to max(n − r, target) by c, with the
adaptive count r = (n − target)/√rpl · (1 − (H/H_max)²), H the entropy of the [CLS] attention over the
n current tokens and H_max = log n: a flat (high-entropy) attention prunes little, a peaked one a lot. At
the select layer (rpl = 0) the tokens are cut to the target. The kept tokens stay in order.

Cuts: before the LLM (pre-llm), pure pruning; per image in the paper, here per frame with the video budget
round(retain·T·N) split by `frame_quotas`.
Defaults: ema = 0.5 (the ½/½ average), prune_every = 2 (as the code).

Adaptations, stated plainly:
  - Only one attention map is normally given (the last used layer, attention received averaged over heads
    and queries — SigLIP has no [CLS], so this mean attention received replaces the [CLS] row). With that
    map alone there is one layer, rpl = 0, and FlowCut is a single cut by s. Pass `layer_attention`
    [T, Lv, N] (attention received per vision layer, the last entry the used layer) for the progressive,
    adaptive schedule above; attention to tokens pruned earlier is ignored by renormalising over the
    survivors (the maps were computed without pruning).
  - The vision tower's values are not available: the semantic term uses the projected tokens, with the
    frame's mean token standing in for [CLS] (σ = softmax_j ⟨x̄, x_j⟩/√D), and the value norm is the
    projected token's L1 norm. Both are computed once and reused for every layer.
"""

from __future__ import annotations

import math

import torch

from streamprune.reduce.methods.base import PRE_LLM, Method, check_inputs, frame_quotas, keep_only, quota_topk
from streamprune.tokens import VisualTokens

PAPER = ("Tong et al., FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language "
         "Models, NeurIPS 2025 (arXiv 2505.19536)")
DEFAULTS = {"ema": 0.5, "prune_every": 2}


def semantic_flow(features: torch.Tensor) -> torch.Tensor:
    """Softmax over tokens of ⟨x̄, x_j⟩/√D, the frame's mean token standing in for [CLS].
    features: [..., N, D] → [..., N]."""
    x = features.float()
    return torch.softmax((x @ x.mean(-2, keepdim=True).mT)[..., 0] / math.sqrt(x.shape[-1]), dim=-1)


def flow_score(attention: torch.Tensor, semantic: torch.Tensor, value_norm: torch.Tensor,
               alive: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's FlowCut score (a/Σa + σ/Σσ)·‖v‖₁ over the current tokens. All [..., n] → [..., n].

    alive: optional [..., n] bool, the current tokens; the shares are taken over them alone (the other
    entries' scores are meaningless)."""
    a, s = attention.float().clamp_min(0), semantic.float()
    if alive is not None:
        a, s = a.masked_fill(~alive, 0), s.masked_fill(~alive, 0)
    return (a / a.sum(-1, keepdim=True).clamp_min(1e-12) + s / s.sum(-1, keepdim=True).clamp_min(1e-12)) * value_norm


def adaptive_prune_count(attention: torch.Tensor, remaining: int, target: int | torch.Tensor,
                         alive: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens to cut now: round((n − target)/√remaining · (1 − (H/H_max)²)), 0 when n ≤ 1.

    attention: [..., N]; remaining: layers left to the select layer (> 0); target: int or [...] long;
    alive: optional [..., N] bool, the n current tokens (default: all). H is the entropy of the attention
    renormalised over the current tokens, H_max = log n. Returns [...] long."""
    p = attention.float().clamp_min(0)
    if alive is None:
        alive = torch.ones_like(p, dtype=torch.bool)
    p = p.masked_fill(~alive, 0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    n = alive.sum(-1)
    ratio = -torch.special.xlogy(p, p).sum(-1).double() / n.double().log()  # float64, as Python floats
    count = torch.round((n - target).double() / math.sqrt(remaining) * (1 - ratio**2)).long()
    return torch.where(n > 1, count, 0)


def flowcut_keep(features: torch.Tensor, layers: torch.Tensor, quotas: torch.Tensor, ema: float = DEFAULTS["ema"],
                 prune_every: int = DEFAULTS["prune_every"]) -> torch.Tensor:
    """Every frame's FlowCut, in step over the layers. features: [T, N, D]; layers: [T, Lv, N] attention per
    layer, the last the select layer; quotas: [T] long. Returns keep [T, N] bool with exactly min(quota, N)
    True per frame.

    The surviving tokens are a mask (None until the first cut): a cut keeps, per frame, the top
    max(n − cut, quota) by the accumulated score among the survivors (a frame already at its quota keeps them
    all); the select layer's cut keeps exactly the quota."""
    x = features.float()
    semantic, value_norm = semantic_flow(x), x.abs().sum(-1)  # [T, N] each
    alive = None
    cumulative = None
    depth = layers.shape[1]
    for layer in range(depth):
        attention = layers[:, layer]
        score = flow_score(attention, semantic, value_norm, alive)
        cumulative = score if cumulative is None else ema * cumulative + (1 - ema) * score
        remaining = depth - 1 - layer
        if remaining % prune_every:
            continue
        keep_count = quotas  # the select layer; cuts never go below the quota, so n ≥ quota
        if remaining:
            n_alive = torch.full_like(quotas, layers.shape[2]) if alive is None else alive.sum(-1)
            cut = adaptive_prune_count(attention, remaining, quotas, alive)
            keep_count = torch.minimum(n_alive, torch.maximum(n_alive - cut, quotas))
        candidates = cumulative if alive is None else cumulative.masked_fill(~alive, float("-inf"))
        alive = quota_topk(candidates, keep_count)  # a mask: keeps the original order
    return alive


def flowcut_reduce(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], retain: float,
                   layer_attention: torch.Tensor | None = None, ema: float = DEFAULTS["ema"],
                   prune_every: int = DEFAULTS["prune_every"], **_: object) -> VisualTokens:
    """Keeps, in every frame, its share of round(retain·T·N) tokens with the highest information-flow score —
    (attention share + semantic-flow share) × value L1 norm, averaged over vision layers and cut progressively
    with an entropy-adaptive count when per-layer maps are given, one cut with the last layer's map otherwise;
    the rest are dropped.

    features: [T, N, D]; attention: [T, N]; layer_attention: optional [T, Lv, N], last entry = `attention`'s layer.
    """
    t, n = check_inputs(features, attention, retain)
    if attention is None:
        raise ValueError("flowcut needs the attention map")
    layers = attention[:, None]
    if layer_attention is not None:
        if (layer_attention.dim() != 3 or layer_attention.shape[0] != t or layer_attention.shape[1] == 0
                or layer_attention.shape[2] != n):
            raise ValueError(f"layer_attention must be [{t}, Lv, {n}], got {tuple(layer_attention.shape)}")
        layers = layer_attention
    quotas = torch.tensor(frame_quotas(retain, t, n), device=features.device)
    return keep_only(features, flowcut_keep(features, layers, quotas, ema, prune_every), grid_hw)


METHOD = Method("flowcut", PAPER, (PRE_LLM,), flowcut_reduce, DEFAULTS, proportional=False)
