"""A tiny random-weight pi0 (lerobot `PI0Policy` or a subclass), built fully offline from
`configs/models/tiny-pi0.yaml`.

lerobot 0.6.1 cannot build a small pi0 as is: `PaliGemmaWithExpertModel` hard-codes the projector's
`projection_dim=2048` (the gemma_2b width), only two Gemma variants exist, the vision tower is always
SigLIP-So400m, and the processor downloads the PaliGemma tokenizer. `tiny_pi0_patches` lifts all four,
only while building; the built policy and processors are ordinary lerobot objects afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import torch
import yaml
from lerobot.configs import PolicyFeature
from lerobot.policies.pi0 import modeling_pi0, processor_pi0
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Policy
from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors
from lerobot.policies.pi05 import modeling_pi05, processor_pi05
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.policies.pi05.modeling_pi05 import PI05Policy
from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors
from torch import nn

from policies.tiny_features import PUSHT_INPUTS, PUSHT_OUTPUTS, neutral_stats
from streamprune.models.tiny import byte_level_tokenizer, cache_dir

TINY_PI0 = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-pi0.yaml"
TOKENIZER_DIR = "tokenizers/tiny-pi0-bytes"

@dataclass(frozen=True)
class PiFamily:
    """lerobot keeps a private copy of the PaliGemma + expert code per policy: patch the matching modules."""

    name: str  # the spec section with this family's config overrides
    modeling: ModuleType
    processor: ModuleType
    make_processors: Callable[..., tuple[Any, Any]]


PI0 = PiFamily("pi0", modeling_pi0, processor_pi0, make_pi0_pre_post_processors)
PI05 = PiFamily("pi05", modeling_pi05, processor_pi05, make_pi05_pre_post_processors)


def load_spec(path: Path = TINY_PI0) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def offline_tokenizer_dir() -> Path:
    """A byte-level tokenizer saved under the streamprune cache (ids < 300, far below PaliGemma's vocab)."""
    out = cache_dir() / TOKENIZER_DIR
    if not out.exists():
        # write aside, then rename: a concurrent or interrupted build never leaves a half-written dir
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        byte_level_tokenizer([]).save_pretrained(tmp)
        with contextlib.suppress(OSError):  # another process won the race: its copy is identical
            tmp.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tiny_paligemma_config(original: Callable[[], Any], vision: dict[str, Any]) -> Any:
    config = original()
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    return config


class _ConfigMapping(dict):
    """`CONFIG_MAPPING` stand-in: "paligemma" yields a tiny vision tower, other types pass through."""

    def __init__(self, original: Any, vision: dict[str, Any]) -> None:
        super().__init__()
        self.original = original
        self.vision = vision

    def __getitem__(self, key: str) -> Any:
        if key == "paligemma":
            return functools.partial(_tiny_paligemma_config, self.original["paligemma"], self.vision)
        return self.original[key]


def _fit_projector(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap `PaliGemmaWithExpertModel.__init__`: size the projector to the VLM width, not lerobot's fixed 2048."""

    @functools.wraps(init)
    def wrapped(self: nn.Module, vlm_config: Any, *args: Any, **kwargs: Any) -> None:
        init(self, vlm_config, *args, **kwargs)
        paligemma = self.paligemma
        old = paligemma.model.multi_modal_projector.linear
        paligemma.model.multi_modal_projector.linear = nn.Linear(old.in_features, vlm_config.width).to(old.weight.dtype)
        paligemma.config.vision_config.projection_dim = vlm_config.width

    return wrapped


def _local_tokenizer(step_cls: type, tokenizer_dir: Path) -> Callable[..., Any]:
    """The processor's `TokenizerProcessorStep`, pointed at a local tokenizer dir instead of the hub."""

    def make(*args: Any, **kwargs: Any) -> Any:
        kwargs["tokenizer_name"] = str(tokenizer_dir)
        return step_cls(*args, **kwargs)

    return make


@contextlib.contextmanager
def tiny_pi0_patches(spec: dict[str, Any], family: PiFamily = PI0) -> Iterator[None]:
    """Scoped patches of one family's lerobot modules for building a tiny offline policy (module docstring)."""
    modeling, processor = family.modeling, family.processor
    variants = {"gemma_2b": modeling.GemmaConfig(**spec["paligemma"]),
                "gemma_300m": modeling.GemmaConfig(**spec["action_expert"])}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(modeling, "get_gemma_config", variants.__getitem__))
        stack.enter_context(mock.patch.object(
            modeling, "CONFIG_MAPPING", _ConfigMapping(modeling.CONFIG_MAPPING, spec["vision_config"])))
        stack.enter_context(mock.patch.object(
            modeling.PaliGemmaWithExpertModel, "__init__", _fit_projector(modeling.PaliGemmaWithExpertModel.__init__)))
        stack.enter_context(mock.patch.object(
            processor, "TokenizerProcessorStep", _local_tokenizer(processor.TokenizerProcessorStep, offline_tokenizer_dir())))
        yield


def build_tiny_pi0(
    policy_cls: type[PI0Policy | PI05Policy] = PI0Policy,
    config_cls: type[PI0Config | PI05Config] = PI0Config,
    input_features: dict[str, PolicyFeature] | None = None,
    output_features: dict[str, PolicyFeature] | None = None,
    spec_path: Path = TINY_PI0,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> tuple[PI0Policy | PI05Policy, Any, Any]:
    """(policy, preprocessor, postprocessor) of a tiny pi0 or pi05 (by `policy_cls`), offline, with identical
    weights on every build. `overrides` are config fields (e.g. `retain=0.5` for a pruned subclass, or
    `dtype="bfloat16"`: lerobot then keeps the vision tower, projector and norms in float32); PushT-like
    features by default. lerobot builds the weights on the CPU and moves the model to `device`."""
    family = PI05 if issubclass(policy_cls, PI05Policy) else PI0
    spec = load_spec(spec_path)
    inputs = dict(input_features or PUSHT_INPUTS)
    outputs = dict(output_features or PUSHT_OUTPUTS)
    fields = {**spec["policy"], **spec.get(family.name, {}), **overrides}
    config = config_cls(input_features=inputs, output_features=outputs, device=str(device), **fields)
    with tiny_pi0_patches(spec, family):
        torch.manual_seed(spec["seed"])
        policy = policy_cls(config).eval()
        pre, post = family.make_processors(config, dataset_stats=neutral_stats({**inputs, **outputs}))
    return policy, pre, post
