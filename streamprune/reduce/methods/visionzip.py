"""`visionzip`: per frame, top-attention *dominant* tokens plus *contextual* tokens that absorb the rest.

Paper: Senqiao Yang, Yukang Chen, Zhuotao Tian, Chengyao Wang, Jingyao Li, Bei Yu, Jiaya Jia, "VisionZip:
Longer is Better but Not Necessary in Vision Language Models", CVPR 2025 (arXiv 2412.04467); code
dvlab-research/VisionZip.

Criterion, per frame with quota q (the video budget split over frames by `frame_quotas`):
- dominant: the round(q · dominant_ratio) tokens that received the most attention, kept as they are;
- contextual: the other q − dominant. Among the remaining tokens (raster order), targets are taken at a
  uniform stride max(1, R // C) (R remaining, C contextual); every other remaining token joins its most
  cosine-similar target, and the target becomes the mean of itself and its members (Fate MERGED for the
  members).

Where it cuts: before the LLM, frame by frame (VisionZip works image by image inside the vision encoder).
Defaults: dominant_ratio = 54/64, the split of HoliTom's LLaVA-OneVision / LLaVA-Video port (env
`DOMINANT_RATIO`), i.e. VisionZip's LLaVA-1.5 setting of 54 dominant + 10 contextual tokens.

Adaptations to these models, stated plainly:
- SigLIP has no [CLS]: "CLS attention" is the mean attention each token received in the vision tower's last
  used layer (as HoliTom's port does), and there is no CLS token to keep among the dominant ones;
- similarity is the cosine of the tokens' features; VisionZip compares the attention keys of its layer, which
  these outer functions do not see;
- merged value: by default the plain mean of target and members (`contextual_merge="mean"`). The released CLIP
  code computes target + mean(members), which doubles the norm of a token that enters the LLM after the
  projector; `contextual_merge="add"` reproduces it;
- the count is exact: round(retain·T·N) tokens, each frame's share by largest remainder (the paper fixes a
  token count per image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamprune.reduce.methods.base import PRE_LLM, Method, assemble, check_inputs, frame_quotas, topk_mask
from streamprune.tokens import VisualTokens

PAPER = ("Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025 "
         "(arXiv 2412.04467)")
DEFAULTS = {"dominant_ratio": 54 / 64, "contextual_merge": "mean"}


def split_quota(quota: int, dominant_ratio: float) -> tuple[int, int]:
    """A frame's quota as (dominant, contextual) counts: round(quota·ratio) dominant, the rest contextual."""
    dominant = min(quota, max(0, round(quota * dominant_ratio)))
    return dominant, quota - dominant


def stride_targets(remaining: int, contextual: int) -> torch.Tensor:
    """[contextual] indices into the `remaining` non-dominant tokens (raster order), taken at VisionZip's
    uniform stride max(1, remaining // contextual)."""
    step = max(1, remaining // contextual)
    return torch.arange(0, remaining, step)[:contextual]


def assign_to_targets(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row of x [R, D] → index (into `targets`) of its most cosine-similar target; targets map to
    themselves. Returns [R] long."""
    unit = F.normalize(x.float(), dim=-1)
    assign = (unit @ unit[targets].T).argmax(-1)
    assign[targets] = torch.arange(len(targets))
    return assign


def visionzip(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], retain: float,
              dominant_ratio: float = DEFAULTS["dominant_ratio"],
              contextual_merge: str = DEFAULTS["contextual_merge"], **_: object) -> VisualTokens:
    """Keeps each frame's top-attention tokens (dominant_ratio of its quota) and merges the rest into
    contextual tokens at uniformly strided targets, each the mean of the target and its most similar remaining
    tokens.

    features: [T, N, D]; attention: [T, N] attention each token received. Returns round(retain·T·N) tokens.
    """
    t, n = check_inputs(features, attention, retain)
    if attention is None:
        raise ValueError("visionzip needs the attention each token received")
    if contextual_merge not in ("mean", "add"):
        raise ValueError(f"contextual_merge must be 'mean' or 'add', got {contextual_merge!r}")
    rep = torch.arange(t * n).view(t, n).clone()
    dropped = torch.zeros(t, n, dtype=torch.bool)
    flat = features.reshape(t * n, -1).float()
    added: dict[int, torch.Tensor] = {}  # representative → value, for contextual_merge="add"
    for f, quota in enumerate(frame_quotas(retain, t, n)):
        n_dominant, n_contextual = split_quota(quota, dominant_ratio)
        dominant = topk_mask(attention[f], n_dominant)
        rest = (~dominant).nonzero().squeeze(1)  # raster order
        if n_contextual == 0:  # nothing to merge into: the rest is pruned
            dropped[f, rest] = True
            rep[f, rest] = -1
            continue
        targets = stride_targets(len(rest), n_contextual)
        assign = assign_to_targets(features[f, rest], targets)
        rep[f, rest] = f * n + rest[targets][assign]
        if contextual_merge == "add":
            for j, target in enumerate(rest[targets].tolist()):
                members = rest[(assign == j) & (rest != target)]
                extra = flat[f * n + members].mean(0) if len(members) else torch.zeros_like(flat[0])
                added[f * n + target] = flat[f * n + target] + extra
    values = None
    if added:
        reps = ((rep.flatten() == torch.arange(t * n)) & ~dropped.flatten()).nonzero().squeeze(1).tolist()
        values = torch.stack([added.get(r, flat[r]) for r in reps])
    return assemble(features, rep, dropped, grid_hw, values=values)


METHOD = Method("visionzip", PAPER, (PRE_LLM,), visionzip, DEFAULTS)
