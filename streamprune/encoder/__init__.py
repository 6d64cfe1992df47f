"""Encoder-side reduction: less work inside the vision tower (temporal reuse of unchanged patches, token
merging between a layer's attention and MLP), on the model's own tower modules."""

from streamprune.encoder.config import ENCODER_METHODS, EncoderConfig, ReuseOptions, parse_encoder
from streamprune.encoder.encoder import (
           EncoderOutput,
           EncoderStats,
           StreamSet,
           VisionEncoder,
           full_encode_stats,
)
from streamprune.encoder.tower import Tower, run_layers, siglip_tower

__all__ = ["ENCODER_METHODS", "EncoderConfig", "EncoderOutput", "EncoderStats", "ReuseOptions", "StreamSet", "Tower",
           "VisionEncoder", "full_encode_stats", "parse_encoder", "run_layers", "siglip_tower"]
