"""Configuration of SmolVLA with VLA-Pruner-style visual-token pruning (lerobot policy type `smolvla_pruned`)."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from streamprune.errors import ConfigError

CUTS = ("before", "inside")
SELECTIONS = ("vla_pruner", "semantic", "random")


@PreTrainedConfig.register_subclass("smolvla_pruned")
@dataclass
class SmolVLAPrunedConfig(SmolVLAConfig):
    """SmolVLAConfig plus the pruning knobs.

    retain: fraction of the 64 visual tokens per camera kept, in (0, 1].
    cut: "before" drops tokens from the prefix embedding (every VLM layer and denoising step sees the short
        prefix); "inside" drops them at VLM layer `prune_layer` (VLA-Pruner's K) during the prefix pass.
    prune_layer: K for the inside cut; the semantic score is read at layer K−1 (both cuts).
    importance_window / importance_decay: temporal smoothing of the action-level importance (w, γ).
    selection: "vla_pruner" (dual-level), "semantic" (language→vision attention only, FastV-like) or
        "random" (seeded per episode) — the last two are baselines.
    """

    retain: float = 0.25
    cut: str = "before"
    prune_layer: int = 3
    importance_window: int = 3
    importance_decay: float = 0.8
    selection: str = "vla_pruner"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.retain <= 1.0:
            raise ConfigError(f"retain must be in (0, 1], got {self.retain}")
        if self.cut not in CUTS:
            raise ConfigError(f"unknown cut {self.cut!r}; choose one of {', '.join(CUTS)}")
        if self.prune_layer < 1 or (self.num_vlm_layers > 0 and self.prune_layer >= self.num_vlm_layers):
            raise ConfigError(f"prune_layer must be in [1, num_vlm_layers), got {self.prune_layer}")
        if self.importance_window < 1:
            raise ConfigError(f"importance_window must be at least 1, got {self.importance_window}")
        if not 0.0 <= self.importance_decay <= 1.0:
            raise ConfigError(f"importance_decay must be in [0, 1], got {self.importance_decay}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}")
