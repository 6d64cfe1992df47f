"""An offline SmolVLA with a tiny random SmolVLM backbone, for tests, demos and benchmarks.

`tiny_smolvlm_dir()` writes a SmolVLM folder (config, processor, byte-level tokenizer; no weights: SmolVLA
builds the backbone randomly with `load_vlm_weights=False`) from `configs/models/tiny-smolvlm.yaml`, once,
cached under `streamprune.models.tiny.cache_dir()/models/`. `build_tiny_smolvla(...)` builds a seeded policy
and its pre/post processors with dataset stats made up in memory (no dataset needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from lerobot.configs.types import PolicyFeature
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

from policies.tiny_features import FEATURE_PRESETS, neutral_stats
from streamprune.models.tiny import CONFIG_DIR, RANDOM_WEIGHTS_MARKER, cached_build

TINY_SMOLVLM = CONFIG_DIR / "tiny-smolvlm.yaml"
SPECIALS = ["<|im_start|>", "<end_of_utterance>", "<|im_end|>", "<|endoftext|>", "<fake_token_around_image>",
            "<global-img>", "<image>", "<video>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]



def byte_level_smolvlm_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A SmolVLM-compatible tokenizer: one token per byte (no merges) + SmolVLM's special tokens, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(base + list(bytes_to_unicode().values()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    # a dict of extra special tokens is what defines `fake_image_token_id` / `global_image_token_id`,
    # which SmolVLA's VLAFlowMatching reads
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                              "image_token": "<image>", "end_of_utterance_token": "<end_of_utterance>"},
    )


def build_tiny_smolvlm(out_dir: Path, spec_path: Path = TINY_SMOLVLM) -> Path:
    """Write the tiny SmolVLM folder (config + processor + tokenizer, no weights) to `out_dir`."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    spec = yaml.safe_load(spec_path.read_text())
    tok = byte_level_smolvlm_tokenizer()
    text = {**spec["text_config"], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = SmolVLMConfig(text_config=text, vision_config=spec["vision_config"], scale_factor=spec["scale_factor"],
                           image_token_id=tok.convert_tokens_to_ids("<image>"))
    side = {"longest_edge": spec["vision_config"]["image_size"]}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=side, max_image_size=side, do_image_splitting=False),
        tokenizer=tok, video_processor=SmolVLMVideoProcessor(size=side, max_image_size=side),
        image_seq_len=spec["image_seq_len"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / RANDOM_WEIGHTS_MARKER).write_text(f"random weights: built by streamprune from {spec_path.name}\n")
    return out_dir


def tiny_smolvlm_dir(spec_path: Path = TINY_SMOLVLM) -> Path:
    """The tiny SmolVLM folder, built on first use (keyed by the yaml and the transformers version)."""
    return cached_build(spec_path, build_tiny_smolvlm)


def place_smolvla(policy: SmolVLAPolicy, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
    """Move a SmolVLA to `device` with its SmolVLM backbone in `dtype`. The action expert and the projections stay
    in float32, as lerobot keeps them when it loads the backbone's weights in bfloat16."""
    policy.model.vlm_with_expert.vlm.to(dtype)
    policy.to(device)
    policy.config.device = str(device)


def build_tiny_smolvla(policy_cls: type = SmolVLAPolicy, config_cls: type = SmolVLAConfig,
                       input_features: dict[str, PolicyFeature] | None = None,
                       output_features: dict[str, PolicyFeature] | None = None, preset: str = "pusht",
                       seed: int = 0, backbone: Path = TINY_SMOLVLM, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, **config_overrides: Any) -> tuple[Any, Any, Any]:
    """(policy, preprocessor, postprocessor) of a tiny offline SmolVLA (or subclass) in eval mode.

    Features default to `preset` ("pusht": observation.image (3,96,96), state/action (2,); "aloha":
    observation.images.top (3,480,640), state/action (14,)). Weights depend only on `seed` (the global RNG is
    left untouched), so two builds with the same seed are identical (built on the CPU, then moved to `device`
    with the backbone in `dtype`: see `place_smolvla`; the preprocessor moves inputs there). `backbone` is the
    SmolVLM spec (`configs/models/smolvlm-500m-dims.yaml` gives the real dimensions, for benchmarks).
    """
    preset_in, preset_out = FEATURE_PRESETS[preset]
    input_features = input_features or preset_in
    output_features = output_features or preset_out
    config = config_cls(vlm_model_name=str(tiny_smolvlm_dir(backbone)), load_vlm_weights=False, device=str(device),
                        input_features=input_features, output_features=output_features, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = policy_cls(config).eval()
    place_smolvla(policy, device, dtype)
    pre, post = make_smolvla_pre_post_processors(config, dataset_stats=neutral_stats({**input_features, **output_features}))
    return policy, pre, post
