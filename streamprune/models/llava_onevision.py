"""Thin adapter over transformers' `LlavaOnevisionForConditionalGeneration`.

Encoding runs the model's own `get_video_features` (SigLIP → projector → 2×2 bilinear pooling) and
records, with a pre-hook on the last used SigLIP attention layer, the attention each patch received
(averaged over heads and queries), without switching any layer to eager attention. Reduced tokens go
into the LLM as `inputs_embeds` with one placeholder per kept token (1-D positions, as the model uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from streamprune.encoder import (
    EncoderConfig,
    EncoderStats,
    Tower,
    VisionEncoder,
    full_encode_stats,
    siglip_tower,
)
from streamprune.encoder.tokens import merged_visual_tokens
from streamprune.errors import ConfigError
from streamprune.models.inner_stage import InnerConfig, InnerStage
from streamprune.tokens import VisualTokens

ProgressFn = Callable[[int, int], None]


@dataclass
class EncodedVideo:
    """Vision-tower output of one video.

    features:  [T, N, D] projected, pooled tokens (N = H·W, 196 at 384 px).
    attention: [T, N] attention received per token in the last used vision layer, pooled like features.
    grid_hw:   (H, W) token grid per frame.
    """

    features: torch.Tensor
    attention: torch.Tensor
    grid_hw: tuple[int, int]
    encoder: EncoderStats | None = None  # what the tower computed (every patch for the model's own tower)
    recomputed: torch.Tensor | None = None  # [T, H·W patches] bool, the patches the tower computed (encoder only)


@dataclass
class LLMInputs:
    """What the decoder gets: inputs_embeds [1, L', hidden], attention_mask [1, L'], and per position
    visual_mask [1, L'] (True on visual tokens, the newline included) and sizes [1, L'] (originals each
    position stands for; 1 for text)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    visual_mask: torch.Tensor
    sizes: torch.Tensor


@dataclass
class PromptInputs:
    """Processor output for one prompt with one video: input_ids [1, L] with T·N + 1 video placeholders
    (the +1 is LLaVA-OneVision's newline token), pixel_values_videos [1, T, 3, S, S]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values_videos: torch.Tensor


def received_attention(hidden_states: torch.Tensor, attn: torch.nn.Module, head_chunk: int = 4) -> torch.Tensor:
    """Mean attention each token receives in a (non-causal) self-attention layer.

    hidden_states: [B, L, C] the layer's attention input. Returns [B, L]: softmax(q·kᵀ·scale) averaged
    over heads and queries. Heads are done a few at a time to bound memory ([B, h, L, L] per chunk).
    """
    b, length, _ = hidden_states.shape
    q = attn.q_proj(hidden_states).view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    total = hidden_states.new_zeros(b, length)
    for h in range(0, attn.num_heads, head_chunk):
        weights = torch.softmax(q[:, h : h + head_chunk] @ k[:, h : h + head_chunk].transpose(-1, -2) * attn.scale, -1)
        total += weights.sum(dim=(1, 2))
    return total / (attn.num_heads * length)


def pool_like_features(scores: torch.Tensor, side: int) -> torch.Tensor:
    """Pool per-patch scores [B, side²] onto LLaVA-OneVision's pooled grid, as `apply_pooling` does
    with features (bilinear to ceil(side/2)). Returns [B, ceil(side/2)²]."""
    grid = scores.view(-1, 1, side, side)
    pooled = F.interpolate(grid, size=(math.ceil(side / 2), math.ceil(side / 2)), mode="bilinear")
    return pooled.flatten(1)


class LlavaOnevisionAdapter:
    """Frames → tokens → reduced `inputs_embeds` → generate, on an unmodified LLaVA-OneVision."""

    def __init__(self, model, processor) -> None:
        self.model = model
        self.processor = processor
        self.config = model.config
        vision = self.config.vision_config
        self.patch_side = vision.image_size // vision.patch_size
        self.grid_hw = (math.ceil(self.patch_side / 2), math.ceil(self.patch_side / 2))
        self.video_token_id = self.config.video_token_index

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def language_model(self):
        return self.model.model.language_model

    def prepare(self, frames: np.ndarray, prompt: str) -> PromptInputs:
        """Chat-format `prompt` with one video of `frames` [T, H, W, 3] uint8 through the model's processor."""
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        out = self.processor(text=text, videos=[frames], return_tensors="pt")
        return PromptInputs(out["input_ids"], out["attention_mask"], out["pixel_values_videos"].to(self.model.dtype))

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """Frames [T, H, W, 3] uint8 → the model's pixel_values_videos [1, T, 3, S, S]."""
        out = self.processor.video_processor(videos=[frames], return_tensors="pt")
        return out["pixel_values_videos"].to(self.model.dtype)

    @property
    def tower(self) -> Tower:
        """The SigLIP tower up to the (last) layer whose output the model uses (vision_feature_layer)."""
        chosen = self.config.vision_feature_layer
        return siglip_tower(self.model.model.vision_tower.vision_model,
                            max(chosen) if isinstance(chosen, list) else chosen)

    def vision_encoder(self, config: EncoderConfig) -> VisionEncoder:
        """Encoder-side reduction over this model's tower; it keeps reuse state across `encode` calls
        until its `reset`."""
        if self.config.vision_feature_select_strategy != "full" or isinstance(self.config.vision_feature_layer, list):
            raise ConfigError("encoder-side reduction needs vision_feature_select_strategy 'full' and one feature layer")
        return VisionEncoder(self.tower, config, attention=True)

    @torch.no_grad()
    def encode(self, pixel_values_videos: torch.Tensor, frames_per_batch: int = 8,
               progress: ProgressFn | None = None, encoder: VisionEncoder | None = None) -> EncodedVideo:
        """Run the vision tower in batches of frames (same numbers as one batch; bounded memory).

        pixel_values_videos: [1, T, 3, S, S]. Returns features [T, N, D] and attention [T, N]. With an
        active `encoder` (see `vision_encoder`) the tower does less work; the projector and 2×2 pooling
        then run on its output grid as the model's own `get_video_features` does.
        """
        if encoder is not None and encoder.config.active:
            out = encoder.encode(pixel_values_videos[0], progress=progress)
            model = self.model.model
            feats = model.apply_pooling(model.multi_modal_projector(out.features.to(self.model.dtype)))
            attention = pool_like_features(out.attention, self.patch_side)
            return EncodedVideo(feats, attention, self.grid_hw, encoder.take_stats(), out.recomputed)
        tower = self.tower
        layer = tower.layers[-1]  # its attention gives the importance the reduction reads
        received: list[torch.Tensor] = []

        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            received.append(received_attention(hidden, module))

        handle = layer.self_attn.register_forward_pre_hook(record, with_kwargs=True)
        num_frames = pixel_values_videos.shape[1]
        features = []
        try:
            for start in range(0, num_frames, frames_per_batch):
                chunk = pixel_values_videos[:, start : start + frames_per_batch]
                features.append(self.model.model.get_video_features(chunk).pooler_output)
                if progress:
                    progress(min(start + frames_per_batch, num_frames), num_frames)
        finally:
            handle.remove()
        feats = torch.cat(features, dim=1).view(num_frames, self.tokens_per_frame, -1)
        attention = pool_like_features(torch.cat(received), self.patch_side)
        return EncodedVideo(feats, attention, self.grid_hw, full_encode_stats(tower, num_frames))

    @torch.no_grad()
    def encode_tokens(self, pixel_values_videos: torch.Tensor, encoder: VisionEncoder) -> VisualTokens:
        """Merged tower tokens straight to the LLM: each merged token is projected once and stands for the
        14×14 cells it owns (no unmerge, no pooling; `encoder.tokens`). pixel_values_videos [1, T, 3, S, S]."""
        state = encoder.encode_merged(pixel_values_videos[0])
        values = self.model.model.multi_modal_projector(state.x.to(self.model.dtype))
        return merged_visual_tokens(state, values, (self.patch_side, self.patch_side), self.grid_hw)

    def reduced_inputs(self, prompt: PromptInputs, tokens: VisualTokens) -> LLMInputs:
        """Replace the video placeholders with the reduced tokens plus the video's newline token;
        L' = L − (T·N − M)."""
        ids = prompt.input_ids[0]
        where = (ids == self.video_token_id).nonzero().squeeze(1)
        if len(where) == 0 or where[-1] - where[0] + 1 != len(where):
            raise ValueError("expected one contiguous run of video placeholders in the prompt")
        first, last = int(where[0]), int(where[-1])
        placeholders = torch.full((len(tokens) + 1,), self.video_token_id, dtype=ids.dtype)
        new_ids = torch.cat([ids[:first], placeholders, ids[last + 1 :]])[None]
        video = torch.cat([tokens.features, self.model.model.image_newline[None]]).to(self.model.dtype)
        embeds = self.model.get_input_embeddings()(new_ids)
        mask = (new_ids == self.video_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, video)
        visual = new_ids == self.video_token_id
        sizes = torch.ones(new_ids.shape)
        sizes[visual] = torch.cat([tokens.size.float(), torch.ones(1)])
        return LLMInputs(embeds, torch.ones_like(new_ids), visual, sizes)

    @torch.no_grad()
    def generate(self, inputs: LLMInputs, max_new_tokens: int, logits_processor=None) -> torch.Tensor:
        """Greedy generation; returns the new token ids [1, ≤max_new_tokens]. Run it inside
        `inner_stage(...)` to merge tokens inside the LLM."""
        return self.model.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                   max_new_tokens=max_new_tokens, do_sample=False, logits_processor=logits_processor)

    @staticmethod
    def needs_stage(inputs: LLMInputs, inner: InnerConfig | None) -> bool:
        """False when there is nothing to do: no merging at K, and no merged token for proportional
        attention to weigh (so unreduced inputs run the unmodified model)."""
        if inner is None or not inner.active:
            return False
        return inner.merging or bool((inputs.sizes != 1).any())

    @contextmanager
    def inner_stage(self, inputs: LLMInputs, inner: InnerConfig | None):
        """The inner-LLM stage for `inputs`, installed for the duration (None when inactive)."""
        if not self.needs_stage(inputs, inner):
            yield None
            return
        stage = InnerStage(self.language_model, inner)
        stage.prepare(inputs.visual_mask, inputs.sizes)
        with stage.installed():
            yield stage

    def decode(self, token_ids: torch.Tensor) -> str:
        return self.processor.tokenizer.decode(token_ids[0], skip_special_tokens=True)
