"""`aim` (outer stage): merge the most similar visual tokens of each frame, in bipartite rounds, to the budget.

Paper: Yiwu Zhong, Zhuoming Liu, Yin Li, Liwei Wang, "AIM: Adaptive Inference of Multi-Modal LLMs via Token
Merging and Pruning", ICCV 2025 (arXiv 2412.03248). Code: LaVi-Lab/AIM (read in dragonlzm/AIM:
`llava/model/token_merge.py`, `llava/model/llava_arch.py`, `.../qwen2/modeling_qwen2.py`).

Criterion (before the LLM): ToMe-style bipartite soft matching on the projected (2×2-pooled) tokens of each
frame — merging never crosses frames. In a round the current tokens alternate into sets A (even) and B (odd);
each A token finds its most cosine-similar B token; the r A tokens with the most similar partners are merged
into them, the value becoming the plain mean of the B token and the A tokens merged into it this round
(the code's `scatter_reduce(..., "mean")`). A round removes at most half the tokens, so rounds repeat —
the code runs r = N/2 then N/4, keeping 25% — here until the frame's quota is met exactly.
Merged tokens are MERGED (their values count), nothing is dropped.

Cuts: before the LLM (pre-llm, this module: keeps `retain`) and inside it (inner, `aim_inner`: progressive
pruning down to no visual token, so at equal `retain` AIM spends fewer FLOPs than outer-only methods —
compare on the FLOPs axis).
Inner-stage defaults in DEFAULTS, from the released Qwen2 code (LLaVA-OV-7B, 28 decoder layers): visual
tokens are all kept through layer 14 (`inner_full_layers` = 15); from the output of layer 14 on, after every
layer the kept fraction of the visual tokens that entered the LLM drops by `inner_step` = 0.125 (87.5% for
layer 15, …, 12.5% for layer 21), and layers ≥ 22 (`inner_zero_from_layer`) see no visual tokens. The
importance is PageRank over the layer's full causal attention logits (all queries, text and visual):
softmax(logits/τ) with τ = 0.1, 5 power iterations from uniform (no damping), heads combined by root mean
square; text tokens (system prompt and question) are always protected. Adaptations inside the LLM: the
importance is the `received` criterion — mean attention each visual token receives from every prompt token
(head mean), i.e. one PageRank step from uniform at temperature 1 — and the cuts remove tokens (the code masks
them), at the schedule's layers scaled to the decoder's depth (cuts landing on one layer fold together).

Departures, stated plainly: the reference concatenates [unmerged A, B] after a round, which reorders the
tokens the next round alternates over; here tokens stay in raster order so A/B stay spatially interleaved.
The budget round(retain·T·N) is split over frames by `frame_quotas` and each frame is merged to exactly its
quota (the paper's fixed halvings give 50%, 25%, … only). A frame with quota 0 keeps nothing; its tokens
are counted against the most similar output token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamprune.reduce.methods.base import INNER, PRE_LLM, Method, assemble, check_inputs, frame_quotas
from streamprune.tokens import VisualTokens

PAPER = ("Zhong, Liu, Li, Wang, AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning, "
         "ICCV 2025 (arXiv 2412.03248)")
# the inner (in-LLM) schedule of the released code, for a 28-layer decoder; used by the inner stage
# (the code's PageRank runs at temperature 0.1 for 5 iterations; the `received` criterion here is one step)
DEFAULTS = {"inner_full_layers": 15, "inner_step": 0.125, "inner_zero_from_layer": 22, "inner_decoder_layers": 28}


def bipartite_match(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ToMe round's matching. x: [m, D] current tokens in order; A = even, B = odd indices.

    Returns (src [r], dst [r]) indices into x: the r A tokens whose best B partner (cosine) is most similar,
    most similar first, and those partners (ties to the earlier token).
    """
    unit = F.normalize(x.float(), dim=-1)
    a, b = torch.arange(0, len(x), 2), torch.arange(1, len(x), 2)
    best, partner = (unit[a] @ unit[b].T).max(-1)
    order = torch.sort(-best, stable=True).indices[:r]
    return a[order], b[partner[order]]


def merge_frame(x: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge one frame's tokens to q by bipartite rounds.

    x: [N, D]. Returns (positions [q] of the representatives, ascending; values [q, D]; rep [N] the
    representative position of every original token).
    """
    n = x.shape[0]
    pos, val, rep = torch.arange(n), x.float(), torch.arange(n)
    while len(pos) > q:
        r = min(len(pos) - q, len(pos) // 2)
        src, dst = bipartite_match(val, r)
        count = torch.bincount(dst, minlength=len(pos))
        total = val.clone().index_add_(0, dst, val[src])  # B token plus the A tokens merged into it
        val = total / (1 + count)[:, None]
        remap = torch.arange(n)
        remap[pos[src]] = pos[dst]
        rep = remap[rep]
        stay = torch.ones(len(pos), dtype=torch.bool)
        stay[src] = False
        pos, val = pos[stay], val[stay]
    return pos, val, rep


def aim_reduce(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
               **_: object) -> VisualTokens:
    """Merges, in every frame, the most cosine-similar token pairs (ToMe bipartite matching, A = even, B = odd
    tokens, at most half per round) in rounds until the frame holds its share of round(retain·T·N) tokens;
    a merged token's value is the mean of its pair (AIM's merging before the LLM). Ignores attention.

    features: [T, N, D]. Each output token sits at its B token's frame and position.
    """
    t, n = check_inputs(features, attention, retain)
    rep = torch.full((t, n), -1, dtype=torch.long)
    dropped = torch.zeros(t, n, dtype=torch.bool)
    values = []
    for f, q in enumerate(frame_quotas(retain, t, n)):
        if q == 0:
            dropped[f] = True
            continue
        _, val, frame_rep = merge_frame(features[f], q)
        rep[f] = f * n + frame_rep
        values.append(val)
    return assemble(features, rep, dropped, grid_hw, values=torch.cat(values))


def aim_inner(retain: float, num_layers: int, inner_full_layers: int = DEFAULTS["inner_full_layers"],
              inner_step: float = DEFAULTS["inner_step"], inner_zero_from_layer: int = DEFAULTS["inner_zero_from_layer"],
              inner_decoder_layers: int = DEFAULTS["inner_decoder_layers"], **_: object):
    """AIM's progressive pruning inside the LLM: from layer 15 of 28, every layer keeps 12.5% fewer of the visual
    tokens that entered, by attention received, until none are left at layer 22."""
    from streamprune.models.inner_stage import InnerConfig, InnerStep, cut_schedule

    layers = tuple(range(inner_full_layers, inner_zero_from_layer + 1))
    shares = tuple(max(0.0, 1 - (k - inner_full_layers + 1) * inner_step) for k in layers)
    cuts = cut_schedule(layers, shares, num_layers, inner_decoder_layers)
    return InnerConfig(steps=tuple(InnerStep(k, ratio, "received", "drop") for k, ratio, _ in cuts))


METHOD = Method("aim", PAPER, (PRE_LLM, INNER), aim_reduce, DEFAULTS, inner=aim_inner)
