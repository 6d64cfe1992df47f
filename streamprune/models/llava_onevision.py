"""Thin adapter over transformers' `LlavaOnevisionForConditionalGeneration`.

Encoding runs the model's own `get_video_features` (SigLIP → projector → 2×2 bilinear pooling) and
records, with a pre-hook on the last used SigLIP attention layer, the attention each patch received
(averaged over heads and queries), without switching any layer to eager attention. Reduced tokens go
into the LLM as `inputs_embeds` with one placeholder per kept token (1-D positions, as the model uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from streamprune.encoder import EncoderConfig, Tower, VisionEncoder, full_encode_stats, siglip_tower
from streamprune.encoder.tokens import merged_visual_tokens
from streamprune.errors import ConfigError
from streamprune.models.base import (
    EncodedVideo,
    LLMInputs,
    ProgressFn,
    PromptInputs,
    VideoLLMAdapter,
    placeholder_run,
    sizes_row,
    vision_transformer,
)
from streamprune.tokens import VisualTokens

# the video's embedding rows [R, D] and a function giving their sizes [R] (lazy: see `video_layout`)
VideoLayout = tuple[torch.Tensor, Callable[[], torch.Tensor]]


def received_attention(hidden_states: torch.Tensor, attn: torch.nn.Module, head_chunk: int = 4) -> torch.Tensor:
    """Mean attention each token receives in a (non-causal) self-attention layer.

    hidden_states: [B, L, C] the layer's attention input. Returns [B, L] float32: softmax(q·kᵀ·scale)
    averaged over heads and queries, computed in float32 whatever the model's dtype. Heads are done a few
    at a time to bound memory ([B, h, L, L] per chunk).
    """
    b, length, _ = hidden_states.shape
    q = attn.q_proj(hidden_states).view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    k = attn.k_proj(hidden_states).view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    total = q.new_zeros(b, length)
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


class LlavaOnevisionAdapter(VideoLLMAdapter):
    """LLaVA-OneVision: 196 tokens per frame (27×27 SigLIP patches, bilinear 2× pooling), one newline
    token after the whole video, 1-D positions."""

    model_type = "llava_onevision"
    supports_streaming = True

    def __init__(self, model, processor) -> None:
        super().__init__(model, processor)
        vision = self.config.vision_config
        self.patch_side = vision.image_size // vision.patch_size
        self.grid_hw = self.pooled_grid(self.patch_side)
        self.video_token_id = self.config.video_token_index

    @staticmethod
    def pooled_grid(side: int) -> tuple[int, int]:
        """Token grid after `apply_pooling` (bilinear to ceil(side/2))."""
        return math.ceil(side / 2), math.ceil(side / 2)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Projected patch features [T, side², D] → the model's pooled tokens [T, N, D]."""
        return self.model.model.apply_pooling(features)

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """The model's own `get_video_features` on [1, F, 3, S, S] → tokens [F·N, D] (no newline)."""
        features = self.model.model.get_video_features(pixel_values_videos).pooler_output
        # only the frames' tokens: a release that appends the newline row here gets it cut (`video_layout` adds it)
        rows = pixel_values_videos.shape[1] * self.tokens_per_frame
        return features.reshape(-1, self.config.text_config.hidden_size)[:rows]

    def pool_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-patch scores [T, side²] → per token [T, N], pooled like the features."""
        return pool_like_features(scores, self.patch_side)

    def prepare(self, frames: np.ndarray, prompt: str, timestamps: np.ndarray | None = None) -> PromptInputs:
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        out = self.processor(text=text, videos=[frames], return_tensors="pt")
        prompt_inputs = PromptInputs(out["input_ids"], out["attention_mask"], out["pixel_values_videos"])
        return prompt_inputs.to(self.device, self.dtype)

    def encode_frames(self, frames: np.ndarray, timestamps: np.ndarray | None = None,
                      encoder: VisionEncoder | None = None) -> EncodedVideo:
        return self.encode_pixels(self.pixel_values(frames), encoder=encoder)

    def stream_layout(self):
        from streamprune.models.streaming import OneVisionLayout

        return OneVisionLayout(self)

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """Frames [T, H, W, 3] uint8 → the model's pixel_values_videos [1, T, 3, S, S] (its device and dtype)."""
        out = self.processor.video_processor(videos=[frames], return_tensors="pt")
        return out["pixel_values_videos"].to(self.device, self.dtype)

    @property
    def tower(self) -> Tower:
        """The SigLIP tower up to the (last) layer whose output the model uses (vision_feature_layer)."""
        chosen = self.config.vision_feature_layer
        return siglip_tower(vision_transformer(self.model.model.vision_tower),
                            max(chosen) if isinstance(chosen, list) else chosen)

    def vision_encoder(self, config: EncoderConfig) -> VisionEncoder:
        """Encoder-side reduction over this model's tower; it keeps reuse state across `encode` calls
        until its `reset`."""
        if self.config.vision_feature_select_strategy != "full" or isinstance(self.config.vision_feature_layer, list):
            raise ConfigError("encoder-side reduction needs vision_feature_select_strategy 'full' and one feature layer")
        return VisionEncoder(self.tower, config, attention=True)

    def encode(self, prompt: PromptInputs, frames_per_batch: int = 8, progress: ProgressFn | None = None,
               encoder: VisionEncoder | None = None) -> EncodedVideo:
        return self.encode_pixels(prompt.pixel_values_videos, frames_per_batch, progress, encoder)

    @torch.no_grad()
    def encode_pixels(self, pixel_values_videos: torch.Tensor, frames_per_batch: int = 8,
                      progress: ProgressFn | None = None, encoder: VisionEncoder | None = None) -> EncodedVideo:
        """Run the vision tower in batches of frames (same numbers as one batch; bounded memory).

        pixel_values_videos: [1, T, 3, S, S]. Returns features [T, N, D] (model dtype) and attention [T, N]
        (float32). With an
        active `encoder` (see `vision_encoder`) the tower does less work; the projector and pooling
        then run on its output grid as the model's own `get_video_features` does.
        """
        model = self.model.model
        if encoder is not None and encoder.config.active:
            out = encoder.encode(pixel_values_videos[0], progress=progress)
            feats = self.pool(model.multi_modal_projector(out.features.to(self.dtype)))
            return EncodedVideo(feats, self.pool_scores(out.attention.float()), self.grid_hw, encoder.take_stats(),
                                out.recomputed)
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
                features.append(self.video_features(pixel_values_videos[:, start : start + frames_per_batch]))
                if progress:
                    progress(min(start + frames_per_batch, num_frames), num_frames)
        finally:
            handle.remove()
        feats = torch.cat(features).view(num_frames, self.tokens_per_frame, -1)
        return EncodedVideo(feats, self.pool_scores(torch.cat(received)), self.grid_hw,
                            full_encode_stats(tower, num_frames))

    @torch.no_grad()
    def encode_tokens(self, pixel_values_videos: torch.Tensor, encoder: VisionEncoder) -> VisualTokens:
        """Merged tower tokens straight to the LLM: each merged token is projected once and stands for the
        14×14 cells it owns (no unmerge, no pooling; `encoder.tokens`). pixel_values_videos [1, T, 3, S, S]."""
        state = encoder.encode_merged(pixel_values_videos[0])
        values = self.model.model.multi_modal_projector(state.x.to(self.dtype))
        return merged_visual_tokens(state, values, (self.patch_side, self.patch_side), self.grid_hw)

    def video_layout(self, tokens: VisualTokens) -> VideoLayout:
        """The video's embedding rows: [M + 1, D] values (the reduced tokens, then the one newline token), and
        a function giving their [M + 1] sizes (1 for the newline), called only when sizes are read (they
        may need the reduction's attribution of dropped tokens)."""
        newline = self.model.model.image_newline[None].to(tokens.features.dtype)

        def sizes() -> torch.Tensor:
            return torch.cat([tokens.size.float(), torch.ones(1, device=tokens.device)])

        return torch.cat([tokens.features, newline]), sizes

    def reduced_inputs(self, prompt: PromptInputs, tokens: VisualTokens,
                       encoded: EncodedVideo | None = None) -> LLMInputs:
        """Replace the video placeholders with the video layout of the reduced tokens; L' = L − (T·N − M)."""
        ids = prompt.input_ids[0]
        first, last = placeholder_run(ids, self.video_token_id)
        values, sizes = self.video_layout(tokens)
        placeholders = torch.full((len(values),), self.video_token_id, dtype=ids.dtype, device=ids.device)
        new_ids = torch.cat([ids[:first], placeholders, ids[last + 1 :]])[None]
        visual = new_ids == self.video_token_id
        return LLMInputs(self.embed(new_ids, self.video_token_id, values), torch.ones_like(new_ids), visual,
                         lambda: sizes_row(visual, sizes()))
