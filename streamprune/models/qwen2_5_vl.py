"""Thin adapter over transformers' `Qwen2_5_VLForConditionalGeneration`.

Qwen2.5-VL turns each pair of frames (temporal_patch_size 2) into one token grid of (H/28)×(W/28)
tokens: 14-px patches in a windowed ViT, 2×2 patches merged per token. Its decoder uses 3-D M-RoPE: a
visual token's position is (t, h, w) from `get_rope_index`, text continues from the largest position
+ 1. Dropping tokens and letting the model renumber 1-D (what `inputs_embeds` alone gives) silently
loses where every token was, so reduced tokens keep the (t, h, w) they had in the unreduced sequence
(`get_rope_index` run on the full prompt), text after the video keeps its original positions, and
decoding continues from there (generate steps each row by +1). A merged token takes the position of
its representative — the cluster centre for spatial merges; a temporally merged token sits at its
segment's first grid, where HoliTom places it in the sequence.

Importance: attention received in the tower's last full-attention block (within each frame pair),
averaged over heads and queries, then over the 2×2 patches of each token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from streamprune.encoder import EncoderConfig, EncoderStats
from streamprune.encoder.qwen_tower import QwenVisionEncoder, qwen_tower, window_raster_order
from streamprune.flops import vision_flops
from streamprune.models.base import (
    EncodedVideo,
    LLMInputs,
    ProgressFn,
    PromptInputs,
    VideoLLMAdapter,
    sizes_row,
)
from streamprune.models.tiny import byte_level_tokenizer, save_random
from streamprune.tokens import VisualTokens


def received_attention_grids(hidden: torch.Tensor, attn: torch.nn.Module, position_embeddings, per_grid: int,
                             max_elements: int = 2**26) -> torch.Tensor:
    """Mean attention each patch receives in a Qwen vision attention layer that attends within each grid.

    hidden: [S, C] the layer's attention input, S = G·per_grid (G frame pairs of `per_grid` patches each, in
    the blocks' order; a full-attention block attends within each pair). Returns [S] float32: softmax(q·kᵀ·
    scale) averaged over heads and queries, computed in float32, all grids and heads at once in slices of
    at most `max_elements` attention weights (bounded memory).
    """
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision  # the model's own
    s, heads = hidden.shape[0], attn.num_heads
    q, k, _ = attn.qkv(hidden).reshape(s, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rope(q, k, *position_embeddings)
    # [G·heads, per_grid, hd]: one attention matrix per (grid, head)
    q, k = (x.float().view(-1, per_grid, heads, x.shape[-1]).transpose(1, 2).flatten(0, 1) for x in (q, k))
    step = max(1, max_elements // per_grid**2)
    received = torch.cat([torch.softmax(q[i:i + step] @ k[i:i + step].transpose(-1, -2) * attn.scaling, -1).sum(1)
                          for i in range(0, q.shape[0], step)])  # [G·heads, per_grid]
    return (received.view(-1, heads, per_grid).sum(1) / (heads * per_grid)).flatten()


class Qwen2_5_VLAdapter(VideoLLMAdapter):
    """Qwen2.5-VL: a token grid per frame pair, 3-D M-RoPE positions kept for every surviving token."""

    model_type = "qwen2_5_vl"
    frames_per_grid = 2
    supports_streaming = True

    def __init__(self, model, processor) -> None:
        super().__init__(model, processor)
        self.video_token_id = self.config.video_token_id
        vision = self.config.vision_config
        self.frames_per_grid = vision.temporal_patch_size
        self.merge = vision.spatial_merge_size
        self.grid_hw = (0, 0)  # set per video by `prepare` (the grid follows the video's aspect ratio)
        # False: the naive alternative — visual tokens renumbered 1-D like text (for the benchmark's ablation)
        self.keep_3d_positions = True

    def chat_text(self, prompt: str) -> str:
        """The chat-formatted prompt with one video marker, as the processor expands it."""
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def prepare(self, frames: np.ndarray, prompt: str, timestamps: np.ndarray | None = None) -> PromptInputs:
        text = self.chat_text(prompt)
        # our frames are already sampled: tell the processor their rate (it spaces temporal positions, and
        # Qwen3-VL's timestamps, by it) and keep it from sampling again
        from transformers.video_utils import VideoMetadata

        metadata = VideoMetadata(total_num_frames=len(frames), fps=_sampled_fps(timestamps),
                                 frames_indices=list(range(len(frames))))
        out = self.processor(text=[text], videos=[frames], return_tensors="pt", return_mm_token_type_ids=True,
                             videos_kwargs={"video_metadata": [metadata], "do_sample_frames": False})
        grid = out["video_grid_thw"]
        self.grid_hw = (int(grid[0, 1]) // self.merge, int(grid[0, 2]) // self.merge)
        extra = {"video_grid_thw": grid, "mm_token_type_ids": out["mm_token_type_ids"]}
        if "second_per_grid_ts" in out:  # Qwen2.5-VL only
            extra["second_per_grid_ts"] = torch.as_tensor(out["second_per_grid_ts"])
        prompt_inputs = PromptInputs(out["input_ids"], out["attention_mask"], out["pixel_values_videos"], extra)
        return prompt_inputs.to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, prompt: PromptInputs, frames_per_batch: int = 8, progress: ProgressFn | None = None,
               encoder=None) -> EncodedVideo:
        """The model's own vision tower, a few frame pairs at a time (each pair is attended on its own, so
        batching does not change the numbers). Returns features [G, N, D] (G frame pairs, N = H·W tokens
        in raster order; model dtype) and attention [G, N] (float32).

        With an active `encoder` (see `vision_encoder`) our loop over the tower's blocks runs instead, with
        temporal reuse and/or merging; its state persists across calls until its `reset`."""
        grid_thw = prompt.extra["video_grid_thw"]
        t, h, w = (int(x) for x in grid_thw[0])
        if encoder is not None and encoder.config.active:
            out = encoder.encode(prompt.pixel_values_videos, (t, h, w), progress)
            return EncodedVideo(out.features, out.attention, (h // self.merge, w // self.merge), encoder.take_stats(),
                                out.recomputed, side_features=out.side)
        per_grid = h * w  # patches per frame pair
        grid_hw = (h // self.merge, w // self.merge)
        order = self.token_order(grid_hw, grid_thw.device)  # the blocks' token order → raster, per grid
        received: list[torch.Tensor] = []

        def record(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            received.append(received_attention_grids(hidden, module, kwargs["position_embeddings"], per_grid))

        handle = self.importance_block().attn.register_forward_pre_hook(record, with_kwargs=True)
        groups = max(1, frames_per_batch // self.frames_per_grid)
        features, scores, side = [], [], []
        try:
            for start in range(0, t, groups):
                n = min(groups, t - start)
                grid = grid_thw.new_tensor([[n, h, w]])
                pixels = prompt.pixel_values_videos[start * per_grid:(start + n) * per_grid]
                out = self.model.model.get_video_features(pixels, grid)
                features.append(torch.cat(out.pooler_output))
                # per DeepStack layer: a tensor, or (transformers ≥ 5.2x) one tensor per video, as pooler_output
                side.append([torch.cat(f) if isinstance(f, (list, tuple)) else f
                             for f in getattr(out, "deepstack_features", None) or []])
                per_token = received.pop().view(n, -1, self.merge ** 2).mean(2)  # 2×2 patches per token
                scores.append(per_token if order is None else per_token[:, order])
                if progress:
                    progress(min((start + n) * self.frames_per_grid, t * self.frames_per_grid),
                             t * self.frames_per_grid)
        finally:
            handle.remove()
        tokens = grid_hw[0] * grid_hw[1]
        side_features = [torch.cat(layer).view(t, tokens, -1) for layer in zip(*side, strict=True)]
        return EncodedVideo(torch.cat(features).view(t, tokens, -1), torch.cat(scores).view(t, tokens),
                            grid_hw, self.tower_stats(t, per_grid), side_features=side_features)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Vision patches per frame (rows, columns) of the last prepared video."""
        return self.grid_hw[0] * self.merge, self.grid_hw[1] * self.merge

    def vision_encoder(self, config: EncoderConfig) -> QwenVisionEncoder:
        """Encoder-side reduction over this model's vision transformer (`encoder.qwen_tower`: reuse per
        attention window on Qwen2.5-VL, per 2×2 merge group on Qwen3-VL; merging inside windows). It keeps
        reuse state across `encode` calls until its `reset`."""
        std = getattr(self.processor.video_processor, "image_std", None) or [0.5]
        std = sum(std) / len(std) if isinstance(std, (list, tuple)) else float(std)
        return QwenVisionEncoder(qwen_tower(self.model.model.visual), config, pixel_level=1 / 255 / std)

    def importance_block(self) -> torch.nn.Module:
        """The vision block whose attention gives the importance: the last full-attention one."""
        visual = self.model.model.visual
        return visual.blocks[max(visual.fullatt_block_indexes)]

    def token_order(self, grid_hw: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """[H·W] permutation from the vision blocks' token order to raster order within a grid (None: they
        are in raster order already): the ViT runs windows of tokens together, and the model undoes that
        after the merger. Computed from the config (transformers moved the model's own window index out of
        the vision model in 5.17)."""
        vision = self.config.vision_config
        return window_raster_order(grid_hw, vision.window_size // self.merge // vision.patch_size, device)

    def tower_stats(self, grids: int, patches: int) -> EncoderStats:
        """FLOPs of the full vision tower on `grids` frame pairs of `patches` patches each: windowed blocks
        attend within windows of (window_size/patch)² patches, full blocks within the frame pair."""
        vision = self.config.vision_config
        window = min(patches, (vision.window_size // vision.patch_size) ** 2)
        counts = [(patches, patches if i in vision.fullatt_block_indexes else window, patches)
                  for i in range(vision.depth)]
        # vision_flops counts a 2-matrix MLP; Qwen's SwiGLU has 3 matrices (1.5×)
        flops = grids * vision_flops(vision.hidden_size, int(1.5 * vision.intermediate_size), counts)
        return EncoderStats(grids, grids, grids * patches, grids * patches, flops, flops)

    def full_positions(self, prompt: PromptInputs) -> torch.Tensor:
        """The model's own 3-D positions of the unreduced prompt: [3, 1, L]."""
        extra = prompt.extra
        positions, _ = self.model.model.get_rope_index(prompt.input_ids, extra["mm_token_type_ids"],
                                                       video_grid_thw=extra["video_grid_thw"],
                                                       second_per_grid_ts=extra.get("second_per_grid_ts"),
                                                       attention_mask=prompt.attention_mask)
        return positions

    def layout(self, prompt: PromptInputs, tokens: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the reduced prompt's positions come from in the unreduced one, and the token order.

        The video placeholders of the unreduced prompt are grid-major (grid g's N tokens in raster order,
        in one run or one run per grid). Each grid's surviving tokens take the place of its placeholders,
        in `tokens`' order; text stays. Returns keep [L'] (index into the unreduced prompt of each
        reduced position) and order [M] (the tokens' order of appearance)."""
        ids = prompt.input_ids[0]
        is_video = ids == self.video_token_id
        video = is_video.nonzero().squeeze(1)  # [T·N]
        text = (~is_video).nonzero().squeeze(1)
        n = tokens.tokens_per_frame
        order = torch.argsort(tokens.frame, stable=True)
        source = video[tokens.frame[order] * n + tokens.position[order]]
        # sort key: text by its own index; a token by its grid's first placeholder, then its rank
        m = len(order)
        rank = torch.arange(m, device=ids.device)
        keys = torch.cat([text * (m + 1), video[tokens.frame[order] * n] * (m + 1) + 1 + rank])
        return torch.cat([text, source])[torch.argsort(keys)], order

    def reduced_inputs(self, prompt: PromptInputs, tokens: VisualTokens,
                       encoded: EncodedVideo | None = None) -> LLMInputs:
        """The prompt with each grid's placeholders replaced by its surviving tokens, and position_ids
        [4, 1, L']: a 1-D text row (the mask's), then the t/h/w rows the model's own `get_rope_index`
        gives those positions in the unreduced prompt (see the module docstring)."""
        keep, order = self.layout(prompt, tokens)
        new_ids = prompt.input_ids[0, keep][None]
        visual = new_ids == self.video_token_id
        embeds = self.embed(new_ids, self.video_token_id, tokens.features[order])
        length = new_ids.shape[1]
        text_row = torch.arange(length, device=new_ids.device)[None, None]
        if self.keep_3d_positions:
            rope = self.full_positions(prompt)[:, :, keep]
        else:  # naive: every row numbered like text, as inputs_embeds without position_ids would be
            rope = text_row.expand(3, 1, length)
        inputs = LLMInputs(embeds, torch.ones_like(new_ids), visual, lambda: sizes_row(visual, tokens.size[order]),
                           torch.cat([text_row, rope]))
        self.add_side_inputs(inputs, tokens, order, encoded)
        return inputs

    def stream_layout(self):
        from streamprune.models.streaming import Qwen2_5_VLLayout

        return Qwen2_5_VLLayout(self)

    def add_side_inputs(self, inputs: LLMInputs, tokens: VisualTokens, order: torch.Tensor,
                        encoded: EncodedVideo | None) -> None:
        """Per-token inputs beyond the embeddings, in the tokens' `order` (Qwen3-VL's DeepStack); none here."""


def _sampled_fps(timestamps: np.ndarray | None) -> float:
    """Frames per second of the sampled frames (the processor spaces temporal positions by it)."""
    if timestamps is None or len(timestamps) < 2 or timestamps[-1] <= timestamps[0]:
        return 2.0  # Qwen2.5-VL's default sampling rate
    return float((len(timestamps) - 1) / (timestamps[-1] - timestamps[0]))


def random_qwen(spec_path: Path, config_cls, model_cls, make_processor):
    """A random-weight Qwen-VL model (`config_cls`, `model_cls`) and its processor from a spec in
    configs/models/ (tiny, or a real checkpoint's dimensions for speed measurements), with a byte-level
    tokenizer carrying the Qwen-VL special tokens. make_processor(spec, tokenizer) builds the processor.
    Returns (model, processor)."""
    spec = yaml.safe_load(spec_path.read_text())
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = byte_level_tokenizer(specials)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    # a real-size spec gives the real vocabulary (the LM head's cost); the byte tokenizer uses the first ids
    text = {"vocab_size": len(tok), **spec["text_config"], "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "bos_token_id": None}
    config = config_cls(text_config=text, vision_config=spec["vision_config"],
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        tie_word_embeddings=spec["text_config"].get("tie_word_embeddings", True))
    torch.manual_seed(spec.get("seed", 0))
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None  # random weights: run to max_new_tokens
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, make_processor(spec, tok)


def build_random(spec_path: Path):
    """A random-weight Qwen2.5-VL and its processor (see `random_qwen`)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    def processor(spec, tok):
        bounds = {"min_pixels": spec["pixels"]["min"], "max_pixels": spec["pixels"]["max"]}
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**bounds),
                                   video_processor=Qwen2VLVideoProcessor(**bounds),
                                   tokenizer=tok, chat_template=spec["chat_template"])

    return random_qwen(spec_path, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, processor)


def build_tiny(out_dir: Path, spec_path: Path) -> Path:
    """Write the random-weight model of `spec_path` (model, processor, tokenizer) to `out_dir`."""
    return save_random(out_dir, spec_path, *build_random(spec_path))
