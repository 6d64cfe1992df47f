"""`feather`: FEATHER (Endo, Wang, Yeung-Levy, "Feather the Throttle: Revisiting Visual Token Pruning for
Vision-Language Model Acceleration", ICCV 2025, arXiv 2412.13180; code markendo/FEATHER).

FastV's criterion, fixed and run in two stages inside the LLM. The paper finds FastV's last-token attention
is biased by RoPE toward the bottom of the image, so the criterion is the last prompt token's attention
computed *without* rotary embeddings (`last-norope`); stage 1 also keeps uniformly strided tokens so every
region stays covered; stage 2, deeper, re-ranks the survivors by the same criterion.
Defaults from the authors' script (`eval_feather.sh`): layers 8 and 16 of LLaMA-2-7B's 32 (scaled to the
decoder's depth), r = 0.7 (stage 1 keeps 0.3 by attention ∪ a stride-3 grid, stage 2 keeps 0.3² = 0.09).
Adaptations, so methods compare at equal budgets: for a final share `retain`, stage 1 keeps √retain of the
visual tokens and stage 2 `retain` (the paper's geometric schedule, 0.3 → 0.09, at other ratios); the
uniform tokens are a 1/stride² share of the visual tokens taken at an even stride over the whole video's
visual sequence (the reference strides each image's 2-D grid) and count inside stage 1's budget rather than
on top of it.
"""

from __future__ import annotations

import math

from streamprune.reduce.inner_cuts import InnerConfig, InnerStep, cut_schedule
from streamprune.reduce.methods.base import INNER, Method

PAPER = "Endo et al., Feather the Throttle: Revisiting Visual Token Pruning for VLM Acceleration, ICCV 2025 (arXiv 2412.13180)"
DEFAULTS = {"layers": (8, 16), "reference_layers": 32, "stride": 3}


def feather_inner(retain: float, num_layers: int, layers: tuple[int, int] = DEFAULTS["layers"],
                  reference_layers: int = DEFAULTS["reference_layers"], stride: int = DEFAULTS["stride"], **_: object):
    """Stage 1 keeps √retain of the visual tokens (uniformly strided ones plus the top by RoPE-free last-token
    attention), stage 2 keeps `retain` of them by the same criterion; both drop, inside the LLM."""
    share = math.sqrt(retain)
    uniform = min(1.0, 1 / (stride * stride) / share)
    cuts = cut_schedule(tuple(layers), (share, retain), num_layers, reference_layers)
    return InnerConfig(steps=tuple(InnerStep(k, ratio, "last-norope", "drop", uniform=uniform if i == 0 and len(cuts) > 1 else 0.0)
                                   for k, ratio, i in cuts))

METHOD = Method("feather", PAPER, (INNER,), None, DEFAULTS, inner=feather_inner, proportional=False)
