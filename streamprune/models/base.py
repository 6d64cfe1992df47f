"""The adapter interface: what the engine needs from a video LLM, and the parts every adapter shares.

    frames ─prepare─▶ PromptInputs ─encode─▶ EncodedVideo ──reduction──▶ VisualTokens
                      (the model's own         features [T, N, D] per token grid,
                       processor output)       attention [T, N] per-patch importance
    VisualTokens ─reduced_inputs─▶ LLMInputs ─generate─▶ answer   (inner stage on `language_model`)

A "token grid" is what the model turns into one H×W block of visual tokens: one frame for
LLaVA-OneVision / LLaVA-Video / SmolVLM2, a pair of frames for Qwen2.5-VL (`frames_per_grid` = 2).
Reduction sees only grids; each adapter knows how its model places tokens (newlines, frame
timestamps, 3-D positions) and rebuilds exactly that around the tokens that survive.

Devices: `prepare` puts the processor's output on the model's device (pixels in the model's dtype); from
there every tensor an adapter makes is made on its inputs' device. Features and embeddings keep the
model's dtype; per-token importance (`EncodedVideo.attention`) and `LLMInputs.sizes` are float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from streamprune.encoder import EncoderConfig, EncoderStats, VisionEncoder
from streamprune.errors import ConfigError
from streamprune.models.inner_stage import InnerStage
from streamprune.reduce.inner_cuts import InnerConfig
from streamprune.tokens import VisualTokens

ProgressFn = Callable[[int, int], None]


@dataclass
class EncodedVideo:
    """Vision-tower output of one video.

    features:  [T, N, D] visual tokens per token grid, as the LLM would receive them (N = H·W), model dtype.
    attention: [T, N] float32 attention received per token in the last used vision layer, pooled like
               features (float32 whatever the model's dtype: bf16 would tie close scores).
    grid_hw:   (H, W) token grid.
    """

    features: torch.Tensor
    attention: torch.Tensor
    grid_hw: tuple[int, int]
    encoder: EncoderStats | None = None  # what the tower computed (every patch for the model's own tower)
    recomputed: torch.Tensor | None = None  # [T, H·W patches] bool, the patches the tower computed (encoder only)
    # more [T, N, C] values per token the LLM takes at the visual positions (Qwen3-VL's DeepStack features)
    side_features: list[torch.Tensor] = field(default_factory=list)


@dataclass
class PromptInputs:
    """The model's processor output for one prompt with one video.

    input_ids [1, L] with the model's video placeholders; pixel_values_videos: the pixel tensor the
    model's forward takes under `pixel_key`; extra: the other processor outputs it takes (Qwen:
    video_grid_thw, second_per_grid_ts, mm_token_type_ids)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values_videos: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    pixel_key: str = "pixel_values_videos"

    @property
    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the unmodified model's forward / generate."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                self.pixel_key: self.pixel_values_videos, **self.extra}

    def to(self, device: torch.device, dtype: torch.dtype) -> PromptInputs:
        """A copy (same class) with every tensor on `device` and the pixels in `dtype` (the model's); the
        other tensors keep their dtypes (ids, grids, frame spacings)."""
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}
        return dataclasses.replace(self, input_ids=self.input_ids.to(device),
                                   attention_mask=self.attention_mask.to(device),
                                   pixel_values_videos=self.pixel_values_videos.to(device, dtype), extra=extra)


class _Lazy:
    """A dataclass field that may be given as a zero-argument callable: it is called on the first read and
    its value kept. (A descriptor whose class access raises AttributeError leaves the field required.)"""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            raise AttributeError(self.slot)
        value = obj.__dict__[self.slot]
        if callable(value):  # tensors are not callable
            value = obj.__dict__[self.slot] = value()
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class LLMInputs:
    """What the decoder gets.

    inputs_embeds [1, L', hidden] (model dtype), attention_mask [1, L']; per position visual_mask [1, L']
    (True on visual tokens, newlines included) and sizes [1, L'] float32 (originals each position stands
    for; 1 for text). position_ids: None for 1-D models (generate numbers positions 0..L'−1), else the
    model's own layout, e.g. [4, 1, L'] for M-RoPE: a 1-D text row (for the mask) then the kept tokens'
    original t/h/w rows. All on the model's device.

    `sizes` may be given as a zero-argument function: it runs on first read (only reports and proportional
    attention read sizes, and they may need the reduction's attribution of dropped tokens, a dropped × kept
    × D product), and its tensor is kept.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    visual_mask: torch.Tensor
    sizes: torch.Tensor | Callable[[], torch.Tensor] = _Lazy()
    position_ids: torch.Tensor | None = None
    # Qwen3-VL: [P, C] per DeepStack layer, added at the P visual positions after decoder layers 0, 1, ...
    deepstack: list[torch.Tensor] | None = None

    def positions_for(self, extra: int) -> torch.Tensor | None:
        """position_ids continued over `extra` tokens appended after the prompt (each row last + 1, as
        generate does on decode steps); None for 1-D models."""
        if self.position_ids is None:
            return None
        steps = torch.arange(1, extra + 1, dtype=self.position_ids.dtype, device=self.position_ids.device)
        return torch.cat([self.position_ids, self.position_ids[..., -1:] + steps], -1)


class VideoLLMAdapter:
    """Frames → tokens → reduced `inputs_embeds` → generate, on an unmodified transformers model.

    Subclasses set `model_type` (config.json's), `grid_hw`, and implement `prepare`, `encode` and
    `reduced_inputs`; `matches(config)` picks the adapter from a checkpoint's config."""

    model_type: ClassVar[str]
    frames_per_grid: ClassVar[int] = 1  # video frames one token grid stands for
    supports_streaming: ClassVar[bool] = False  # StreamEngine's incremental prefill (`stream_layout`)
    grid_hw: tuple[int, int]

    def __init__(self, model, processor) -> None:
        self.model = model
        self.processor = processor
        self.config = model.config

    @classmethod
    def matches(cls, config) -> bool:
        return config.model_type == cls.model_type

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per token grid, before reduction."""
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder the inner stage is installed on."""
        return self.model.model.language_model

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (and so its inputs go)."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype (pixels and features)."""
        return self.model.dtype

    def prepare(self, frames: np.ndarray, prompt: str, timestamps: np.ndarray | None = None) -> PromptInputs:
        """Chat-format `prompt` with one video of `frames` [T, H, W, 3] uint8 (taken at `timestamps`
        seconds) through the model's own processor."""
        raise NotImplementedError

    def encode(self, prompt: PromptInputs, frames_per_batch: int = 8, progress: ProgressFn | None = None,
               encoder: VisionEncoder | None = None) -> EncodedVideo:
        raise NotImplementedError

    def reduced_inputs(self, prompt: PromptInputs, tokens: VisualTokens,
                       encoded: EncodedVideo | None = None) -> LLMInputs:
        """The prompt with its video placeholders replaced by `tokens` in the model's layout. `encoded` (the
        vision output `tokens` came from) is needed only by models with `side_features` (Qwen3-VL)."""
        raise NotImplementedError

    def encode_frames(self, frames: np.ndarray, timestamps: np.ndarray | None = None,
                      encoder: VisionEncoder | None = None) -> EncodedVideo:
        """Encode frames [F, H, W, 3] uint8 (whole token grids: F a multiple of `frames_per_grid`) on their own,
        as the streaming engine does one grid at a time; the numbers are those of the same frames within a
        clip (each grid is encoded on its own either way)."""
        return self.encode(self.prepare(frames, "", timestamps), encoder=encoder)

    def stream_layout(self):
        """A fresh `models.streaming.StreamLayout`: how this model's prompt is laid out around a video that
        arrives segment by segment."""
        raise ConfigError(f"streaming is not supported for {self.model_type}")

    def vision_encoder(self, config: EncoderConfig) -> VisionEncoder:
        raise ConfigError(f"encoder-side reduction (--encoder) is not supported for {self.model_type} yet; "
                          "it runs on SigLIP towers (LLaVA-OneVision, LLaVA-Video, SmolVLM2, SmolVLA, pi0) "
                          "and Qwen-VL towers (Qwen2.5-VL, Qwen3-VL)")

    @torch.no_grad()
    def generate(self, inputs: LLMInputs, max_new_tokens: int, logits_processor=None, compile: bool = False,
                 stage: InnerStage | None = None, **generate_kwargs):
        """Greedy generation; returns the new token ids [1, ≤max_new_tokens]. Run it inside
        `inner_stage(...)` to merge tokens inside the LLM (and pass that stage when `compile`).

        compile: decode over a static KV cache with a torch.compile'd step (`models.generation`; CUDA), the
        prefill as usual. generate_kwargs go to transformers' generate (e.g. return_dict_in_generate)."""
        if compile:
            from streamprune.models.generation import generate_static

            return generate_static(self, inputs, max_new_tokens, logits_processor, stage, compile=True)
        positions = {} if inputs.position_ids is None else {"position_ids": inputs.position_ids}
        return self.model.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                   max_new_tokens=max_new_tokens, do_sample=False, logits_processor=logits_processor,
                                   **positions, **generate_kwargs)

    @torch.no_grad()
    def forward(self, inputs: LLMInputs, answer: torch.Tensor | None = None, **kwargs):
        """One full, uncached forward over the prompt plus `answer` [1, n] token ids (teacher forcing)."""
        embeds, extra = inputs.inputs_embeds, 0 if answer is None else answer.shape[1]
        if extra:
            embeds = torch.cat([embeds, self.model.get_input_embeddings()(answer)], 1)
        mask = torch.ones(embeds.shape[:2], dtype=inputs.attention_mask.dtype, device=embeds.device)
        positions = inputs.positions_for(extra)
        return self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                          **({} if positions is None else {"position_ids": positions}), **kwargs)

    @staticmethod
    def needs_stage(inputs: LLMInputs, inner: InnerConfig | None) -> bool:
        """False when there is nothing to do: no merging at K, and no merged token for proportional
        attention to weigh (so unreduced inputs run the unmodified model). Reads (so resolves) sizes only
        for a proportional-only config."""
        if inner is None or not inner.active:
            return False
        if inner.merging or inner.kv is not None:
            return True
        return inner.proportional and bool((inputs.sizes != 1).any())

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

    def text_embeddings(self, text: str) -> torch.Tensor:
        """[L, D] the LLM's input embeddings of `text` (no template), for methods that read the question."""
        ids = self.processor.tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            return self.model.get_input_embeddings()(torch.tensor(ids, device=self.device))

    def decode(self, token_ids: torch.Tensor) -> str:
        return self.processor.tokenizer.decode(token_ids[0], skip_special_tokens=True)

    def embed(self, ids: torch.Tensor, placeholder: int, values: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `ids` [1, L'] with the `placeholder` positions filled by `values` [P, D],
        in order (the model's own masked_scatter)."""
        embeds = self.model.get_input_embeddings()(ids)
        mask = (ids == placeholder)[..., None].expand_as(embeds)
        return embeds.masked_scatter(mask, values.to(embeds.dtype))


def placeholder_run(ids: torch.Tensor, token_id: int) -> tuple[int, int]:
    """(first, last) index of the one contiguous run of `token_id` in ids [L]."""
    where = (ids == token_id).nonzero().squeeze(1)
    if len(where) == 0 or where[-1] - where[0] + 1 != len(where):
        raise ValueError("expected one contiguous run of video placeholders in the prompt")
    return int(where[0]), int(where[-1])


def sizes_row(visual: torch.Tensor, token_sizes: torch.Tensor) -> torch.Tensor:
    """sizes [1, L'] float32: 1 everywhere, `token_sizes` (in order) at the True positions of visual [1, L']."""
    # masked_scatter fills the True positions in order, as `embed` places the tokens' values
    return torch.ones(visual.shape, device=visual.device).masked_scatter(visual, token_sizes.float())


def vision_transformer(tower: torch.nn.Module) -> torch.nn.Module:
    """The module holding a SigLIP tower's embeddings / encoder / post_layernorm: `SiglipVisionModel.vision_model`
    up to transformers 5.16, the SiglipVisionModel itself from 5.17 (a SmolVLM tower is already it)."""
    return getattr(tower, "vision_model", tower)


def raster_order(tokens: VisualTokens) -> torch.Tensor:
    """Order of tokens by (grid, row-major position), stable: for models whose layout tokens (row
    newlines, frame wrappers) need each grid's survivors in reading order. Returns [M] long."""
    return torch.argsort(tokens.frame * tokens.tokens_per_frame + tokens.position, stable=True)
