"""Build a pruned lerobot policy by name: `tiny` (random weights, offline), a local folder, or a hub ID."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from streamprune.errors import ConfigError, ModelError


@dataclass(frozen=True)
class PolicyKind:
    package: str  # policies.<x>_pruned
    config: str  # pruned config class
    policy: str  # pruned policy class
    tiny: str  # "module:function" building a tiny offline policy


KINDS = {
    "smolvla": PolicyKind("policies.smolvla_pruned", "SmolVLAPrunedConfig", "SmolVLAPrunedPolicy",
                          "policies.tiny_smolvla:build_tiny_smolvla"),
    "pi0": PolicyKind("policies.pi0_pruned", "PI0PrunedConfig", "PI0PrunedPolicy", "policies.tiny_pi0:build_tiny_pi0"),
    "pi05": PolicyKind("policies.pi05_pruned", "PI05PrunedConfig", "PI05PrunedPolicy", "policies.tiny_pi0:build_tiny_pi0"),
}


def _attr(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def load_pruned_policy(kind: str, path: str, features: dict, **pruning: Any) -> tuple[Any, Any, Any]:
    """(policy, preprocessor, postprocessor) of policy `kind` with pruning options (`retain`, `cut`, …).

    features: lerobot policy features of the env (inputs and `action`), used by tiny policies.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown policy {kind!r}; choose one of: {', '.join(KINDS)}")
    spec = KINDS[kind]
    package = importlib.import_module(spec.package)
    config_cls, policy_cls = getattr(package, spec.config), getattr(package, spec.policy)
    inputs = {k: f for k, f in features.items() if k.startswith("observation")}
    outputs = {k: f for k, f in features.items() if not k.startswith("observation")}
    if path == "tiny":
        return _attr(spec.tiny)(policy_cls=policy_cls, config_cls=config_cls, input_features=inputs,
                                output_features=outputs, **pruning)
    return _from_pretrained(path, config_cls, policy_cls, pruning)


def _from_pretrained(path: str, config_cls: type, policy_cls: type, pruning: dict) -> tuple[Any, Any, Any]:
    """A saved lerobot policy (folder or hub ID) of the unpruned type, loaded as its pruned subclass."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import make_pre_post_processors

    from streamprune.models import resolve_model_source

    source, local_only = resolve_model_source(path) if not Path(path).exists() else (path, True)
    try:
        base = PreTrainedConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load policy config from {path!r}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(base, config_cls.__mro__[1]) and not isinstance(base, config_cls):
        raise ModelError(f"{path!r} holds a {type(base).__name__}, not a {config_cls.__mro__[1].__name__}")
    values = {f.name: getattr(base, f.name) for f in fields(base) if f.init and hasattr(base, f.name)}
    config = config_cls(**{**values, **pruning})
    try:
        policy = policy_cls.from_pretrained(source, config=config, local_files_only=local_only).eval()
        pre, post = make_pre_post_processors(config, pretrained_path=source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load policy {path!r}: {str(exc).splitlines()[0]}") from exc
    return policy, pre, post
