"""`visionzip`: per frame, top-attention *dominant* tokens plus *contextual* tokens that absorb the rest.

Paper: Senqiao Yang, Yukang Chen, Zhuotao Tian, Chengyao Wang, Jingyao Li, Bei Yu, Jiaya Jia, "VisionZip:
Longer is Better but Not Necessary in Vision Language Models", CVPR 2025 (arXiv 2412.04467); code
dvlab-research/VisionZip.

Criterion, per frame with quota q (the video budget split over frames by `frame_quotas`):
- dominant: the ⌊q · dominant_ratio⌋ tokens that received the most attention, kept as they are (the released
  code's int(); at HoliTom's setting, 196 tokens per frame and retain 0.1, a quota of 20 gives 16, not 17);
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

import numpy as np
import torch
import torch.nn.functional as F

from streamprune.reduce.holitom import host_ints
from streamprune.reduce.methods.base import PRE_LLM, Method, assemble, check_inputs, frame_quotas, quota_topk
from streamprune.tokens import VisualTokens

PAPER = ("Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025 "
         "(arXiv 2412.04467)")
DEFAULTS = {"dominant_ratio": 54 / 64, "contextual_merge": "mean"}


def split_quota(quota: int, dominant_ratio: float) -> tuple[int, int]:
    """A frame's quota as (dominant, contextual) counts: ⌊quota·ratio⌋ dominant (the release's int()), the rest
    contextual."""
    dominant = min(quota, max(0, int(quota * dominant_ratio)))
    return dominant, quota - dominant


def stride_targets(remaining: int, contextual: int) -> list[int]:
    """[contextual] indices into the `remaining` non-dominant tokens (raster order), taken at VisionZip's
    uniform stride max(1, remaining // contextual)."""
    step = max(1, remaining // contextual)
    return list(range(0, remaining, step))[:contextual]


def assign_to_targets(x: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each row of x [..., R, D] → index (into `targets` [..., C]) of its most cosine-similar target; targets
    map to themselves. valid: optional [..., C] bool, targets that exist (padding ones are never chosen and
    must not map to themselves). Returns [..., R] long."""
    unit = F.normalize(x.float(), dim=-1)
    target_unit = unit.gather(-2, targets[..., None].expand(*targets.shape, unit.shape[-1]))
    sim = unit @ target_unit.transpose(-1, -2)  # [..., R, C]
    if valid is not None:
        sim = sim.masked_fill(~valid[..., None, :], float("-inf"))
    assign = sim.argmax(-1)
    own = torch.arange(targets.shape[-1], device=x.device).expand_as(targets)
    if valid is None:
        return assign.scatter_(-1, targets, own)
    # padding targets write into a spare column that is cut off
    spare = assign.new_zeros(*assign.shape[:-1], 1)
    slots = torch.where(valid, targets, assign.shape[-1])
    return torch.cat([assign, spare], -1).scatter_(-1, slots, own)[..., :-1]


def visionzip(features: torch.Tensor, attention: torch.Tensor, grid_hw: tuple[int, int], retain: float,
              dominant_ratio: float = DEFAULTS["dominant_ratio"],
              contextual_merge: str = DEFAULTS["contextual_merge"], **_: object) -> VisualTokens:
    """Keeps each frame's top-attention tokens (dominant_ratio of its quota) and merges the rest into
    contextual tokens at uniformly strided targets, each the mean of the target and its most similar remaining
    tokens.

    features: [T, N, D]; attention: [T, N] attention each token received. Returns round(retain·T·N) tokens.
    All frames are handled together: one top-k for the dominant tokens (ties to the earlier position), one
    batched similarity of every remaining token to its frame's targets.
    """
    t, n = check_inputs(features, attention, retain)
    if attention is None:
        raise ValueError("visionzip needs the attention each token received")
    if contextual_merge not in ("mean", "add"):
        raise ValueError(f"contextual_merge must be 'mean' or 'add', got {contextual_merge!r}")
    device = features.device
    split = [split_quota(q, dominant_ratio) for q in frame_quotas(retain, t, n)]
    targets = [stride_targets(n - d, c) if c else [] for d, c in split]
    # host layout, one copy: per frame its non-dominant count, then its targets (indices into its
    # non-dominant tokens), padded with −1 to the frame with the most
    layout = np.full((t, 1 + max(1, *map(len, targets))), -1, dtype=np.int64)
    for f, ((d, _), picks) in enumerate(zip(split, targets, strict=True)):
        layout[f, 0] = n - d
        layout[f, 1 : 1 + len(picks)] = picks
    layout = host_ints(layout, device)
    remaining, valid, target_rank = layout[:, 0], layout[:, 1:] >= 0, layout[:, 1:].clamp(min=0)

    dominant = quota_topk(attention, n - remaining)
    # row f: its non-dominant positions in raster order (the first remaining[f]), then its dominant ones
    rest = torch.sort(dominant.to(torch.uint8), dim=1, stable=True).indices  # [T, N]
    target_pos = rest.gather(1, target_rank)  # [T, W] grid positions of each frame's targets
    assign = assign_to_targets(features, target_pos, valid)  # [T, N]: every token's nearest target of its frame
    frames = torch.arange(t, device=device)[:, None]
    own = torch.arange(n, device=device).expand(t, n)
    rep = frames * n + torch.where(dominant, own, target_pos.gather(1, assign))
    dropped = ~dominant & ~valid.any(1, keepdim=True)  # no contextual token in the frame: the rest is pruned
    rep = rep.masked_fill(dropped, -1)
    values = _target_plus_member_mean(features, rep) if contextual_merge == "add" else None
    return assemble(features, rep, dropped, grid_hw, values=values)


def _target_plus_member_mean(features: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
    """The released CLIP code's contextual value: target + mean of its members (the target itself excluded;
    + 0 without members), float32, one row per representative in output order. features: [T, N, D]; rep:
    [T, N] (−1 dropped)."""
    t, n, d = features.shape
    flat = features.reshape(t * n, d).float()
    rep = rep.flatten()
    own = torch.arange(t * n, device=features.device)
    group = torch.where((rep >= 0) & (rep != own), rep, t * n)  # members into their target's row, others spare
    total = flat.new_zeros(t * n + 1, d).index_add_(0, group, flat)[:-1]
    count = torch.zeros(t * n + 1, dtype=torch.long, device=features.device).index_add_(
        0, group, torch.ones_like(group))[:-1]
    added = flat + total / count.clamp(min=1)[:, None]
    return added[rep == own]  # representatives, frame-major raster order (one host sync)


METHOD = Method("visionzip", PAPER, (PRE_LLM,), visionzip, DEFAULTS)
