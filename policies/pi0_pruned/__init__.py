"""pi0 with VLA-Pruner visual token pruning, as the lerobot policy type `pi0_pruned`."""

from policies.pi0_pruned.configuration_pi0_pruned import PI0PrunedConfig
from policies.pi0_pruned.modeling_pi0_pruned import PI0PrunedPolicy

__all__ = ["PI0PrunedConfig", "PI0PrunedPolicy"]
