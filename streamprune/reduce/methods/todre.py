"""`todre` (outer stage): keep a diverse subset of visual tokens by greedy k-center before the LLM.

Paper: Duo Li, Zuhao Yang, Shijian Lu (v2 adds Xiaoqin Zhang, Ling Shao), "ToDRE: Visual Token Pruning via
Diversity and Task Awareness for Efficient Large Vision-Language Models" (v1, May 2025; v2, Nov 2025,
retitled "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance"), arXiv 2505.18757.
No code was found in the index; this follows the abstract (v1) and says where it has to guess.

Criterion (stage 1, after the vision encoder): a greedy k-center algorithm picks a small subset of diverse
visual tokens — each next center is the token farthest from its nearest center so far (Gonzalez's
2-approximation), distance 1 − cos on the projected tokens. v2 of the paper describes this stage as
"greedy max-sum diversification"; the brief and v1 say k-center, which is what this implements.
Stage 2 (inside the LLM, `todre_inner`): at a decoder layer, visual tokens that receive little
attention from the text ("information migration": by then the task-relevant visual information has moved
into the text tokens) are removed — the abstract says *all* visual tokens in "certain" layers.

Cuts: before the LLM (pre-llm: keeps `retain`, the paper's 90% pruning is retain 0.1) and inside it (inner:
every remaining visual token leaves at `inner_layer`, so the visual tokens after the last cut are 0).
Defaults: the abstract says the inner stage prunes all remaining visual tokens (ratio 1.0) "within certain
decoder layers" without naming the layer, and the paper body was not reachable here; `inner_layer` = None
means our choice, HoliTom's inner depth (18 of 28, scaled) — set it from the paper before relying on it.

Guesses, stated plainly: the first center is not given in the abstract; we start from the token with the
highest attention received (`attention`; the mean token's farthest neighbour if no map is given) — the
k-center guarantee holds for any start. Selection runs over the whole video's T·N tokens (like DivPrune),
so the budget round(retain·T·N) is met exactly and frame-to-frame repeats are not kept twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamprune.reduce.inner_cuts import InnerConfig, InnerStep, default_layer
from streamprune.reduce.methods.base import INNER, PRE_LLM, Method, check_inputs, keep_only, video_budget
from streamprune.reduce.methods.divprune import cosine_distance, farthest_points
from streamprune.tokens import VisualTokens

PAPER = ("Li, Yang, Lu, ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large "
         "Vision-Language Models, arXiv 2505.18757")
# inner stage (text→visual relevance inside the LLM); the abstract: "prunes all visual tokens within certain
# LLM decoder layers" — the layer is not stated in the sources reachable here
DEFAULTS = {"inner_layer": None, "inner_ratio": 1.0}


def first_center(flat: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
    """The k-center start. flat: [n, D]; attention: [n] or None. Highest attention received, else the token
    least like the mean token. Returns a 0-d long tensor on flat's device."""
    if attention is not None:
        return attention.float().argmax()
    mean = F.normalize(flat.float().mean(0), dim=0)
    return (F.normalize(flat.float(), dim=-1) @ mean).argmin()


def k_center(flat: torch.Tensor, k: int, first: int | torch.Tensor) -> torch.Tensor:
    """Greedy k-center on cosine distance. flat: [n, D]. Returns [k] long centers in selection order."""
    dist = cosine_distance(flat).fill_diagonal_(float("-inf"))  # its own matrix: no copy for the −inf diagonal
    return farthest_points(dist, k, first)


def todre_reduce(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
                 **_: object) -> VisualTokens:
    """Keeps round(retain·T·N) tokens chosen over the whole video by greedy k-center on cosine distance (start:
    the highest-attention token, then always the token farthest from every kept one), ToDRE's diversity stage
    before the LLM; the rest are dropped.

    features: [T, N, D]; attention: [T, N] (only picks the first center). Kept tokens stay in place.
    """
    t, n = check_inputs(features, attention, retain)
    flat = features.reshape(t * n, -1)
    start = first_center(flat, None if attention is None else attention.flatten())
    centers = k_center(flat, video_budget(retain, t, n), start)
    keep = torch.zeros(t * n, dtype=torch.bool, device=features.device).index_fill_(0, centers, True)
    return keep_only(features, keep.view(t, n), grid_hw)


def todre_inner(retain: float, num_layers: int, inner_layer: int | None = DEFAULTS["inner_layer"],
                inner_ratio: float = DEFAULTS["inner_ratio"], **_: object):
    """ToDRE's task-relevance stage: at a late layer the visual tokens the instruction attends to least leave
    (all of them at the default ratio 1.0, once their information has migrated into the text tokens)."""
    layer = default_layer(num_layers) if inner_layer is None else inner_layer
    return InnerConfig(steps=(InnerStep(layer, inner_ratio, "text", "drop"),))


METHOD = Method("todre", PAPER, (PRE_LLM, INNER), todre_reduce, DEFAULTS, inner=todre_inner, proportional=False)
