"""Thin adapter over transformers' `SmolVLMForConditionalGeneration` (SmolVLM2 video checkpoints).

SmolVLM2 takes a video as a series of images (`pixel_values`, not `pixel_values_videos`). Its processor
writes a video intro ("You are provided the following series of N frames from a H:MM:SS [H:MM:SS]
video.\\n"), then per frame "\\nFrame from MM:SS:" + <fake_token_around_image><global-img> + 64 <image> +
<fake_token_around_image>, then the outro "\\n\\n". Each frame is one 8×8 token grid: SigLIP 512 px / patch
16 gives 32×32 patches, and the connector's pixel shuffle (scale 4) folds each 4×4 block of patches into
one token. Positions are 1-D.

Encoding runs the model's own `get_image_features` in batches of frames and records, with a pre-hook on
the last SigLIP attention layer, the attention each patch received (mean over heads and queries, as for
LLaVA-OneVision). A token's importance is the **sum** over its 16 patches, grouped by the connector's own
`pixel_shuffle`, so each frame's 64 scores are the attention mass its tokens' patches received (they sum
to 1 per frame).

Reduced prompts: the processor rewrites the video for the frames that still have tokens, and each frame's
<image> run is cut to its survivors (in raster order; `raster_order`). **A frame whose tokens were all
merged away loses its whole block** (timestamp text and both wrappers), and the intro counts only the
frames that remain. Why: HoliTom moves a static segment's tokens onto the segment's first frame, so that
timestamp already stands for the segment; an empty "Frame from MM:SS:<fake><global-img><fake>" would tell
the model a frame with no content exists, a layout the processor never produces. With the block gone, the
prompt is exactly what the processor writes for a video sampled at the kept frames' times (same stated
duration), only with fewer <image> tokens per frame. Unreduced, the text — and so the ids and embeddings —
are exactly the processor's own.

Frame times: `prepare` takes seconds per frame (None: DEFAULT_FPS, SmolVLM2's own 1 fps) and never lets
the processor resample frames; the stated duration is the last frame's time, as the processor assumes
without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from streamprune.encoder import EncoderConfig, Tower, VisionEncoder, full_encode_stats, siglip_tower
from streamprune.errors import ModelError
from streamprune.models.base import (
    EncodedVideo,
    LLMInputs,
    ProgressFn,
    PromptInputs,
    VideoLLMAdapter,
    raster_order,
    sizes_row,
    vision_transformer,
)
from streamprune.models.llava_onevision import received_attention
from streamprune.models.tiny import CONFIG_DIR, byte_level_tokenizer, save_random
from streamprune.tokens import VisualTokens

TINY_SMOLVLM2 = CONFIG_DIR / "tiny-smolvlm2.yaml"
# what SmolVLMProcessor looks up by name (wrappers, global-image marker, placeholders, end of turn)
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>",
                  "<image>", "<video>"]
DEFAULT_FPS = 1.0  # frame times when none are given: SmolVLM2's own sampling rate (video_sampling.fps)


@dataclass
class SmolVLMPromptInputs(PromptInputs):
    """PromptInputs plus what `reduced_inputs` needs to have the processor rewrite the video:
    text: the chat-formatted prompt with its one <video> marker; frame_times: [T] seconds per frame;
    duration: seconds, as the intro states it."""

    text: str = ""
    frame_times: tuple[float, ...] = ()
    duration: float = 0.0


def frame_times(num_frames: int, timestamps: np.ndarray | None) -> list[float]:
    """Seconds per frame: `timestamps`, or DEFAULT_FPS from 0 when there are none."""
    if timestamps is None:
        return [i / DEFAULT_FPS for i in range(num_frames)]
    if len(timestamps) != num_frames:
        raise ValueError(f"got {len(timestamps)} timestamps for {num_frames} frames")
    return [float(t) for t in timestamps]


def video_metadata(times: list[float], duration: float):
    """transformers' VideoMetadata for frames at `times` seconds: fps 1 makes frame "indices" seconds,
    which is all the processor reads (timestamps = index / fps)."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=len(times), fps=1.0, frames_indices=list(times), duration=duration)


def pool_patch_scores(scores: torch.Tensor, connector: torch.nn.Module) -> torch.Tensor:
    """Per-patch scores [B, P] → per token [B, N]: the connector's pixel shuffle groups each token's
    scale² patches exactly as it groups their features; we sum them (a token's attention mass)."""
    grouped = connector.pixel_shuffle(scores[..., None], connector.scale_factor)  # [B, N, scale²]
    return grouped.sum(-1)


class SmolVLM2Adapter(VideoLLMAdapter):
    """SmolVLM2: 64 tokens per frame (8×8 after pixel shuffle), each frame wrapped in its timestamp and
    image markers, 1-D positions."""

    model_type = "smolvlm"
    supports_streaming = True

    def __init__(self, model, processor) -> None:
        super().__init__(model, processor)
        vision = self.config.vision_config
        self.patch_side = vision.image_size // vision.patch_size
        side = self.patch_side // self.config.scale_factor
        self.grid_hw = (side, side)
        self.image_token_id = self.config.image_token_id
        if processor.image_seq_len != self.tokens_per_frame:
            raise ModelError(f"processor writes {processor.image_seq_len} <image> tokens per frame but the model "
                             f"makes {self.tokens_per_frame}")

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    def stream_layout(self):
        from streamprune.models.streaming import SmolVLM2Layout

        return SmolVLM2Layout(self)

    @property
    def tower(self) -> Tower:
        """The SigLIP tower: every layer, then post_layernorm (what `get_image_features` uses)."""
        return siglip_tower(vision_transformer(self.model.model.vision_model), -1, final_norm=True)

    def vision_encoder(self, config: EncoderConfig) -> VisionEncoder:
        """Encoder-side reduction over this model's SigLIP tower; it keeps reuse state across `encode`
        calls until its `reset`."""
        return VisionEncoder(self.tower, config, attention=True)

    def prepare(self, frames: np.ndarray, prompt: str, timestamps: np.ndarray | None = None) -> SmolVLMPromptInputs:
        """Frames [T, H, W, 3] uint8 at `timestamps` seconds (None: DEFAULT_FPS) through the model's processor,
        without its frame sampling. The intro's duration is the last frame's time, which is what the
        processor assumes without one (our sampler puts the last frame at the end of the video)."""
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                  processor_kwargs={"do_sample_frames": False})
        times = frame_times(len(frames), timestamps)
        out = self.processor(text=text, videos=[[frames]], video_metadata=[video_metadata(times, times[-1])],
                             do_sample_frames=False, return_tensors="pt")
        prompt_inputs = SmolVLMPromptInputs(out["input_ids"], out["attention_mask"], out["pixel_values"],
                                            extra={"pixel_attention_mask": out["pixel_attention_mask"]},
                                            pixel_key="pixel_values", text=text, frame_times=tuple(times),
                                            duration=times[-1])
        return prompt_inputs.to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, prompt: PromptInputs, frames_per_batch: int = 8, progress: ProgressFn | None = None,
               encoder: VisionEncoder | None = None) -> EncodedVideo:
        """The model's own vision path in batches of frames (same numbers as one batch; bounded memory).

        prompt.pixel_values_videos: [1, T, 3, S, S]. Returns features [T, N, D_text] (model dtype), attention
        [T, N] (float32).
        """
        pixels = prompt.pixel_values_videos
        pixel_mask = prompt.extra.get("pixel_attention_mask")
        model = self.model.model
        if encoder is not None and encoder.config.active:
            # the tower does less work (reuse, merging); the connector then runs on its [T, 32², C] output
            # as get_image_features does (frames are never padded here: the processor squares them)
            out = encoder.encode(pixels[0], progress=progress)
            features = model.connector(out.features.to(self.dtype))
            return EncodedVideo(features, pool_patch_scores(out.attention.float(), model.connector), self.grid_hw,
                                encoder.take_stats(), out.recomputed)
        tower = self.tower
        received: list[torch.Tensor] = []

        def record(module, args, kwargs):
            # no padding inside frames (the processor squares them), so the mask can be left out here
            hidden = args[0] if args else kwargs["hidden_states"]
            received.append(received_attention(hidden, module))

        handle = tower.layers[-1].self_attn.register_forward_pre_hook(record, with_kwargs=True)
        num_frames = pixels.shape[1]
        features = []
        try:
            for start in range(0, num_frames, frames_per_batch):
                stop = min(start + frames_per_batch, num_frames)
                mask = None if pixel_mask is None else pixel_mask[:, start:stop]
                batch = model.get_image_features(pixels[:, start:stop], mask).pooler_output  # [F, N, D]
                if isinstance(batch, (list, tuple)):  # transformers ≥ 5.2x: one [F·N, D] per batch row
                    batch = torch.cat(batch).view(-1, self.tokens_per_frame, batch[0].shape[-1])
                if batch.shape[0] != stop - start:
                    # get_image_features skips all-zero "padding" images; the model's own forward would fail too
                    raise ValueError("a frame's pixel values are all zero; SmolVLM treats it as padding")
                features.append(batch)
                if progress:
                    progress(stop, num_frames)
        finally:
            handle.remove()
        attention = pool_patch_scores(torch.cat(received), model.connector)
        return EncodedVideo(torch.cat(features), attention, self.grid_hw, full_encode_stats(tower, num_frames))

    def video_text(self, prompt: SmolVLMPromptInputs, counts: list[int]) -> str:
        """The prompt text with the video written by the processor for the frames with counts[t] > 0 tokens,
        each frame's <image> run cut to counts[t]. The duration stays the original video's."""
        kept = [t for t, n in enumerate(counts) if n > 0]
        metadata = video_metadata([prompt.frame_times[t] for t in kept], prompt.duration)
        expanded = self.expand_video(prompt.text, metadata, len(kept))
        image = self.processor.image_token
        pieces = expanded.split(image * self.tokens_per_frame)
        if len(pieces) != len(kept) + 1:
            raise ValueError("unexpected SmolVLM video layout: <image> runs do not match the frames")
        return pieces[0] + "".join(image * counts[t] + piece for t, piece in zip(kept, pieces[1:], strict=True))

    def expand_video(self, text: str, metadata, frames: int) -> str:
        """`text` with its <video> marker written out by the processor for `frames` frames described by
        `metadata` (intro, per-frame timestamps and <image> runs, outro)."""
        # the processor reads only the frame count from pixel_values here (a host-side stand-in)
        video = {"pixel_values": torch.empty(1, frames, device="cpu"), "video_metadata": [metadata]}
        processor = self.processor
        if hasattr(processor, "replace_video_token"):  # transformers ≥ 5.17
            return text.replace(processor.video_token, processor.replace_video_token(video, 0), 1)
        return processor.expand_text_with_video_tokens([text], video)[0]

    def video_ids(self, prompt: SmolVLMPromptInputs, counts: list[int]) -> torch.Tensor:
        """Token ids [1, L'] of `video_text`, tokenized as the processor tokenizes its text (model's device)."""
        text = self.video_text(prompt, counts)
        ids = self.processor.tokenizer(text, add_special_tokens=True)["input_ids"]
        return torch.tensor([ids], device=self.device)

    def reduced_inputs(self, prompt: PromptInputs, tokens: VisualTokens,
                       encoded: EncodedVideo | None = None) -> LLMInputs:
        """Rebuild the prompt around the reduced tokens, frame by frame (see the module docstring); `encoded`
        is not needed (no side features)."""
        if not isinstance(prompt, SmolVLMPromptInputs):
            raise TypeError("reduced_inputs needs the SmolVLMPromptInputs that this adapter's prepare() returns")
        if tokens.num_frames != len(prompt.frame_times):
            raise ValueError(f"{tokens.num_frames} token grids for a prompt of {len(prompt.frame_times)} frames")
        order = raster_order(tokens)  # grouped by frame, reading order within a frame
        ids = self.video_ids(prompt, torch.bincount(tokens.frame, minlength=tokens.num_frames).tolist())
        visual = ids == self.image_token_id
        embeds = self.embed(ids, self.image_token_id, tokens.features[order])
        return LLMInputs(embeds, torch.ones_like(ids), visual, lambda: sizes_row(visual, tokens.size[order]))


def build_random(spec_path: Path = TINY_SMOLVLM2):
    """A random-weight SmolVLM2 and its processor (byte-level tokenizer) from a spec in configs/models/ (tiny,
    or a real checkpoint's dimensions for speed measurements). Returns (model, processor)."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    spec = yaml.safe_load(spec_path.read_text())
    tok = byte_level_tokenizer(SPECIAL_TOKENS)
    text = spec["text_config"]
    vision = spec["vision_config"]
    config = SmolVLMConfig(
        # a real-size spec gives the real vocabulary (the LM head's cost); rows past the tokenizer go unused
        text_config={**text, "vocab_size": max(text.get("vocab_size", 0), len(tok)),
                     "eos_token_id": tok.convert_tokens_to_ids("<end_of_utterance>"),
                     "pad_token_id": tok.pad_token_id, "bos_token_id": None},
        vision_config=vision,
        scale_factor=spec["scale_factor"],
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=spec.get("tie_word_embeddings", False),
    )
    torch.manual_seed(spec.get("seed", 0))
    model = SmolVLMForConditionalGeneration(config).eval()
    # Random weights rarely emit EOS; let generation run to max_new_tokens like a real summary would.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    side = {"longest_edge": vision["image_size"]}
    per_frame = (vision["image_size"] // vision["patch_size"] // spec["scale_factor"]) ** 2
    processor = SmolVLMProcessor(
        # videos are never split into tiles; images aren't either here (one global image, like a frame)
        image_processor=SmolVLMImageProcessor(size=side, max_image_size=side, do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(size=side, max_image_size=side,
                                              video_sampling={**spec["video_sampling"], "video_size": side}),
        tokenizer=tok,
        image_seq_len=per_frame,
        chat_template=spec["chat_template"],
    )
    return model, processor


def build_tiny(out_dir: Path, spec_path: Path = TINY_SMOLVLM2) -> Path:
    """Write the random-weight model of `spec_path` (model, processor, tokenizer) to `out_dir`."""
    return save_random(out_dir, spec_path, *build_random(spec_path))
