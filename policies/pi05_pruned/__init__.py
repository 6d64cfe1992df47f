"""pi05 with VLA-Pruner visual token pruning, as the lerobot policy type `pi05_pruned`."""

from policies.pi05_pruned.configuration_pi05_pruned import PI05PrunedConfig
from policies.pi05_pruned.modeling_pi05_pruned import PI05PrunedPolicy

__all__ = ["PI05PrunedConfig", "PI05PrunedPolicy"]
