"""Pruning options shared by the pruned lerobot policies (`smolvla_pruned`, `pi0_pruned`, `pi05_pruned`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from streamprune.encoder import EncoderConfig, parse_encoder
from streamprune.errors import ConfigError
from streamprune.reduce.vla import SELECTIONS

CUTS = ("before", "inside")
# the config fields that define the encoder-side reduction (changing one restarts its reuse state)
ENCODER_FIELDS = ("encoder", "encoder_ratio", "reuse_threshold", "reuse_halo", "merge_schedule")


@dataclass(frozen=True)
class PruningOptions:
    retain: float = 0.25
    cut: str = "before"
    prune_layer: int = 3
    window: int = 3
    decay: float = 0.8
    selection: str = "vla_pruner"

    def validate(self, vlm_depth: int | None = None) -> None:
        """Raise ConfigError (one line) on a bad value; `vlm_depth` also bounds `prune_layer`."""
        if not 0.0 < self.retain <= 1.0:
            raise ConfigError(f"retain must be in (0, 1], got {self.retain}")
        if self.cut not in CUTS:
            raise ConfigError(f"unknown cut {self.cut!r}; choose one of {', '.join(CUTS)}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.window < 1 or not 0.0 <= self.decay <= 1.0:
            raise ConfigError(f"importance window must be >= 1 and decay in [0, 1], got {self.window}, {self.decay}")
        if self.prune_layer < 1 or (vlm_depth is not None and self.prune_layer >= vlm_depth):
            depth = f" < VLM depth {vlm_depth}" if vlm_depth is not None else ""
            raise ConfigError(f"prune_layer must be >= 1{depth}, got {self.prune_layer}")


def encoder_fields(config: EncoderConfig) -> dict:
    """The config fields that reproduce a parsed EncoderConfig (for building a policy from CLI options)."""
    fields_ = {"encoder": config.name, "merge_schedule": config.merge_schedule}
    if config.reuse is not None:
        fields_.update(reuse_threshold=config.reuse.threshold, reuse_halo=config.reuse.halo)
    return fields_


@dataclass
class PruningConfigMixin:
    """The pruning fields of every pruned policy config (mixed into SmolVLAConfig, PI0Config, PI05Config)."""

    # Fraction of each camera's visual tokens kept once pruning starts (1.0 = the unmodified policy).
    retain: float = 0.25
    # "before": drop image tokens before the VLM (every layer and denoising step sees the shorter prefix);
    # "inside": drop them at VLM layer `prune_layer` of the prefix pass (layers below see all tokens).
    cut: str = "before"
    prune_layer: int = 3
    # Temporal smoothing of the action-level importance: the last W chunks, newest weighted most.
    importance_window: int = 3
    importance_decay: float = 0.8
    # "vla_pruner" (semantic ∪ action, diversity trim), the baselines "semantic" (FastV-style) and "random", or
    # the ablation "action" (smoothed action importance alone); all of them wait the same W warm-up chunks,
    # so they are compared on the same chunks.
    selection: str = "vla_pruner"
    # Encoder-side reduction (`streamprune.encoder`, the `--encoder` SPEC): e.g. "reuse" recomputes only the
    # patches of each camera image that changed since the previous control step. "none" = the model's tower.
    encoder: str = "none"
    encoder_ratio: float | None = None
    reuse_threshold: float | None = None
    reuse_halo: int | None = None
    merge_schedule: str = "constant"

    def encoder_config(self) -> EncoderConfig:
        """The parsed encoder SPEC (raises a one-line ConfigError on a bad one)."""
        return parse_encoder(self.encoder, self.encoder_ratio, self.reuse_threshold, self.reuse_halo,
                             self.merge_schedule)

    def pruning_options(self) -> PruningOptions:
        return PruningOptions(retain=self.retain, cut=self.cut, prune_layer=self.prune_layer,
                              window=self.importance_window, decay=self.importance_decay,
                              selection=self.selection)

    def set_pruning(self, vlm_depth: int | None = None, **changes: object) -> PruningOptions:
        """Change pruning fields (e.g. `retain=0.5, cut="inside"`) and return the new options. Validated
        first: a bad value raises a one-line ConfigError and changes nothing."""
        names = {f.name for f in fields(PruningConfigMixin)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown pruning option(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}")
        previous = {name: getattr(self, name) for name in changes}
        for name, value in changes.items():
            setattr(self, name, value)
        options = self.pruning_options()
        try:
            options.validate(vlm_depth if options.cut == "inside" else None)
            self.encoder_config()
        except ConfigError:
            for name, value in previous.items():
                setattr(self, name, value)
            raise
        return options
