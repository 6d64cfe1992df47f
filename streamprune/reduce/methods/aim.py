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

from streamprune.reduce.inner_cuts import InnerConfig, InnerStep, cut_schedule
from streamprune.reduce.methods.base import INNER, PRE_LLM, Method, assemble, check_inputs, frame_quotas
from streamprune.tokens import VisualTokens

PAPER = ("Zhong, Liu, Li, Wang, AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning, "
         "ICCV 2025 (arXiv 2412.03248)")
# the inner (in-LLM) schedule of the released code, for a 28-layer decoder; used by the inner stage
# (the code's PageRank runs at temperature 0.1 for 5 iterations; the `received` criterion here is one step)
DEFAULTS = {"inner_full_layers": 15, "inner_step": 0.125, "inner_zero_from_layer": 22, "inner_decoder_layers": 28}


def bipartite_match(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ToMe round's matching, for every frame at once. x: [..., m, D] current tokens in order; A = even,
    B = odd indices.

    Returns (src [..., r], dst [..., r]) indices into x's token dim: per frame, the r A tokens whose best B
    partner (cosine) is most similar, most similar first, and those partners (ties to the earlier token).
    """
    m = x.shape[-2]
    unit = F.normalize(x.float(), dim=-1)
    a = torch.arange(0, m, 2, device=x.device)
    b = torch.arange(1, m, 2, device=x.device)
    best, partner = (unit.index_select(-2, a) @ unit.index_select(-2, b).mT).max(-1)  # [..., |A|]
    order = torch.sort(-best, dim=-1, stable=True).indices[..., :r]
    return a[order], b[partner.gather(-1, order)]


def merge_frames(x: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each of G frames' tokens to q by bipartite rounds, all frames in step (same quota, so every
    round removes the same number r from each frame and the shapes stay regular).

    x: [G, N, D]. Returns (positions [G, q] of the representatives, ascending; values [G, q, D] float32;
    rep [G, N] the representative position of every original token).
    """
    g, n, d = x.shape
    device = x.device
    pos = torch.arange(n, device=device).expand(g, n)
    rep, val = pos, x.float()
    frame_offset = torch.arange(g, device=device)[:, None]  # frame g's tokens start at g·m when flattened
    while pos.shape[1] > q:
        m = pos.shape[1]
        r = min(m - q, m // 2)
        src, dst = bipartite_match(val, r)  # [G, r] each
        remap = torch.arange(n, device=device).repeat(g, 1).scatter_(1, pos.gather(1, src), pos.gather(1, dst))
        rep = remap.gather(1, rep)
        # the m − r tokens that stay, in order (a stable sort puts them first without a host sync), and where
        # each token lands among them
        gone = torch.zeros(g, m, dtype=torch.uint8, device=device).scatter_(1, src, 1)
        stay = torch.sort(gone, dim=1, stable=True).indices[:, : m - r]
        slot = (1 - gone).cumsum(1) - 1  # [G, m], valid for the staying tokens
        pos = pos.gather(1, stay)
        # each B token plus the A tokens merged into it (added in match order), over its group's size; row
        # lookups on the flattened frames touch only the rows that move
        flat = val.reshape(g * m, d)
        merged_in = flat.index_select(0, (src + frame_offset * m).flatten())
        val = flat.index_select(0, (stay + frame_offset * m).flatten())
        val.index_add_(0, (slot.gather(1, dst) + frame_offset * (m - r)).flatten(), merged_in)
        count = torch.zeros(g, m - r, device=device).scatter_add_(1, slot.gather(1, dst), torch.ones(g, r, device=device))
        val = val.view(g, m - r, d).div_((1 + count)[..., None])
    return pos, val, rep


def merge_frame(x: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`merge_frames` for one frame. x: [N, D] → (positions [q], values [q, D], rep [N])."""
    pos, val, rep = merge_frames(x[None], q)
    return pos[0], val[0], rep[0]


def aim_reduce(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
               **_: object) -> VisualTokens:
    """Merges, in every frame, the most cosine-similar token pairs (ToMe bipartite matching, A = even, B = odd
    tokens, at most half per round) in rounds until the frame holds its share of round(retain·T·N) tokens;
    a merged token's value is the mean of its pair (AIM's merging before the LLM). Ignores attention.

    features: [T, N, D]. Each output token sits at its B token's frame and position. Frames with the same
    quota (at most two values, `frame_quotas` differ by one) are merged together.
    """
    t, n = check_inputs(features, attention, retain)
    device = features.device
    quota_list = frame_quotas(retain, t, n)
    quotas = torch.tensor(quota_list, device=device)  # the one upload; group indices are found on the device
    first_row = quotas.cumsum(0) - quotas  # where each frame's output tokens start
    rep = torch.full((t, n), -1, dtype=torch.long, device=device)
    dropped = torch.zeros(t, n, dtype=torch.bool, device=device)
    values = torch.empty(sum(quota_list), features.shape[2], dtype=torch.float32, device=device)
    for q in sorted(set(quota_list)):
        size = quota_list.count(q)
        frames = torch.nonzero_static(quotas == q, size=size).squeeze(1)  # static size: no host sync
        if q == 0:  # nothing kept: its tokens are counted against the most similar output token
            dropped[frames] = True
            continue
        _, val, frame_rep = merge_frames(features if size == t else features[frames], q)
        rep[frames] = frames[:, None] * n + frame_rep
        rows = first_row[frames][:, None] + torch.arange(q, device=device)
        values[rows.flatten()] = val.flatten(0, 1)
    return assemble(features, rep, dropped, grid_hw, values=values)


def aim_inner(retain: float, num_layers: int, inner_full_layers: int = DEFAULTS["inner_full_layers"],
              inner_step: float = DEFAULTS["inner_step"], inner_zero_from_layer: int = DEFAULTS["inner_zero_from_layer"],
              inner_decoder_layers: int = DEFAULTS["inner_decoder_layers"], **_: object):
    """AIM's progressive pruning inside the LLM: from layer 15 of 28, every layer keeps 12.5% fewer of the visual
    tokens that entered, by attention received, until none are left at layer 22."""
    layers = tuple(range(inner_full_layers, inner_zero_from_layer + 1))
    shares = tuple(max(0.0, 1 - (k - inner_full_layers + 1) * inner_step) for k in layers)
    cuts = cut_schedule(layers, shares, num_layers, inner_decoder_layers)
    return InnerConfig(steps=tuple(InnerStep(k, ratio, "received", "drop") for k, ratio, _ in cuts))


METHOD = Method("aim", PAPER, (PRE_LLM, INNER), aim_reduce, DEFAULTS, inner=aim_inner)
