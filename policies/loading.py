"""Build a pruned lerobot policy by name: `tiny` (random weights, offline), a local folder, or a hub ID, on the
device and in the dtype of a `Runtime`.

lerobot's own handling, which this follows: a policy config's `device` is where the model lives and where its
preprocessor moves each batch; pi0 / pi05 take `dtype` ("bfloat16" | "float32") and keep the vision tower,
projector and norms in float32 themselves; SmolVLA has no dtype field and runs its SmolVLM backbone in
bfloat16 (as loaded from the hub) with the action expert in float32, so here the backbone gets the runtime's
dtype. Their VLM and expert attention is lerobot's own eager attention (the pruning reads its probabilities),
whatever the runtime's `attn_implementation`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from streamprune.errors import ConfigError, ModelError
from streamprune.runtime import CPU, Runtime


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


POLICY_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}  # what lerobot's VLAs run in


def policy_dtype(runtime: Runtime) -> str:
    """The runtime's dtype as lerobot names it (ConfigError for one its VLAs do not support)."""
    if runtime.dtype not in POLICY_DTYPES:
        raise ConfigError(f"--dtype {runtime.dtype_name}: lerobot's VLA policies run in bfloat16 or float32")
    return POLICY_DTYPES[runtime.dtype]


def load_pruned_policy(kind: str, path: str, features: dict, runtime: Runtime = CPU,
                       **pruning: Any) -> tuple[Any, Any, Any]:
    """(policy, preprocessor, postprocessor) of policy `kind` with pruning options (`retain`, `cut`, …), on
    `runtime`'s device and dtype (the module docstring says what the dtype covers per policy).

    features: lerobot policy features of the env (inputs and `action`), used by tiny policies.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown policy {kind!r}; choose one of: {', '.join(KINDS)}")
    spec = KINDS[kind]
    dtype = policy_dtype(runtime)
    package = importlib.import_module(spec.package)
    config_cls, policy_cls = getattr(package, spec.config), getattr(package, spec.policy)
    inputs = {k: f for k, f in features.items() if k.startswith("observation")}
    outputs = {k: f for k, f in features.items() if not k.startswith("observation")}
    placement = {"device": runtime.device, "dtype": runtime.dtype if kind == "smolvla" else dtype}
    if path == "tiny":
        return _attr(spec.tiny)(policy_cls=policy_cls, config_cls=config_cls, input_features=inputs,
                                output_features=outputs, **placement, **pruning)
    return _from_pretrained(path, config_cls, policy_cls, pruning, runtime, kind)


def _from_pretrained(path: str, config_cls: type, policy_cls: type, pruning: dict, runtime: Runtime,
                     kind: str) -> tuple[Any, Any, Any]:
    """A saved lerobot policy (folder or hub ID) of the unpruned type, loaded as its pruned subclass on the
    runtime's device and dtype."""
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
    placement = {"device": str(runtime.device)}
    if "dtype" in values:  # pi0 / pi05: lerobot casts the model itself
        placement["dtype"] = policy_dtype(runtime)
    config = config_cls(**{**values, **pruning, **placement})
    try:
        policy = policy_cls.from_pretrained(source, config=config, local_files_only=local_only).eval()
        # the saved processors name the device they were trained on: run them where the policy is
        pre, post = make_pre_post_processors(config, pretrained_path=source, preprocessor_overrides={
            "device_processor": {"device": str(runtime.device)}})
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load policy {path!r}: {str(exc).splitlines()[0]}") from exc
    if kind == "smolvla":
        from policies.tiny_smolvla import place_smolvla

        place_smolvla(policy, runtime.device, runtime.dtype)
    return policy, pre, post
