"""`transprune`: TransPrune (Li et al., "TransPrune: Token Transition Pruning for Efficient Large
Vision-Language Model", CVPR 2026, arXiv 2507.20630; code liaolea/TransPrune).

Progressive pruning inside the LLM by how much a token *changes*: Token Transition Variation (TTV), the change
of a visual token's magnitude and direction through a layer, accumulated over middle layers, combined with
Instruction-Guided Attention (IGA), how strongly the instruction's tokens attend to it. The paper's claim is
that TTV avoids attention's positional bias.
Defaults from the authors' LLaVA-1.5 scripts: TTV accumulated over layers 7–12 and cuts at layers 7, 9, 12 of
32 (scaled to the decoder's depth) keeping 0.875, 0.625, 0.125 of the visual tokens.
Adaptations: for a final share `retain` the three shares are the paper's raised to log(retain)/log(0.125)
(the same shape of schedule, ending at `retain`); TTV per layer is |Δ‖h‖|/‖h‖ + (1 − cos(h_in, h_out)) over
the whole decoder layer, accumulated from the previous cut (or two layers before the first), and the score
is the min–max normalised sum of TTV and IGA — our reading of the paper; the exact normalisation in the
released code was not checked here.
"""

from __future__ import annotations

import math

from streamprune.reduce.inner_cuts import InnerConfig, InnerStep, cut_schedule
from streamprune.reduce.methods.base import INNER, Method

PAPER = "Li et al., TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model, CVPR 2026 (arXiv 2507.20630)"
DEFAULTS = {"layers": (7, 9, 12), "shares": (0.875, 0.625, 0.125), "reference_layers": 32}


def transprune_inner(retain: float, num_layers: int, layers: tuple[int, ...] = DEFAULTS["layers"],
                     shares: tuple[float, ...] = DEFAULTS["shares"],
                     reference_layers: int = DEFAULTS["reference_layers"], **_: object):
    """Cuts at three layers, each keeping the visual tokens with the highest TTV + IGA score, until `retain`
    of them are left (drops, inside the LLM)."""
    power = math.log(retain) / math.log(shares[-1])
    cuts = cut_schedule(tuple(layers), tuple(s**power for s in shares), num_layers, reference_layers)
    return InnerConfig(steps=tuple(InnerStep(k, ratio, "transition", "drop") for k, ratio, _ in cuts))

METHOD = Method("transprune", PAPER, (INNER,), None, DEFAULTS, inner=transprune_inner, proportional=False)
