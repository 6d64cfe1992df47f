"""`PI05PrunedConfig`: pi05 plus VLA-Pruner visual token pruning, as the `pi05_pruned` policy type."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi05.configuration_pi05 import PI05Config

from policies.pruning_config import PruningConfigMixin


@PreTrainedConfig.register_subclass("pi05_pruned")
@dataclass
class PI05PrunedConfig(PI05Config, PruningConfigMixin):
    """PI05Config + `retain`, `cut`, `prune_layer`, `importance_window`, `importance_decay`, `selection`,
    and the encoder-side reduction (`encoder` SPEC and its options)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pruning_options().validate()
        self.encoder_config()
