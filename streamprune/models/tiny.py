"""Tiny random-weight models of the real classes, built offline from `configs/models/*.yaml`.

They are built once, written with `save_pretrained` and always loaded back through `from_pretrained`,
so tests and demos exercise the same loading path as a real checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
TINY_LLAVA_ONEVISION = CONFIG_DIR / "tiny-llava-onevision.yaml"
RANDOM_WEIGHTS_MARKER = "streamprune_random_weights.txt"

# --model name → (spec in configs/models/, "module:function" that builds it into a folder)
TINY_MODELS = {
    "tiny": ("tiny-llava-onevision.yaml", "streamprune.models.tiny:build_tiny_llava_onevision"),
    "tiny-llava-onevision": ("tiny-llava-onevision.yaml", "streamprune.models.tiny:build_tiny_llava_onevision"),
    "tiny-llava-video": ("tiny-llava-video.yaml", "streamprune.models.llava_video:build_tiny"),
    "tiny-qwen2.5-vl": ("tiny-qwen2.5-vl.yaml", "streamprune.models.qwen2_5_vl:build_tiny"),
    "tiny-qwen3-vl": ("tiny-qwen3-vl.yaml", "streamprune.models.qwen3_vl:build_tiny"),
    "tiny-smolvlm2": ("tiny-smolvlm2.yaml", "streamprune.models.smolvlm2:build_tiny"),
}


def cache_dir() -> Path:
    """Where built artefacts go: $STREAMPRUNE_CACHE or ~/.cache/streamprune."""
    base = os.environ.get("STREAMPRUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamprune"
    return Path(base)


def byte_level_tokenizer(special_tokens: list[str]):
    """A Qwen2 tokenizer over the 256 byte symbols and no merges: every string encodes, fully offline."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": special_tokens})
    return tok


def build_tiny_llava_onevision(out_dir: Path, spec_path: Path = TINY_LLAVA_ONEVISION) -> Path:
    """Write a tiny random-weight LLaVA-OneVision (model, processor, tokenizer) to `out_dir`."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    spec = yaml.safe_load(spec_path.read_text())
    tok = byte_level_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    vision = spec["vision_config"]
    side = vision["image_size"]
    patches = (side // vision["patch_size"]) ** 2
    config = LlavaOnevisionConfig(
        text_config={**spec["text_config"], "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": None},
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        vision_aspect_ratio=spec["vision_aspect_ratio"],
        image_grid_pinpoints=spec["image_grid_pinpoints"],
        tie_word_embeddings=spec["text_config"].get("tie_word_embeddings", True),
    )
    torch.manual_seed(spec.get("seed", 0))
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # Random weights rarely emit EOS; let generation run to max_new_tokens like a real summary would.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": side, "width": side},
                                                     image_grid_pinpoints=spec["image_grid_pinpoints"]),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
        tokenizer=tok,
        num_image_tokens=patches,
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        chat_template=spec["chat_template"],
    )
    return save_random(out_dir, spec_path, model, processor)


def save_random(out_dir: Path, spec_path: Path, model, processor) -> Path:
    """Write a random-weight model and its processor with `save_pretrained`; the marker goes last, so a
    folder with the marker is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / RANDOM_WEIGHTS_MARKER).write_text("random weights: built by streamprune from " + spec_path.name + "\n")
    return out_dir


def cached_build(spec_path: Path, build: Callable[[Path, Path], Path]) -> Path:
    """The folder `build(out_dir, spec_path)` writes, built on first use under the cache, keyed by the spec
    and the transformers version. `build` must write RANDOM_WEIGHTS_MARKER last."""
    # keyed by the builder's module and this one too, so a changed builder never serves a stale model
    code = inspect.getsource(inspect.getmodule(build)) + Path(__file__).read_text()
    source = (spec_path.read_text() + code + transformers.__version__).encode()
    key = hashlib.sha256(source).hexdigest()[:12]
    out = cache_dir() / "models" / f"{spec_path.stem}-{key}"
    if not (out / RANDOM_WEIGHTS_MARKER).exists():
        # build aside, then rename: an interrupted build never looks complete
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build(tmp, spec_path)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    return out


def tiny_model_dir(name: str = "tiny") -> Path:
    """The folder of tiny model `name` (a TINY_MODELS key), built on first use."""
    spec, builder = TINY_MODELS[name]
    module, function = builder.split(":")
    return cached_build(CONFIG_DIR / spec, getattr(importlib.import_module(module), function))
