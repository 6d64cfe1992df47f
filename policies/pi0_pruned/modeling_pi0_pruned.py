"""`PI0PrunedPolicy`: lerobot's `PI0Policy` with VLA-Pruner visual token pruning (see `pruning.py`)."""

from __future__ import annotations

from lerobot.policies.pi0.modeling_pi0 import PI0Policy, PI0Pytorch

from policies.pi0_pruned.configuration_pi0_pruned import PI0PrunedConfig
from policies.pi0_pruned.pruning import PrunedPolicyMixin, PrunedPrefixMixin


class PI0PrunedPytorch(PrunedPrefixMixin, PI0Pytorch):
    """`PI0Pytorch` whose prefix embeddings pass through the pruner."""


class PI0PrunedPolicy(PrunedPolicyMixin, PI0Policy):
    """pi0 that keeps `retain` of each camera's 256 image tokens once W chunks of action attention exist."""

    config_class = PI0PrunedConfig
    name = "pi0_pruned"

    def __init__(self, config: PI0PrunedConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.attach_pruner(PI0PrunedPytorch)
