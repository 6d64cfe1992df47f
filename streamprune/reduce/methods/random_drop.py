"""`random`: keep a uniformly random subset of round(retain·T·N) tokens — the floor any method must beat."""

from __future__ import annotations

import torch

from streamprune.reduce.methods.base import PRE_LLM, Method, check_inputs, keep_only, video_budget
from streamprune.tokens import VisualTokens

PAPER = "baseline (uniform random token dropping)"
DEFAULTS = {"seed": 0}


def random_reduce(features: torch.Tensor, attention: torch.Tensor | None, grid_hw: tuple[int, int], retain: float,
                  seed: int = DEFAULTS["seed"], **_: object) -> VisualTokens:
    """Keeps a seeded uniform random sample of round(retain·T·N) tokens over the whole video; the rest are
    dropped. Reproducible for a given seed.

    The sample is drawn on the features' device, so a CUDA run draws another sample than a CPU run."""
    t, n = check_inputs(features, attention, retain)
    device = features.device
    gen = torch.Generator(device=device).manual_seed(seed)
    chosen = torch.randperm(t * n, generator=gen, device=device)[: video_budget(retain, t, n)]
    keep = torch.zeros(t * n, dtype=torch.bool, device=device)
    keep[chosen] = True
    return keep_only(features, keep.view(t, n), grid_hw)


METHOD = Method("random", PAPER, (PRE_LLM,), random_reduce, DEFAULTS, proportional=False)
