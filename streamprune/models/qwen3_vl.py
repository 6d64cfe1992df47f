"""Thin adapter over transformers' `Qwen3VLForConditionalGeneration` (built on the Qwen2.5-VL adapter).

What differs from Qwen2.5-VL:
- 16-px patches, no attention windows; each frame pair is its own grid *and* its own run of
  placeholders, after a `<t seconds>` timestamp and inside `<|vision_start|>…<|vision_end|>` (the same
  prompt on every transformers version: see `chat_text`);
  `get_rope_index` gives each grid its own 3-D block. Reduced tokens keep those positions, as on
  Qwen2.5-VL. A grid whose tokens were all merged into earlier grids keeps its timestamp and (empty)
  wrapper: positions are explicit, so the text costs a few tokens and the model's timeline stays whole,
  while the tokens that stand for that time sit under their segment's first timestamp.
- DeepStack: features from vision layers `deepstack_visual_indexes` are added to the decoder's hidden
  states at the visual positions after decoder layers 0..n−1. They are reduced consistently with the
  tokens (`VisualTokens.carry`: each reduced token gets the mean over the originals it stands for) and
  handed to the decoder at the reduced visual positions. The inner stage must therefore sit at K ≥ n:
  merging earlier would leave later DeepStack additions pointing at positions that no longer exist.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from streamprune.encoder import EncoderStats
from streamprune.errors import ConfigError
from streamprune.flops import vision_flops
from streamprune.models.base import EncodedVideo, LLMInputs
from streamprune.models.qwen2_5_vl import Qwen2_5_VLAdapter, random_qwen
from streamprune.models.tiny import save_random
from streamprune.reduce.inner_cuts import InnerConfig, validate
from streamprune.tokens import VisualTokens


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Qwen3-VL: a token grid per frame pair with its timestamp, 3-D positions kept, DeepStack carried."""

    model_type = "qwen3_vl"

    def importance_block(self) -> torch.nn.Module:
        return self.model.model.visual.blocks[-1]  # every block attends over the whole frame pair

    def token_order(self, grid_hw: tuple[int, int], device: torch.device) -> None:
        return None  # no attention windows: the blocks see tokens in raster order

    def chat_text(self, prompt: str) -> str:
        """The chat template writes the video as <|vision_start|><|video_pad|><|vision_end|>. The processor
        replaced that whole wrapper with the per-pair "<t seconds><|vision_start|>…<|vision_end|>" blocks up
        to transformers 5.16 (Qwen3-VL's own layout); from 5.17 it expands only <|video_pad|> and leaves the
        wrapper around the blocks, doubling it. Both expand a bare <|video_pad|> the same way, so that is
        what it gets: the same prompt on every version."""
        processor = self.processor
        wrapped = processor.vision_start_token + processor.video_token + processor.vision_end_token
        return super().chat_text(prompt).replace(wrapped, processor.video_token)

    def tower_stats(self, grids: int, patches: int) -> EncoderStats:
        vision = self.config.vision_config
        flops = grids * vision_flops(vision.hidden_size, vision.intermediate_size, [(patches, patches, patches)]
                                     * vision.depth)
        return EncoderStats(grids, grids, grids * patches, grids * patches, flops, flops)

    def stream_layout(self):
        from streamprune.models.streaming import Qwen3VLLayout

        return Qwen3VLLayout(self)

    @property
    def deepstack_layers(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    def add_side_inputs(self, inputs: LLMInputs, tokens: VisualTokens, order: torch.Tensor,
                        encoded: EncodedVideo | None) -> None:
        if encoded is None or len(encoded.side_features) != self.deepstack_layers:
            raise ValueError("Qwen3-VL needs the EncodedVideo the tokens came from (its DeepStack features)")
        inputs.deepstack = [tokens.carry(side)[order] for side in encoded.side_features]

    @contextmanager
    def _deepstack(self, inputs: LLMInputs):
        """Hand the reduced DeepStack features to the decoder on full-sequence forwards (prefill, or
        prompt + answer without a cache); decode steps add none, as in the model's own generate."""
        prompt_len = inputs.visual_mask.shape[1]

        def hook(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            if embeds is None or embeds.shape[1] < prompt_len:
                return None
            mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            mask[:, :prompt_len] = inputs.visual_mask
            kwargs.update(visual_pos_masks=mask, deepstack_visual_embeds=inputs.deepstack)
            return args, kwargs

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def generate(self, inputs: LLMInputs, max_new_tokens: int, logits_processor=None, **kwargs):
        with self._deepstack(inputs):
            return super().generate(inputs, max_new_tokens, logits_processor, **kwargs)

    def forward(self, inputs: LLMInputs, answer: torch.Tensor | None = None, **kwargs):
        with self._deepstack(inputs):
            return super().forward(inputs, answer, **kwargs)

    @contextmanager
    def inner_stage(self, inputs: LLMInputs, inner: InnerConfig | None):
        if inner is not None and inner.merging:
            layer = validate(inner, self.config.text_config.num_hidden_layers)
            if layer < self.deepstack_layers:
                raise ConfigError(f"--inner-layer must be at least {self.deepstack_layers} on Qwen3-VL: DeepStack "
                                  f"adds vision features after decoder layers 0–{self.deepstack_layers - 1}")
        with super().inner_stage(inputs, inner) as stage:
            yield stage


def build_random(spec_path: Path):
    """A random-weight Qwen3-VL and its processor (see `random_qwen`)."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    def processor(spec, tok):
        size = {"shortest_edge": spec["pixels"]["min"], "longest_edge": spec["pixels"]["max"]}
        patch = spec["vision_config"]["patch_size"]
        return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, patch_size=patch),
                                video_processor=Qwen3VLVideoProcessor(size=size, patch_size=patch),
                                tokenizer=tok, chat_template=spec["chat_template"])

    return random_qwen(spec_path, Qwen3VLConfig, Qwen3VLForConditionalGeneration, processor)


def build_tiny(out_dir: Path, spec_path: Path) -> Path:
    """Write the random-weight model of `spec_path` (model, processor, tokenizer) to `out_dir`."""
    return save_random(out_dir, spec_path, *build_random(spec_path))
