"""SmolVLA with VLA-Pruner-style visual-token pruning, as lerobot policy type `smolvla_pruned`.

Importing the package registers the config type with lerobot (e.g. via `--discover_packages_path=policies`).
"""

from .configuration_smolvla_pruned import SmolVLAPrunedConfig
from .modeling_smolvla_pruned import SmolVLAPrunedPolicy

__all__ = ["SmolVLAPrunedConfig", "SmolVLAPrunedPolicy"]
