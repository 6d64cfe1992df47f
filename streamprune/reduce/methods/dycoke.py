"""`dycoke`: DyCoke's temporal token merging (TTM) before the LLM; its KV-cache pruning is a separate stage.

Paper: Keda Tao, Can Qin, Haoxuan You, Yang Sui, Huan Wang, "DyCoke: Dynamic Compression of Tokens for Fast
Video Large Language Models", CVPR 2025 (arXiv 2411.15024); code KD-TAO/DyCoke (`llava_arch.py::dycole_ttm`).

TTM criterion (this module). Frames are cut into windows of 4. In a window [w, w+3], frame w is kept whole;
every later frame keeps its tokens *least* cosine-similar to the same position in its reference frame and
drops the rest. The references are the released code's: frame w+1 and frame w+2 are compared with frame w,
frame w+3 with frame w+2 (all full, unpruned features). Despite the name, the similar tokens are dropped, not
averaged (Fate DROPPED); kept tokens keep their own values.

KV-cache stage (built separately, added to this record as `split=`): during decoding, at layer L the attention
of the last query over the image tokens (layer L−1, mean over heads) picks the top int(img_len·(1−P)) image KV
entries for layers ≥ L; the pick is refreshed only when that attention's cosine to the previous step's falls
below 0.9. Its defaults (README / reported table: L = 3, P = 0.7; builder.py and lmms-eval use P = 0.8) are in
`DEFAULTS`; this function ignores them.

Budget. The paper fixes K (0.7 in lmms-eval) and keeps int((1−K)·N) tokens in each non-first frame. Here K
follows from `retain` so the output has exactly B = round(retain·T·N) tokens: with A = ⌈T/4⌉ window-first
frames, K = 1 − (B − A·N) / ((T − A)·N), and the B − A·N tokens are spread over the T − A pruned frames by
largest remainder (so per frame ⌊(1−K)·N⌋ or ⌈(1−K)·N⌉ instead of int((1−K)·N) everywhere).
Below B = A·N (retain < A/T, about 1/4) TTM cannot reach the budget even at K = 1. Then the pruned frames keep
nothing and the window-first frames share B by largest remainder, each keeping its tokens least similar to the
previous window's first frame (the TTM rule one level up); frame 0, which has no predecessor, keeps evenly
spaced grid positions. This regime is an extension, not the paper.

Departures from the released code, which are quirks rather than the method: it re-prunes frame i+2 only for
windows with i < T−4 (so when T is a multiple of 4 the last window keeps frames T−4 and T−2 whole) and
silently loses the last frame when T is odd; here every window, including a trailing partial one, follows the
same rule.
"""

from __future__ import annotations

import torch

from streamprune.reduce.holitom import allocate_budget, host_ints
from streamprune.reduce.inner_cuts import InnerConfig, KVPrune, scaled_layer
from streamprune.reduce.methods.base import (
    KV_CACHE,
    PRE_LLM,
    Method,
    check_inputs,
    keep_only,
    quota_topk,
    video_budget,
)
from streamprune.tokens import VisualTokens

PAPER = ("Tao et al., DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models, CVPR 2025 "
         "(arXiv 2411.15024)")
WINDOW = 4
DEFAULTS = {"window": WINDOW, "kv_layer": 3, "kv_prune": 0.7, "kv_refresh_similarity": 0.9}


def reference_frames(t: int, window: int = WINDOW) -> list[int | None]:
    """For each of T frames, the frame its tokens are compared with; None for a window's first frame.

    Offsets 1 and 2 of a window look at offset 0, offset 3 at offset 2 (DyCoke's pairs (i, i+1), then frame
    i+2 re-pruned against frame i). Generalised: odd offsets look at the frame before, even offsets at the
    window start.
    """
    refs: list[int | None] = []
    for f in range(t):
        offset = f % window
        refs.append(None if offset == 0 else f - 1 if offset % 2 else f - offset)
    return refs


def paired_similarity(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token of `first` with the token at the same index of `second`, in float32.

    first, second: [P, N, D] → [P, N]. All P·N dot products run as one flat batch, so each pair's value is
    the same whether it is computed alone or with others.
    """
    p, n, d = first.shape
    a, b = first.float(), second.float()
    dots = torch.einsum("tnd,tnd->tn", a.reshape(1, p * n, d), b.reshape(1, p * n, d)).view(p, n)
    return dots / (a.norm(dim=-1).clamp_min(1e-12) * b.norm(dim=-1).clamp_min(1e-12))


def spread_positions(n: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n] bool with k evenly spaced positions set (raster order), on `device`."""
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    keep[(torch.arange(k, device=device) * n) // max(k, 1)] = True
    return keep


def dycoke_ttm(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int],
               retain: float, window: int = WINDOW, **_: object) -> VisualTokens:
    """In windows of 4 frames keeps the first frame whole and, in the others, the tokens least similar to the
    same position of their reference frame (frame 1 and 2 vs 0, frame 3 vs 2); the rest are dropped.

    features: [T, N, D]; attention unused. Returns exactly round(retain·T·N) tokens; K is derived from retain
    (module docstring). The frames that keep part of their tokens are scored at once: one batch of
    similarities to each frame's reference and one per-frame top-k (ties to the earlier position).
    """
    t, n = check_inputs(features, attention, retain)
    device = features.device
    budget = video_budget(retain, t, n)
    refs = reference_frames(t, window)
    firsts = [f for f in range(t) if refs[f] is None]
    others = [f for f in range(t) if refs[f] is not None]
    quotas = [n] * t  # window starts: whole (first regime) or their share (second regime)
    if budget >= len(firsts) * n:  # the paper's regime: window starts whole, K from the rest of the budget
        reference = refs
        for f, quota in zip(others, allocate_budget([n] * len(others), budget - len(firsts) * n), strict=True):
            quotas[f] = quota
    else:  # below the TTM floor: only window starts, pruned against the previous window start
        reference = [None] * t
        for f in others:
            quotas[f] = 0
        for previous, f in zip(firsts[:-1], firsts[1:], strict=True):
            reference[f] = previous
        firsts_quota = allocate_budget([n] * len(firsts), budget)
        for f, quota in zip(firsts, firsts_quota, strict=True):
            quotas[f] = quota
    # only frames that keep part of their tokens are scored, all in one batch; frame 0 never has a reference
    # and spreads its quota over the grid when it cannot keep everything
    keep = torch.zeros(t, n, dtype=torch.bool, device=device)
    scored = [f for f in range(t) if 0 < quotas[f] < n and reference[f] is not None]
    whole = [f for f in range(t) if quotas[f] >= n]
    layout = host_ints([*scored, *(reference[f] for f in scored), *(quotas[f] for f in scored), *whole], device)
    frames, refs_of, scored_quota = layout[: 3 * len(scored)].view(3, len(scored))
    if scored:
        similarity = paired_similarity(features[refs_of], features[frames])
        keep[frames] = quota_topk(-similarity, scored_quota)
    keep[layout[3 * len(scored) :]] = True
    if 0 < quotas[0] < n:
        keep[0] = spread_positions(n, quotas[0], device)
    return keep_only(features, keep, grid_hw)


def dycoke_inner(retain: float, num_layers: int, kv_layer: int = DEFAULTS["kv_layer"],
                 kv_prune: float = DEFAULTS["kv_prune"], kv_refresh_similarity: float = DEFAULTS["kv_refresh_similarity"],
                 **_: object):
    """DyCoke's second stage: dynamic KV-cache pruning while decoding (layer L = 3 of LLaVA-OV-7B's 28, scaled to
    the decoder's depth); the prefill is untouched."""
    return InnerConfig(kv=KVPrune(layer=scaled_layer(kv_layer, 28, num_layers), ratio=kv_prune,
                                  refresh=kv_refresh_similarity))


METHOD = Method("dycoke", PAPER, (PRE_LLM, KV_CACHE), dycoke_ttm, DEFAULTS, inner=dycoke_inner, proportional=False)
