"""`hiprune`: keep anchor tokens, their spatial neighbours (buffers) and globally attended tokens (registers).

Paper: Jizhihui Liu, Feiyi Du, Guangdao Zhu, Niu Lian, Jun Li, Bin Chen, "HiPrune: Training-Free Visual
Token Pruning via Hierarchical Attention in Vision-Language Models", arXiv 2508.00553. Code: the authors'
release (read in the fork mmdbhs/HiPrune-fork, `LLaVA/llava/model/llava_arch.py`).

Criterion: the vision encoder's attention is hierarchical — middle layers attend to the main object, deep
layers spread attention over tokens carrying global context. With N' the token budget of an image:
  - anchors: the round(N'·α/5) tokens with the highest attention in the object layer l;
  - buffers: the 4 grid neighbours (up, down, left, right) of every anchor — anchors and buffers together
    are ≈ α·N' tokens (hence the /5);
  - registers: the rest of the budget, the tokens with the highest attention in the deep (feature-select)
    layer among those not yet kept.
"Attention" is the code's *global* attention: attention received, averaged over heads and over all queries
([CLS] excluded) — exactly what the `attention` map here is. Kept tokens stay in order; the rest are dropped.
Defaults from the release: α = 0.1; object layer 9 of CLIP ViT-L's 24 (16 of Qwen2.5-VL's 32 layers).

Cuts: before the LLM (pre-llm), pure pruning. Per image in the paper; here per frame, with the video budget
round(retain·T·N) split by `frame_quotas`.

Adaptations, stated plainly:
  - Only one attention map (the last used layer) is normally available. It is the register signal; with no
    object-layer map, anchors come from the same map — so anchors are the top tokens and HiPrune reduces to
    "top tokens plus their neighbours, then top tokens". Pass `layer_attention` [T, Lv, N] (attention received
    per vision layer, the last entry the used layer) to get the real object layer: `object_layer` (1-based,
    default round(9/24·Lv), the paper's relative depth) picks the anchor map and the last entry is the deep
    map.
  - Neighbours are true grid neighbours; the reference adds ±1 and ±W to flat indices (wrapping across row
    ends, clamped at the grid's ends).
  - At least one anchor whenever the quota has room for it and its neighbours (q ≥ 5): at per-frame video
    budgets round(q·α/5) is 0 (e.g. q = 20) and the anchor/buffer mechanism would never act.
  - If anchors and buffers exceed the quota, the ones with the highest object-layer attention are kept.
"""

from __future__ import annotations

import torch

from streamprune.reduce.holitom import host_ints
from streamprune.reduce.methods.base import PRE_LLM, Method, check_inputs, frame_quotas, keep_only, quota_topk
from streamprune.tokens import VisualTokens

PAPER = ("Liu, Du, Zhu, Lian, Li, Chen, HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention "
         "in Vision-Language Models, arXiv 2508.00553")
# object_layer None: round(9/24·Lv) of the layer_attention stack (CLIP-L: 9 of 24)
DEFAULTS = {"alpha": 0.1, "object_layer": None}
_OBJECT_DEPTH = 9 / 24


def grid_neighbours(positions: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """The up/down/left/right grid neighbours of flat positions. positions: [k] long. Returns the sorted
    unique neighbour positions [m] (the positions themselves excluded unless they neighbour another)."""
    h, w = grid_hw
    rows, cols = positions // w, positions % w
    out = []
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = rows + dr, cols + dc
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        out.append((r * w + c)[ok])
    return torch.unique(torch.cat(out))


def anchor_count(q: int, alpha: float) -> int:
    """round(q·α/5), at least one when q ≥ 5 (room for an anchor and its four neighbours)."""
    k = round(q * alpha / 5)
    return max(k, 1) if q >= 5 else k


def hiprune_frame(object_attn: torch.Tensor, deep_attn: torch.Tensor, grid_hw: tuple[int, int], q: int,
                  alpha: float = DEFAULTS["alpha"]) -> torch.Tensor:
    """One frame. object_attn, deep_attn: [N] attention received in the object / deep layer. Returns keep [N]
    bool with exactly q True: anchors, their buffers, then registers."""
    return hiprune_keep(object_attn[None], deep_attn[None], grid_hw, [q], alpha)[0]


def hiprune_keep(object_map: torch.Tensor, deep_map: torch.Tensor, grid_hw: tuple[int, int], quotas: list[int],
                 alpha: float = DEFAULTS["alpha"]) -> torch.Tensor:
    """All frames at once. object_map, deep_map: [T, N] attention received in the object / deep layer; quotas:
    T ints. Returns keep [T, N] bool with quotas[t] True per frame: anchors, their buffers, then registers
    (every top-k breaks ties towards the earlier position)."""
    t, n = object_map.shape
    h, w = grid_hw
    device = object_map.device
    quota = host_ints(quotas, device)
    anchors = quota_topk(object_map, host_ints([anchor_count(q, alpha) for q in quotas], device))
    # buffers: the anchors' up/down/left/right neighbours, as shifted copies of the anchor grid
    grid = anchors.view(t, h, w)
    keep = grid.clone()
    keep[:, 1:] |= grid[:, :-1]
    keep[:, :-1] |= grid[:, 1:]
    keep[:, :, 1:] |= grid[:, :, :-1]
    keep[:, :, :-1] |= grid[:, :, 1:]
    keep = keep.view(t, n)
    # too many buffers for the quota: the most object-attended of anchors and buffers first
    over = keep.sum(1) > quota
    trimmed = quota_topk(object_map.float().masked_fill(~keep, float("-inf")), quota)
    keep = torch.where(over[:, None], trimmed, keep)
    registers = quota_topk(deep_map.float().masked_fill(keep, float("-inf")), quota - keep.sum(1))
    return keep | registers


def hiprune_reduce(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], retain: float,
                   alpha: float = DEFAULTS["alpha"], layer_attention: torch.Tensor | None = None,
                   object_layer: int | None = None, **_: object) -> VisualTokens:
    """Keeps, in every frame, its share of round(retain·T·N) tokens: anchors (top attention in an object-centric
    middle vision layer), their four grid neighbours (buffers), and registers (top attention in the deep layer)
    for the rest; the others are dropped. With only the last layer's map, anchors and registers both come
    from it.

    features: [T, N, D]; attention: [T, N] (deep layer); layer_attention: optional [T, Lv, N] per layer.
    """
    t, n = check_inputs(features, attention, retain)
    if attention is None:
        raise ValueError("hiprune needs the attention map")
    if grid_hw[0] * grid_hw[1] != n:
        raise ValueError(f"grid {grid_hw} does not hold {n} tokens")
    object_map, deep_map = attention, attention
    if layer_attention is not None:
        if layer_attention.dim() != 3 or layer_attention.shape[0] != t or layer_attention.shape[2] != n:
            raise ValueError(f"layer_attention must be [{t}, Lv, {n}], got {tuple(layer_attention.shape)}")
        depth = layer_attention.shape[1]
        layer = max(1, round(_OBJECT_DEPTH * depth)) if object_layer is None else object_layer
        if not 1 <= layer <= depth:
            raise ValueError(f"object_layer must be in [1, {depth}], got {layer}")
        object_map, deep_map = layer_attention[:, layer - 1], layer_attention[:, -1]
    return keep_only(features, hiprune_keep(object_map, deep_map, grid_hw, frame_quotas(retain, t, n), alpha),
                     grid_hw)


METHOD = Method("hiprune", PAPER, (PRE_LLM,), hiprune_reduce, DEFAULTS, proportional=False)
