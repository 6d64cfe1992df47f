"""`mmtok`: keep the visual tokens that best *cover* both the prompt's text tokens and the visual tokens.

Paper: Sixun Dong, Juhua Hu, Mian Zhang, Ming Yin, Yanjie Fu, Qi Qian, "MMTok: Multimodal Coverage
Maximization for Efficient Inference of VLMs", arXiv 2508.18264. Code: Ironieser/MMTok (README only in the
index) and a port at CCAAttking7/MMTok (`mmtok/core`), read for the formulation below.

Criterion: subset selection as maximum coverage (a facility-location, monotone submodular objective),
solved greedily. Two coverage matrices over candidate visual tokens j:
  P[l, j] = softmax_j(cos(text_l, x_j) / τ_tv) / L   — how well j covers text token l;
  Q[i, j] = softmax_j(cos(x_i, x_j) / τ_vv) / n      — how well j covers visual token i.
With C = [P; α·Q] ([L + n, n]), the greedy step adds the token with the largest gain
Σ_r max(0, C[r, j] − best[r]), then best[r] = max(best[r], C[r, j]). The chosen tokens are kept in
original order, the rest dropped. Defaults from the released code: α = 0.5, τ_tv = 0.02, τ_vv = 0.2.

Cuts: before the LLM (pre-llm), pure pruning. `uses_text=True`: `text` [L, D] is the prompt's token
embeddings in the LLM input space (the released code embeds the question's words with the LLM's own
embedding table, as here; it first strips the question to keywords — `text` is used as given). Without
text the objective is the visual coverage Q alone.

Adaptations, stated plainly: the released code builds Q from the CLIP features before the projector; only
the projected tokens are given here, so Q uses them. The paper selects over one image's tokens; a video is
handled frame by frame with `frame_quotas` (a video-wide pool would cost O(k·(L + T·N)·T·N)), each frame
covering the same text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamprune.reduce.methods.base import PRE_LLM, Method, check_inputs, frame_quotas, keep_only
from streamprune.tokens import VisualTokens

PAPER = ("Dong, Hu, Zhang, Yin, Fu, Qian, MMTok: Multimodal Coverage Maximization for Efficient Inference of "
         "VLMs, arXiv 2508.18264")
DEFAULTS = {"alpha": 0.5, "tv_temperature": 0.02, "vv_temperature": 0.2}


def coverage_matrix(vision: torch.Tensor, text: torch.Tensor | None, alpha: float = DEFAULTS["alpha"],
                    tv_temperature: float = DEFAULTS["tv_temperature"],
                    vv_temperature: float = DEFAULTS["vv_temperature"]) -> torch.Tensor:
    """Rows to cover × candidate visual tokens, for each frame.

    vision: [..., n, D]; text: [L, D] or None. Returns [..., L + n, n] float32 = [P; α·Q] (just Q without
    text, where α would only rescale the objective).
    """
    v = F.normalize(vision.float(), dim=-1)
    q = F.softmax(v @ v.mT / vv_temperature, dim=-1) / v.shape[-2]
    if text is None or text.shape[0] == 0:
        return q
    z = F.normalize(text.float(), dim=-1)
    p = F.softmax(z @ v.mT / tv_temperature, dim=-1) / z.shape[0]
    return torch.cat([p, alpha * q], dim=-2)


def coverage_greedy(cover: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy maximum coverage, every frame in step. cover: [..., R, n] how well each candidate (column)
    covers each row.

    Returns [..., min(k, n)] long picks in selection order; each maximises Σ_r max(0, cover[r, j] − best[r])
    over the unpicked j (ties to the earlier index). A frame with a smaller quota takes a prefix: greedy
    picks never depend on later ones.
    """
    n = cover.shape[-1]
    best = cover.new_zeros(cover.shape[:-1])  # [..., R] each row's coverage so far
    blocked = cover.new_zeros(cover.shape[:-2] + (n,))  # −inf once picked
    picks = []
    excess = torch.empty_like(cover)  # reused every step
    for _ in range(min(k, n)):
        gain = torch.sub(cover, best[..., None], out=excess).clamp_min_(0).sum(-2) + blocked
        j = gain.argmax(-1, keepdim=True)  # [..., 1], stays on the device
        picks.append(j)
        best = torch.maximum(best, cover.gather(-1, j[..., None, :].expand(*best.shape, 1)).squeeze(-1))
        blocked.scatter_(-1, j, float("-inf"))
    if not picks:
        return torch.empty(cover.shape[:-2] + (0,), dtype=torch.long, device=cover.device)
    return torch.cat(picks, dim=-1)


def mmtok_reduce(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
                 *, text: torch.Tensor | None = None, alpha: float = DEFAULTS["alpha"],
                 tv_temperature: float = DEFAULTS["tv_temperature"],
                 vv_temperature: float = DEFAULTS["vv_temperature"], **_: object) -> VisualTokens:
    """Keeps, in every frame, its share of round(retain·T·N) tokens chosen greedily to maximise coverage of the
    prompt's text tokens plus α times coverage of the frame's visual tokens (softmax-of-cosine facility
    location); without text, visual coverage only. The rest are dropped. Ignores attention.

    features: [T, N, D]; text: [L, D] prompt embeddings in the same space, or None. All frames run the greedy
    together for the largest quota; each keeps the first picks its own quota allows.
    """
    t, n = check_inputs(features, attention, retain)
    if text is not None and (text.dim() != 2 or text.shape[1] != features.shape[2]):
        raise ValueError(f"text must be [L, {features.shape[2]}], got {tuple(text.shape)}")
    quotas = frame_quotas(retain, t, n)
    cover = coverage_matrix(features, text, alpha, tv_temperature, vv_temperature)  # [T, L + N, N]
    picks = coverage_greedy(cover, max(quotas))  # [T, max quota]
    rank = torch.arange(picks.shape[1], device=features.device)
    within_quota = rank[None, :] < torch.tensor(quotas, device=features.device)[:, None]
    keep = torch.zeros(t, n, dtype=torch.bool, device=features.device).scatter_(1, picks, within_quota)
    return keep_only(features, keep, grid_hw)


METHOD = Method("mmtok", PAPER, (PRE_LLM,), mmtok_reduce, DEFAULTS, uses_text=True, proportional=False)
