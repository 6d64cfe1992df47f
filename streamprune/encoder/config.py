"""`--encoder SPEC`: which encoder-side reduction runs, parsed and validated once.

SPEC is `none`, one method, or temporal reuse plus one merging method joined by `+`, each with an
optional `:RATIO` (else `--encoder-ratio`, else the method's default):
  reuse             changed patches are recomputed and see the unchanged ones' cached keys/values
  reuse-alone       changed patches are recomputed on their own (cheaper, further from a full encode)
  tome | tome-raster | zero-tprune | gtp | token-transforming   merging inside the tower's layers
                    (tome-raster: ToMe with survivors in raster order instead of the release's order)
e.g. `reuse`, `tome:0.5`, `reuse:0.9+tome:0.5`.
RATIO is the fraction of the tower's work skipped by that stage: for reuse, the most patches of a frame
that may be taken from the previous frame (default 1: all that pass the pixel test); for merging, the
fraction of tokens merged away by the last layer (removed evenly over the layers, ToMe's constant
schedule, or front-loaded with `decreasing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from streamprune.errors import ConfigError
from streamprune.reduce.vit import MERGE_METHODS
from streamprune.reduce.vit.transform import SCHEDULES

REUSE_MODES = {"reuse": "context", "reuse-alone": "alone"}
DEFAULT_RATIO = {"reuse": 1.0, "reuse-alone": 1.0, "merge": 0.5}
ENCODER_METHODS = ("none", *REUSE_MODES, *MERGE_METHODS)


@dataclass(frozen=True)
class ReuseOptions:
    """Temporal reuse: a patch is recomputed when its pixels moved by more than `threshold` (mean absolute
    difference, 0–255 levels) from the pixels its cached features came from, plus a `halo` of patches around
    it; a frame where fewer than `min_reuse` of the patches could be reused is encoded in full (a keyframe)."""

    mode: str = "context"  # context | alone
    ratio: float = 1.0  # most patches of a frame reused (1: every patch that passes the test)
    threshold: float = 8.0
    halo: int = 1
    min_reuse: float = 0.25


@dataclass(frozen=True)
class EncoderConfig:
    reuse: ReuseOptions | None = None
    merge: str | None = None  # a MERGE_METHODS name
    merge_ratio: float = 0.0
    merge_schedule: str = "constant"  # constant | decreasing (ToMe's schedules)

    @property
    def active(self) -> bool:
        return (self.reuse is not None and self.reuse.ratio > 0) or (self.merge is not None and self.merge_ratio > 0)

    @property
    def name(self) -> str:
        parts = []
        if self.reuse is not None:
            mode = next(k for k, v in REUSE_MODES.items() if v == self.reuse.mode)
            parts.append(f"{mode}:{self.reuse.ratio:g}")
        if self.merge is not None:
            parts.append(f"{self.merge}:{self.merge_ratio:g}")
        return "+".join(parts) or "none"

    def summary(self) -> dict:
        """For reports."""
        return {"spec": self.name, "reuse": None if self.reuse is None else vars(self.reuse).copy(),
                "merge": self.merge, "merge_ratio": self.merge_ratio if self.merge else 0.0,
                "merge_schedule": self.merge_schedule if self.merge else None}


def _ratio(text: str, where: str, allow_one: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"encoder ratio for {where} is not a number: {text!r}") from None
    if not (0.0 <= value < 1.0 or (allow_one and value == 1.0)) or math.isnan(value):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ConfigError(f"encoder ratio for {where} must be in {interval}, got {value:g}")
    return value


def parse_encoder(spec: str | None, ratio: float | None = None, threshold: float | None = None,
                  halo: int | None = None, schedule: str | None = None) -> EncoderConfig:
    """EncoderConfig from a SPEC string (see the module docstring); raises ConfigError in one line."""
    spec = (spec or "none").strip().lower()
    if ratio is not None:
        _ratio(str(ratio), "--encoder-ratio", allow_one=True)
    schedule = schedule or "constant"
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown --merge-schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if spec == "none":
        return EncoderConfig()
    reuse, merge, merge_ratio = None, None, 0.0
    for part in spec.split("+"):
        name, _, given = part.partition(":")
        name = name.strip()
        if name not in ENCODER_METHODS or name == "none":
            raise ConfigError(f"unknown encoder method {name!r}; choose from {', '.join(ENCODER_METHODS)} "
                              f"(reuse or reuse-alone may be joined with one merging method by '+')")
        kind = "reuse" if name in REUSE_MODES else "merge"
        if given:
            value = _ratio(given, name, allow_one=kind == "reuse")
        elif ratio is not None:
            value = _ratio(str(ratio), name, allow_one=kind == "reuse")
        else:
            value = DEFAULT_RATIO[name if kind == "reuse" else "merge"]
        if kind == "reuse":
            if reuse is not None:
                raise ConfigError("--encoder takes at most one of reuse, reuse-alone")
            options = {"mode": REUSE_MODES[name], "ratio": value}
            if threshold is not None:
                if threshold < 0:
                    raise ConfigError(f"--reuse-threshold must be >= 0 (pixel levels), got {threshold:g}")
                options["threshold"] = threshold
            if halo is not None:
                if halo < 0:
                    raise ConfigError(f"--reuse-halo must be >= 0 patches, got {halo}")
                options["halo"] = halo
            reuse = ReuseOptions(**options)
        else:
            if merge is not None:
                raise ConfigError("--encoder takes at most one merging method")
            merge, merge_ratio = name, value
    return EncoderConfig(reuse=reuse, merge=merge, merge_ratio=merge_ratio, merge_schedule=schedule)
