"""Configuration of SmolVLA with VLA-Pruner-style visual-token pruning (lerobot policy type `smolvla_pruned`)."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from policies.pruning_config import PruningConfigMixin


@PreTrainedConfig.register_subclass("smolvla_pruned")
@dataclass
class SmolVLAPrunedConfig(SmolVLAConfig, PruningConfigMixin):
    """SmolVLAConfig plus the pruning knobs (`policies/pruning_config.py`), on 64 visual tokens per camera.
    `prune_layer` is K for the inside cut; the semantic score is read at layer K−1 (both cuts)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pruning_options().validate(self.num_vlm_layers if self.num_vlm_layers > 0 else None)
        self.encoder_config()
