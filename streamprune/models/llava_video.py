"""LLaVA-Video (lmms-lab/LLaVA-Video-7B-Qwen2) on transformers' `LlavaOnevisionForConditionalGeneration`.

LLaVA-Video is LLaVA-OneVision's network (SigLIP-so400m, 384 px, patch 14 → 27×27 patches; 2-layer MLP
projector; Qwen2 decoder) with LLaVA-NeXT's other video layout:

    frame ─SigLIP─▶ [27·27, C] ─projector─▶ [729, D] ─avg_pool2d(2)─▶ [13·13, D]
          ─▶ row by row: 13 tokens, then `image_newline`          = 13 × (13 + 1) = 182 rows per frame

where LLaVA-OneVision pools bilinearly to 14×14 and puts one newline after the whole video.
(`avg_pool2d` drops the 27th patch row and column, as LLaVA-NeXT's `get_2dPool` does.)

Getting a checkpoint. transformers has no LLaVA-Video class, and lmms-lab checkpoints are in
LLaVA-NeXT's own format (model_type "llava", `LlavaQwenForCausalLM`). The weights have exactly the
LLaVA-OneVision layout, so:
1. convert with transformers' `src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py`
   (in the transformers repository, not the wheel). It maps only the OneVision ids to their text models:
   add `lmms-lab/LLaVA-Video-7B-Qwen2` to the Qwen/Qwen2-7B-Instruct branch. Its closing logit check
   knows only OneVision ids and raises for others, after the folder is saved;
2. add LLaVA-NeXT's video keys to the converted `config.json`, with the values LLaVA-Video runs with
   (lmms-eval's `llava_vid`): `"mm_spatial_pool_mode": "average"`, `"mm_spatial_pool_stride": 2`,
   `"mm_newline_position": "grid"`;
3. `--model /path/to/that/folder`.
The config stays a `LlavaOnevisionConfig`; unknown keys are kept as attributes and written back by
`save_pretrained` (tested). `LlavaVideoAdapter.matches` picks this adapter when model_type is
llava_onevision and both `mm_spatial_pool_mode == "average"` and `mm_newline_position == "grid"`;
without them the folder runs as LLaVA-OneVision. `tiny-llava-video` is built the same way (`build_tiny`).

The model's own forward would still pool bilinearly, so this adapter never calls it with pixels:
encoding runs the tower, the projector and average pooling itself, and the LLM always gets
`inputs_embeds`. The processor also counts OneVision's placeholders (T·196 + 1); `prepare` rewrites
the run to LLaVA-Video's T·182 (so `PromptInputs.model_inputs` is not for the unmodified forward here).

Reduced tokens go in per frame in raster order, with one newline after every (frame, grid row) that
keeps at least one token, as HoliTom does for LLaVA-Video; a merged (static) token sits in its
segment's first frame. 1-D positions, as the model uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from streamprune.encoder import VisionEncoder
from streamprune.errors import ConfigError
from streamprune.models.base import PromptInputs, placeholder_run, raster_order
from streamprune.models.llava_onevision import LlavaOnevisionAdapter, VideoLayout
from streamprune.models.tiny import RANDOM_WEIGHTS_MARKER, build_tiny_llava_onevision
from streamprune.tokens import VisualTokens

# LLaVA-NeXT config keys that make a llava_onevision checkpoint LLaVA-Video (see the module docstring)
POOL_MODE, NEWLINE_POSITION, POOL_STRIDE = "mm_spatial_pool_mode", "mm_newline_position", "mm_spatial_pool_stride"


def average_pool(features: torch.Tensor, side: int, stride: int = 2) -> torch.Tensor:
    """LLaVA-NeXT's "average" `get_2dPool`: features [B, side², D] on a side×side grid →
    [B, (side // stride)², D], row-major. avg_pool2d drops a remainder row/column (27 → 13)."""
    b, _, d = features.shape
    grid = features.reshape(b, side, side, d).permute(0, 3, 1, 2).contiguous()
    return F.avg_pool2d(grid, stride).flatten(2).transpose(1, 2)


def average_pool_scores(scores: torch.Tensor, side: int, stride: int = 2) -> torch.Tensor:
    """Per-patch scores [B, side²] → [B, (side // stride)²], pooled like the features (HoliTom pools its
    attention map the way it pools the features)."""
    return F.avg_pool2d(scores.reshape(-1, 1, side, side), stride).flatten(1)


def row_newline_slots(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where tokens and newlines go when a newline follows each run of equal `rows` keys.

    rows: [M] long, a (frame, grid row) key per token, non-decreasing (tokens in raster order).
    Returns (token slots [M], newline slots [R]) in a layout of M + R rows, R = number of runs; each
    newline sits right after the last token of its run."""
    ends = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
    ends[:-1] = rows[1:] != rows[:-1]
    newlines_before = torch.cumsum(ends, 0) - ends.long()  # a run's newline comes after all its tokens
    slots = torch.arange(len(rows), device=rows.device) + newlines_before
    return slots, slots[ends] + 1


def with_placeholder_count(ids: torch.Tensor, token_id: int, count: int) -> torch.Tensor:
    """ids [1, L] with its one run of `token_id` resized to `count` → [1, L − run + count]."""
    first, last = placeholder_run(ids[0], token_id)
    run = torch.full((count,), token_id, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids[0, :first], run, ids[0, last + 1 :]])[None]


class LlavaVideoAdapter(LlavaOnevisionAdapter):
    """LLaVA-Video: 169 tokens per frame (27×27 SigLIP patches, 2×2 average pooling), a newline after
    every grid row of every frame (182 rows per frame unreduced), 1-D positions."""

    model_type = "llava_onevision"

    def stream_layout(self):
        from streamprune.models.streaming import LlavaVideoLayout

        return LlavaVideoLayout(self)

    @classmethod
    def matches(cls, config) -> bool:
        return (config.model_type == cls.model_type and getattr(config, POOL_MODE, None) == "average"
                and getattr(config, NEWLINE_POSITION, None) == "grid")

    @property
    def pool_stride(self) -> int:
        return int(getattr(self.config, POOL_STRIDE, 2) or 2)

    def pooled_grid(self, side: int) -> tuple[int, int]:
        """Token grid after average pooling: side // stride (27 → 13)."""
        return side // self.pool_stride, side // self.pool_stride

    @property
    def layout_per_frame(self) -> int:
        """Embedding rows per frame before reduction: H·(W + 1), a newline closing each row."""
        h, w = self.grid_hw
        return h * (w + 1)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Projected patch features [T, side², D] → LLaVA-Video's tokens [T, N, D]."""
        return average_pool(features, self.patch_side, self.pool_stride)

    def pool_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-patch scores [T, side²] → per token [T, N]."""
        return average_pool_scores(scores, self.patch_side, self.pool_stride)

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """[1, F, 3, S, S] → tokens [F·N, D] (no newline): the tower's hidden state(s) at
        vision_feature_layer, selected as `get_video_features` does, the projector, average pooling.
        (`get_video_features` itself would pool bilinearly.)"""
        model = self.model.model
        hidden = model.vision_tower(pixel_values_videos.flatten(0, 1), output_hidden_states=True).hidden_states
        layer = self.config.vision_feature_layer
        selected = torch.cat([hidden[i] for i in layer], -1) if isinstance(layer, list) else hidden[layer]
        if self.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        return self.pool(model.multi_modal_projector(selected)).reshape(-1, self.config.text_config.hidden_size)

    def prepare(self, frames: np.ndarray, prompt: str, timestamps: np.ndarray | None = None) -> PromptInputs:
        """As LLaVA-OneVision, with the processor's T·196 + 1 video placeholders resized to T·H·(W + 1),
        so the prompt is as long as LLaVA-Video's unreduced prompt. (The unmodified transformers forward
        cannot take it: it would make OneVision's count of features.)"""
        out = super().prepare(frames, prompt, timestamps)
        count = out.pixel_values_videos.shape[1] * self.layout_per_frame
        ids = with_placeholder_count(out.input_ids, self.video_token_id, count)
        return PromptInputs(ids, torch.ones_like(ids), out.pixel_values_videos, out.extra, out.pixel_key)

    def encode_tokens(self, pixel_values_videos: torch.Tensor, encoder: VisionEncoder) -> VisualTokens:
        raise ConfigError("merged tower tokens straight to the LLM are not supported for LLaVA-Video: they "
                          "are read at the centres of LLaVA-OneVision's bilinear 14×14 cells, while LLaVA-Video "
                          "averages 2×2 patch blocks (13×13); use --encoder with unmerging instead")

    def video_layout(self, tokens: VisualTokens) -> VideoLayout:
        """The video's embedding rows: [M + R, D] values (each frame's tokens in raster order, a newline after
        each of the R (frame, row) pairs that keep a token), and a function giving their [M + R] sizes (1 for
        a newline), called only when sizes are read. Unreduced: T·H·(W + 1) rows."""
        order = raster_order(tokens)
        rows = tokens.frame[order] * tokens.grid_hw[0] + tokens.position[order] // tokens.grid_hw[1]
        slots, newline_slots = row_newline_slots(rows)
        total = len(order) + len(newline_slots)
        newline = self.model.model.image_newline.to(tokens.features.dtype)
        values = newline.expand(total, -1).clone()
        values[slots] = tokens.features[order]

        def sizes() -> torch.Tensor:
            return torch.ones(total, device=tokens.device).index_copy_(0, slots, tokens.size[order].float())

        return values, sizes


def build_tiny(out_dir: Path, spec_path: Path) -> Path:
    """Write a tiny random-weight LLaVA-Video to `out_dir`: the tiny LLaVA-OneVision from the same spec
    format, then LLaVA-NeXT's video keys added to config.json, as a user does to a converted checkpoint."""
    spec = yaml.safe_load(spec_path.read_text())
    build_tiny_llava_onevision(out_dir, spec_path)
    marker = out_dir / RANDOM_WEIGHTS_MARKER
    marker.unlink()  # written again last: an interrupted build never looks complete
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update({key: spec[key] for key in (POOL_MODE, POOL_STRIDE, NEWLINE_POSITION)})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    marker.write_text("random weights: built by streamprune from " + spec_path.name + "\n")
    return out_dir
