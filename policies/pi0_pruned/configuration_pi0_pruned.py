"""`PI0PrunedConfig`: pi0 plus VLA-Pruner visual token pruning (Liu et al., 2025), as the `pi0_pruned` policy type."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0.configuration_pi0 import PI0Config

from policies.pruning_config import PruningConfigMixin


@PreTrainedConfig.register_subclass("pi0_pruned")
@dataclass
class PI0PrunedConfig(PI0Config, PruningConfigMixin):
    """PI0Config + `retain`, `cut`, `prune_layer`, `importance_window`, `importance_decay`, `selection`,
    and the encoder-side reduction (`encoder` SPEC and its options)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pruning_options().validate()
        self.encoder_config()
