"""What a method cuts inside the LLM, described: pure data and arithmetic, no model.

`InnerConfig` holds a run's inner-LLM reduction (one mode at one layer, a method's own schedule of
`InnerStep`s, or DyCoke's decode-time `KVPrune`); `cut_schedule` / `scaled_layer` / `default_layer` place a
paper's layers on a decoder of another depth; `validate` checks a config against the decoder depth and
`method_inner` combines the user's config with a method's own cuts. Methods (`streamprune.reduce.methods`)
build these; `streamprune.models.inner_stage` executes them on a decoder. Nothing here imports
`streamprune.models` (a test checks that of the whole `reduce` package).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from streamprune.errors import ConfigError
from streamprune.reduce.inner import MERGES, MODES, InnerStep, mode_step

__all__ = ["InnerConfig", "InnerStep", "KVPrune", "cut_schedule", "default_layer", "method_inner", "scaled_layer",
           "validate"]


@dataclass
class KVPrune:
    """DyCoke's dynamic KV-cache pruning during decoding: at every decode step, layers ≥ `layer` attend only
    to the (1 − `ratio`) image tokens the current token attends to most in layer `layer` − 1; the choice is
    kept while that attention stays similar (cosine ≥ `refresh`) and recomputed when it moves."""

    layer: int = 3
    ratio: float = 0.8  # P: share of the image KV left out each step
    refresh: float = 0.9


@dataclass
class InnerConfig:
    mode: str = "none"  # holitom | similarity | fastv | none
    layer: int | None = None  # K; None → proportional to HoliTom's 18 of 28
    ratio: float = 0.5  # fraction of visual tokens removed at K
    merge: str = "mean"  # mean | pairwise (holitom and similarity)
    # add log(size) to the attention logits of tokens that stand for `size` originals (ToMe). On by
    # default: it is exact for duplicated tokens and lowered the first-token KL by 17–32% in
    # benchmarks/bench_fidelity.py, for at most ~18% more prefill time (benchmarks/bench_proportional.py)
    proportional: bool = True
    steps: tuple[InnerStep, ...] = ()  # a method's own schedule (several cuts); replaces mode/layer/ratio
    kv: KVPrune | None = None  # decode-time KV-cache pruning (DyCoke)

    @property
    def merging(self) -> bool:
        """Some cut inside the LLM (at one or more layers)."""
        return bool(self.steps) or (self.mode != "none" and self.ratio > 0)

    @property
    def active(self) -> bool:
        """Worth installing: a cut inside, KV pruning, or biasing attention by size."""
        return self.merging or self.kv is not None or self.proportional

    def schedule(self, num_layers: int) -> list[InnerStep]:
        """The cuts in layer order."""
        if self.steps:
            return sorted(self.steps, key=lambda s: s.layer)
        if self.mode == "none" or self.ratio <= 0:
            return []
        return [mode_step(self.mode, default_layer(num_layers) if self.layer is None else self.layer, self.ratio)]


def default_layer(num_layers: int) -> int:
    """HoliTom merges at layer 18 of Qwen2-7B's 28; other depths get the same relative depth."""
    return max(1, min(num_layers - 1, round(18 / 28 * num_layers)))


def scaled_layer(layer: int, reference_layers: int, num_layers: int) -> int:
    """A paper's layer on a `reference_layers`-deep decoder, at the same relative depth of this one."""
    return max(1, min(num_layers - 1, round(layer * num_layers / reference_layers)))


def cut_schedule(layers: tuple[int, ...], shares: tuple[float, ...], num_layers: int,
                 reference_layers: int) -> list[tuple[int, float, int]]:
    """A paper's progressive cuts on this decoder: at `layers` of a `reference_layers`-deep decoder, leaving the
    cumulative `shares` of the visual tokens. Returns (layer K, ratio removed at K, index of the paper's cut);
    cuts that land on the same layer of a shallower decoder fold into one (the later share)."""
    folded: dict[int, tuple[float, int]] = {}
    for i, (layer, share) in enumerate(zip(layers, shares, strict=True)):
        k = scaled_layer(layer, reference_layers, num_layers)
        folded[k] = (share, folded[k][1] if k in folded else i)
    out, kept = [], 1.0
    for k in sorted(folded):
        share, i = folded[k]
        out.append((k, 1 - share / kept, i))
        kept = share
    return out


def validate(config: InnerConfig, num_layers: int) -> int:
    """Check the config against the decoder depth; returns the first cut's layer K (the default K without one)."""
    if config.mode not in (*MODES, "none"):
        raise ConfigError(f"unknown inner mode {config.mode!r}; choose one of: {', '.join(MODES)}, none")
    if config.merge not in MERGES:
        raise ConfigError(f"unknown merge {config.merge!r}; choose one of: {', '.join(MERGES)}")
    if not (0.0 <= config.ratio < 1.0) or math.isnan(config.ratio):
        raise ConfigError(f"--inner-ratio must be in [0, 1), got {config.ratio}")
    layer = default_layer(num_layers) if config.layer is None else config.layer
    if not config.steps and not 1 <= layer <= num_layers - 1:
        raise ConfigError(f"--inner-layer must be in [1, {num_layers - 1}] for this {num_layers}-layer decoder, got {layer}")
    steps = config.schedule(num_layers)
    for step in steps:
        step.validate(num_layers)
    if len({s.layer for s in steps}) != len(steps):
        raise ConfigError("inner steps must cut at different layers")
    if config.kv is not None:
        if steps:
            raise ConfigError("KV-cache pruning cannot be combined with cuts inside the LLM")
        if not 1 <= config.kv.layer <= num_layers - 1 or not 0.0 <= config.kv.ratio < 1.0:
            raise ConfigError(f"KV pruning needs a layer in [1, {num_layers - 1}] and a ratio in [0, 1)")
    return steps[0].layer if steps else layer


def method_inner(method, retain: float, user: InnerConfig, num_layers: int, **options) -> InnerConfig:
    """The inner config a run uses: the user's (`--inner ...`), with the cuts of `method` (a registry `Method`)
    inside the LLM when it has any, and proportional attention only where the method merges."""
    proportional = user.proportional and method.proportional
    if method.inner is None or retain >= 1.0:
        return replace(user, proportional=proportional)
    if user.merging:
        raise ConfigError(f"method {method.name!r} makes its own cuts inside the LLM; leave --inner at none")
    own = method.inner(retain, num_layers, **options)
    return replace(user, steps=own.steps, kv=own.kv, proportional=proportional)
