"""Model loading: by hub ID, local folder, or a tiny random-weight model built offline (`tiny`, `tiny-*`).

The adapter comes from the checkpoint's config.json: the first of ADAPTERS whose `matches(config)`
holds (LLaVA-Video before LLaVA-OneVision: same classes, LLaVA-Video's pooling keys in the config).
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from streamprune.errors import ModelError
from streamprune.models.base import VideoLLMAdapter
from streamprune.models.tiny import RANDOM_WEIGHTS_MARKER, TINY_MODELS, tiny_model_dir
from streamprune.runtime import CPU, Runtime, resolve_runtime

# "module:Class", imported on use (each pulls its transformers model classes)
ADAPTERS = (
    "streamprune.models.llava_video:LlavaVideoAdapter",
    "streamprune.models.llava_onevision:LlavaOnevisionAdapter",
    "streamprune.models.qwen2_5_vl:Qwen2_5_VLAdapter",
    "streamprune.models.qwen3_vl:Qwen3VLAdapter",
    "streamprune.models.smolvlm2:SmolVLM2Adapter",
)


def _load(path: str) -> type[VideoLLMAdapter]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def adapter_for(config) -> type[VideoLLMAdapter]:
    """The adapter class for a checkpoint's config (ModelError if none fits)."""
    classes = [_load(path) for path in ADAPTERS]
    for cls in classes:
        if cls.matches(config):
            return cls
    supported = sorted({cls.model_type for cls in classes})
    raise ModelError(f"unsupported model type {config.model_type!r}; supported: {', '.join(supported)}")


@dataclass
class LoadedModel:
    adapter: VideoLLMAdapter
    name: str
    random_weights: bool
    runtime: Runtime = CPU  # where the model's weights live and in which dtype


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check so an offline machine fails in seconds, not after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model_source(name: str) -> tuple[str, bool]:
    """Return (path or hub ID to load, whether to restrict loading to local files)."""
    if name in TINY_MODELS:
        return str(tiny_model_dir(name)), True
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser()), True
    if name.startswith("tiny"):
        raise ModelError(f"unknown tiny model {name!r}; choose one of: {', '.join(TINY_MODELS)}")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"model not found: {name!r} is neither a local folder nor a hub ID like 'org/name'")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name, True
    if not _hub_reachable():
        raise ModelError(f"model {name!r} is not in the local Hugging Face cache and the hub is unreachable; "
                         f"download it first (`hf download {name}`) or pass a local folder")
    return name, False


def load_video_llm(name: str, device: str | torch.device | Runtime = "auto", dtype: str | torch.dtype = "auto",
                   attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a supported video LLM and its processor onto `device` in `dtype`.

    device: auto | cpu | cuda | cuda:N, or a resolved `Runtime` (then dtype and attn_implementation are its
    own). auto = a CUDA GPU in bf16 when one is visible, else the CPU in fp32 (bf16 is several times slower
    on CPUs)."""
    runtime = device if isinstance(device, Runtime) else resolve_runtime(device, dtype, attn_implementation)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    source, local_only = resolve_model_source(name)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model config from {name!r}: {str(exc).splitlines()[0]}") from exc
    adapter_cls = adapter_for(config)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=runtime.dtype, attn_implementation=runtime.attn_implementation, local_files_only=local_only,
            **({"device_map": {"": runtime.device}} if runtime.cuda else {}))
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    random_weights = Path(source, RANDOM_WEIGHTS_MARKER).exists()
    return LoadedModel(adapter_cls(model.to(runtime.device).eval(), processor), name, random_weights, runtime)
