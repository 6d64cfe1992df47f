"""Encoder-side reduction: less work inside the vision tower (temporal reuse of unchanged patches, token
merging between a layer's attention and MLP), on the model's own tower modules: SigLIP-family towers
(`tower`, `encoder`) and the Qwen2.5-VL / Qwen3-VL vision transformers (`qwen_tower`)."""

from streamprune.encoder.config import ENCODER_METHODS, EncoderConfig, ReuseOptions, parse_encoder
from streamprune.encoder.encoder import (
           EncoderOutput,
           EncoderStats,
           StreamSet,
           VisionEncoder,
           full_encode_stats,
)
from streamprune.encoder.qwen_tower import QwenTower, QwenVisionEncoder, qwen_tower
from streamprune.encoder.tower import Tower, run_layers, siglip_tower

__all__ = ["ENCODER_METHODS", "EncoderConfig", "EncoderOutput", "EncoderStats", "QwenTower", "QwenVisionEncoder",
           "ReuseOptions", "StreamSet", "Tower", "VisionEncoder", "full_encode_stats", "parse_encoder", "qwen_tower", "run_layers", "siglip_tower"]
