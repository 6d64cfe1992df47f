"""`PI05PrunedPolicy`: lerobot's `PI05Policy` with VLA-Pruner visual token pruning (`policies/pi0_pruned/pruning.py`).

pi05's prefix is [images; prompt with the discretised state] and its suffix the action chunk, so the pi0
pruner applies unchanged: semantic importance comes from the prompt tokens (task and state).
"""

from __future__ import annotations

from lerobot.policies.pi05.modeling_pi05 import PI05Policy, PI05Pytorch

from policies.pi0_pruned.pruning import PrunedPolicyMixin, PrunedPrefixMixin
from policies.pi05_pruned.configuration_pi05_pruned import PI05PrunedConfig


class PI05PrunedPytorch(PrunedPrefixMixin, PI05Pytorch):
    """`PI05Pytorch` whose prefix embeddings pass through the pruner."""


class PI05PrunedPolicy(PrunedPolicyMixin, PI05Policy):
    """pi05 that keeps `retain` of each camera's 256 image tokens once W chunks of action attention exist."""

    config_class = PI05PrunedConfig
    name = "pi05_pruned"

    def __init__(self, config: PI05PrunedConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.attach_pruner(PI05PrunedPytorch)
