"""`fastv`: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764).

Cuts inside the LLM, once: at decoder layer K the visual tokens the last prompt token attends to least in
layer K−1 (head mean) are dropped; survivors keep their original positions. Defaults as the paper: K = 2 of
LLaMA's 32 layers (scaled to the same relative depth of other decoders, which is K = 2 for 24–32 layers),
and the share kept is `retain` (the paper's R = 50% is retain 0.5). Every visual token enters the LLM.
"""

from __future__ import annotations

from streamprune.reduce.inner_cuts import InnerConfig, InnerStep, scaled_layer
from streamprune.reduce.methods.base import INNER, Method

PAPER = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024 (arXiv 2403.06764)"
DEFAULTS = {"layer": 2, "reference_layers": 32}


def fastv_inner(retain: float, num_layers: int, layer: int = DEFAULTS["layer"],
                reference_layers: int = DEFAULTS["reference_layers"], **_: object):
    """Keeps the `retain` share of visual tokens with the highest last-token attention at layer K−1 and drops
    the rest at layer K (one cut, inside the LLM)."""
    return InnerConfig(steps=(InnerStep(scaled_layer(layer, reference_layers, num_layers), 1 - retain, "last", "drop"),))


METHOD = Method("fastv", PAPER, (INNER,), None, DEFAULTS, inner=fastv_inner, proportional=False)
