"""How each model's prompt is laid out around a video that arrives one closed segment at a time.

    start(clip)      ─▶ Chunk: the prompt prefix (chat text up to the video)
    segment(tokens)  ─▶ Chunk: one closed segment's reduced tokens in the model's layout (newlines, frame
                        timestamps and wrappers), with the model's positions for them
    question(prompt) ─▶ Chunk: whatever closes the video, then the question and the generation prompt

`StreamEngine` prefills the chunks into one KV cache in that order; concatenated, they are exactly what the
adapter's `reduced_inputs` builds offline for the same tokens (same embeddings, same positions), which is
why a stream whose look-ahead covers the whole clip equals `summarize`. Each layout is a thin reading of
its adapter's offline layout:

- LLaVA-OneVision: the tokens as they come; one newline embedding after the video (before the question).
- LLaVA-Video: each frame's tokens in raster order, a newline after every (frame, row) that keeps one.
- SmolVLM2: per frame that keeps tokens, "\\nFrame from MM:SS:" and its image wrappers; the intro sentence
  (frame count and duration) only when the whole clip is known before the prefix is prefilled — a live
  stream cannot state its own length, so it starts with the first frame instead.
- Qwen2.5-VL: 3-D M-RoPE. A token keeps the (t, h, w) the model's `get_rope_index` gives it in the
  unreduced prompt: t from its grid's index in the stream (the stream's frame rate, fixed at its first
  segment, spaces grids as the processor's `second_per_grid_ts` does), h/w from its grid position. Text
  after the video continues where the model's `get_rope_index` puts it.
- Qwen3-VL: per grid "<t seconds>" + <|vision_start|> + tokens + <|vision_end|>, each grid its own 3-D
  block as `get_rope_index` numbers the chunk (positions continue from the previous chunk); DeepStack
  features go with the visual rows.

Ids are tokenized per chunk: at every chunk boundary a special token or a visual token sits on one side,
except SmolVLM2's first frame after its intro (text after text; byte-level tokenizers are unaffected).
Host work per segment is bookkeeping on a few integers per grid; tensors handed to the engine are on the
model's device, values in its dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamprune.errors import ConfigError
from streamprune.models.llava_video import row_newline_slots


@dataclass
class SegmentTokens:
    """One closed segment's reduced tokens, in the order the reduction emitted them.

    features [M, D] (model dtype), grid [M] long (token grid index in the stream), position [M] long (flat
    grid position, row-major over grid_hw), size [M] float32, side: per side-feature layer [M, C] (Qwen3-VL's
    DeepStack). grids: host (first frame index, last frame index, first frame time, last frame time) per
    grid of the segment, in order; first_grid: stream index of grids[0].
    """

    features: torch.Tensor
    grid: torch.Tensor
    position: torch.Tensor
    size: torch.Tensor
    grid_hw: tuple[int, int]
    first_grid: int
    grids: list[tuple[int, int, float, float]]
    side: list[torch.Tensor] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        """Host list: kept tokens per grid of the segment (one host read)."""
        return torch.bincount(self.grid - self.first_grid, minlength=len(self.grids)).tolist()


@dataclass
class ClipInfo:
    """The whole clip, when it is known before the prefix is prefilled (look-ahead over the whole stream):
    times [T] seconds of every frame, kept_times: seconds of the token grids' first frames that keep a token."""

    times: list[float]
    kept_times: list[float]


@dataclass
class Chunk:
    """Rows to prefill. embeds [m, C] (model dtype); rope: [3, m] long M-RoPE t/h/w positions, or None for
    1-D models (the engine numbers them); token [m] long: index of each row into the segment's tokens,
    −1 for layout rows (text, newlines); deepstack: per DeepStack layer [P, C] for the P visual rows."""

    embeds: torch.Tensor
    token: torch.Tensor
    rope: torch.Tensor | None = None
    deepstack: list[torch.Tensor] | None = None


def split_at(ids: list[int], token_id: int) -> tuple[list[int], list[int]]:
    """Host ids before and after the one `token_id` in `ids`."""
    at = [i for i, token in enumerate(ids) if token == token_id]
    if len(at) != 1:
        raise ConfigError("the chat template must place exactly one video placeholder")
    return ids[: at[0]], ids[at[0] + 1 :]


class StreamLayout:
    """The 1-D base: prefix and question split around the chat template's one video placeholder."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.device = adapter.device
        self.prefix_ids: list[int] | None = None

    # ---------------------------------------------------------------- model-specific parts
    def chat_ids(self, prompt: str) -> list[int]:
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.adapter.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return list(self.adapter.processor.tokenizer(text).input_ids)

    @property
    def placeholder(self) -> int:
        return self.adapter.video_token_id

    def split(self, prompt: str) -> tuple[list[int], list[int]]:
        return split_at(self.chat_ids(prompt), self.placeholder)

    def start(self, clip: ClipInfo | None = None) -> Chunk:
        self.prefix_ids, _ = self.split("?")
        return self.text(self.prefix_ids)

    def segment(self, seg: SegmentTokens) -> Chunk:
        return Chunk(seg.features, torch.arange(len(seg.features), device=self.device))

    def question(self, prompt: str) -> Chunk:
        return self.text(self.check_prefix(prompt))

    # ---------------------------------------------------------------- shared helpers
    def check_prefix(self, prompt: str) -> list[int]:
        """The question's ids after the video (the prefix must be the one already in the cache)."""
        prefix, suffix = self.split(prompt)
        if prefix != self.prefix_ids:
            raise ConfigError("the chat template's prefix depends on the question; cannot reuse the cache")
        return suffix

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), C] input embeddings of host ids."""
        table = self.adapter.model.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device))

    def text(self, ids: list[int]) -> Chunk:
        return Chunk(self.embed_ids(ids), torch.full((len(ids),), -1, dtype=torch.long, device=self.device))


class OneVisionLayout(StreamLayout):
    """LLaVA-OneVision: tokens in the reduction's order, one newline after the whole video."""

    def question(self, prompt: str) -> Chunk:
        suffix = self.text(self.check_prefix(prompt))
        newline = self.adapter.model.model.image_newline[None].to(suffix.embeds.dtype)
        return Chunk(torch.cat([newline, suffix.embeds]), torch.cat([suffix.token[:1], suffix.token]))


class LlavaVideoLayout(StreamLayout):
    """LLaVA-Video: per frame in raster order, a newline closing every grid row that keeps a token."""

    def segment(self, seg: SegmentTokens) -> Chunk:
        h, w = seg.grid_hw
        order = torch.argsort(seg.grid * (h * w) + seg.position, stable=True)
        slots, newline_slots = row_newline_slots(seg.grid[order] * h + seg.position[order] // w)
        total = len(order) + len(newline_slots)
        newline = self.adapter.model.model.image_newline.to(seg.features.dtype)
        values = newline.expand(total, -1).clone()
        values[slots] = seg.features[order]
        token = torch.full((total,), -1, dtype=torch.long, device=self.device).index_copy_(0, slots, order)
        return Chunk(values, token)


class SmolVLM2Layout(StreamLayout):
    """SmolVLM2: each frame that keeps tokens as the processor writes it, with its <image> run cut to them."""

    @property
    def placeholder(self) -> int:
        return self.adapter.processor.tokenizer.convert_tokens_to_ids(self.adapter.processor.video_token)

    def chat_text(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        return self.adapter.processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                          processor_kwargs={"do_sample_frames": False})

    def expanded(self, times: list[float], duration: float) -> tuple[str, str, str]:
        """(intro, frame blocks, outro) as the processor writes a video of frames at `times` seconds."""
        from streamprune.models.smolvlm2 import video_metadata

        marker = self.adapter.processor.video_token
        text = self.adapter.expand_video(marker, video_metadata(times, duration), len(times))
        wrapper = self.adapter.processor.fake_image_token
        first = text.index("\nFrame from")  # the intro ends where the first frame's timestamp starts
        last = text.rindex(wrapper) + len(wrapper)  # the outro starts after the last frame's wrapper
        return text[:first], text[first:last], text[last:]

    def split_text(self, prompt: str) -> tuple[str, str]:
        before, after = self.chat_text(prompt).split(self.adapter.processor.video_token)
        return before, after

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return list(self.adapter.processor.tokenizer(text, add_special_tokens=special)["input_ids"])

    def start(self, clip: ClipInfo | None = None) -> Chunk:
        before, _ = self.split_text("?")
        intro = "" if clip is None or not clip.kept_times else self.expanded(clip.kept_times, clip.times[-1])[0]
        self.prefix_ids = self.tokenize(before + intro, special=True)
        self._before = before
        _, _, self.outro = self.expanded([0.0], 0.0)
        return self.text(self.prefix_ids)

    def segment(self, seg: SegmentTokens) -> Chunk:
        counts = seg.counts
        kept = [g for g, n in enumerate(counts) if n > 0]
        if not kept:
            return self.text([])
        times = [seg.grids[g][2] for g in kept]
        _, blocks, _ = self.expanded(times, times[-1])
        image = self.adapter.processor.image_token
        pieces = blocks.split(image * self.adapter.tokens_per_frame)
        text = pieces[0] + "".join(image * counts[g] + piece for g, piece in zip(kept, pieces[1:], strict=True))
        ids = torch.tensor(self.tokenize(text), device=self.device)
        order = torch.argsort(seg.grid * self.adapter.tokens_per_frame + seg.position, stable=True)
        visual = ids == self.adapter.image_token_id
        embeds = self.adapter.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(visual[:, None].expand_as(embeds), seg.features[order].to(embeds.dtype))
        token = torch.full((len(ids),), -1, dtype=torch.long, device=self.device).masked_scatter(visual, order)
        return Chunk(embeds, token)

    def question(self, prompt: str) -> Chunk:
        before, after = self.split_text(prompt)
        if before != self._before:
            raise ConfigError("the chat template's prefix depends on the question; cannot reuse the cache")
        return self.text(self.tokenize(self.outro + after))


class Qwen2_5_VLLayout(StreamLayout):
    """Qwen2.5-VL: <|vision_start|> in the prefix, every kept token at its original 3-D position, the text
    after the video where `get_rope_index` places it for the grids streamed so far."""

    def __init__(self, adapter) -> None:
        super().__init__(adapter)
        self.fps: float | None = None
        self.grids = 0  # token grids streamed so far

    def rope_index(self, ids: list[int], video: list[bool], grid_thw: list[list[int]]) -> torch.Tensor:
        """The model's own `get_rope_index` on host ids (video flags mark placeholders) → [3, len(ids)] long,
        host. Qwen2.5-VL spaces grids by the stream's frame rate, as its processor does."""
        extra = {}
        if self.adapter.model_type == "qwen2_5_vl":
            # a float32 tensor, as PromptInputs carries the processor's second_per_grid_ts
            extra["second_per_grid_ts"] = torch.tensor([self.seconds_per_grid])
        positions, _ = self.adapter.model.model.get_rope_index(
            torch.tensor([ids]), torch.tensor([[2 if v else 0 for v in video]]),
            video_grid_thw=torch.tensor(grid_thw), **extra)
        return positions[:, 0]

    def chat_ids(self, prompt: str) -> list[int]:
        return list(self.adapter.processor.tokenizer(self.adapter.chat_text(prompt)).input_ids)

    def start(self, clip: ClipInfo | None = None) -> Chunk:
        if clip is not None:
            from streamprune.models.qwen2_5_vl import _sampled_fps

            self.fps = _sampled_fps(clip.times)
        self.prefix_ids, _ = self.split("?")
        chunk = self.text(self.prefix_ids)
        chunk.rope = torch.arange(len(self.prefix_ids), device=self.device).expand(3, -1)
        self.next_text = len(self.prefix_ids)
        return chunk

    def settle_fps(self, seg: SegmentTokens) -> None:
        """A live stream's frame rate, from its first segment's frames (2 fps, Qwen's default, if unknown)."""
        if self.fps is None:
            first, last = seg.grids[0], seg.grids[-1]
            span = last[3] - first[2]
            self.fps = (last[1] - first[0]) / span if span > 0 and last[1] > first[0] else 2.0

    def segment(self, seg: SegmentTokens) -> Chunk:
        self.settle_fps(seg)
        h, w = seg.grid_hw
        self.grids = seg.first_grid + len(seg.grids)
        t_of_grid = self.temporal_positions(self.grids).to(self.device)
        order = torch.argsort(seg.grid, stable=True)  # grouped by grid, as `Qwen2_5_VLAdapter.layout`
        grid, position = seg.grid[order], seg.position[order]
        start = len(self.prefix_ids)
        rope = torch.stack([t_of_grid[grid] + start, position // w + start, position % w + start])
        return Chunk(seg.features[order], order, rope)

    def temporal_positions(self, grids: int) -> torch.Tensor:
        """[grids] long, host: the t index of each grid, as `get_rope_index` spaces video grids (index ×
        tokens_per_second × second_per_grid, truncated; the same float32 arithmetic)."""
        interval = self.adapter.config.vision_config.tokens_per_second * torch.tensor([self.seconds_per_grid])[0]
        return (torch.arange(grids) * interval).long()

    @property
    def seconds_per_grid(self) -> float:
        return self.adapter.frames_per_grid / self.fps

    def question(self, prompt: str) -> Chunk:
        suffix = self.check_prefix(prompt)
        chunk = self.text(suffix)
        chunk.rope = self.after_video() + torch.arange(len(suffix), device=self.device).expand(3, -1)
        return chunk

    def after_video(self) -> int:
        """Position of the first text token after the video, as `get_rope_index` numbers the unreduced prompt
        (its rule read off two small calls: one grid at full size, all grids at one token each)."""
        if not self.grids:
            return len(self.prefix_ids)
        h, w = self.adapter.grid_hw
        merge = self.adapter.merge
        text = self.adapter.config.vision_end_token_id
        merge = self.adapter.merge
        spatial = self.rope_index([self.placeholder] * (h * w) + [text], [True] * (h * w) + [False],
                                  [[1, h * merge, w * merge]])[0, -1]
        temporal = self.rope_index([self.placeholder] * self.grids + [text], [True] * self.grids + [False],
                                   [[self.grids, merge, merge]])[0, -1]
        return len(self.prefix_ids) + int(max(spatial, temporal))


class Qwen3VLLayout(Qwen2_5_VLLayout):
    """Qwen3-VL: per grid its timestamp and wrapper, each grid numbered as its own 3-D block by the model's
    `get_rope_index` on the unreduced chunk; DeepStack features with the visual rows."""

    def start(self, clip: ClipInfo | None = None) -> Chunk:
        chunk = super().start(clip)
        self.next_text = len(self.prefix_ids)
        return chunk

    def grid_text(self, frames: tuple[int, int, float, float]) -> tuple[list[int], list[int]]:
        """Ids before and after one grid's placeholders: "<t seconds><|vision_start|>", "<|vision_end|>" with t
        the processor's time of the frame pair (the mean of its frames' index / fps)."""
        processor = self.adapter.processor
        seconds = processor._calculate_timestamps([frames[0], frames[1]], self.fps, self.adapter.frames_per_grid)[0]
        tokenizer = processor.tokenizer
        before = tokenizer(f"<{seconds:.1f} seconds>" + processor.vision_start_token, add_special_tokens=False)
        return list(before["input_ids"]), [tokenizer.convert_tokens_to_ids(processor.vision_end_token)]

    def segment(self, seg: SegmentTokens) -> Chunk:
        self.settle_fps(seg)
        h, w = seg.grid_hw
        n = h * w
        self.grids = seg.first_grid + len(seg.grids)
        # the unreduced chunk: per grid its text and n placeholders; kept tokens take their own placeholder's
        # position, text keeps its own
        ids, video, text_rows = [], [], []
        order = torch.argsort(seg.grid, stable=True)
        first_placeholders = []  # per grid: index of its first placeholder in the unreduced chunk
        for frames in seg.grids:
            before, after = self.grid_text(frames)
            text_rows += [(len(ids) + i, tid) for i, tid in enumerate(before)]
            first_placeholders.append(len(ids) + len(before))
            ids += before + [self.placeholder] * n
            video += [False] * len(before) + [True] * n
            text_rows += [(len(ids), after[0])]
            ids += after
            video += [False]
        rope_full = self.rope_index(ids, video, [[len(seg.grids), h * self.adapter.merge, w * self.adapter.merge]])
        rope_full = rope_full.to(self.device) + self.next_text
        first_placeholder = torch.tensor(first_placeholders, device=self.device)
        grid = seg.grid[order] - seg.first_grid
        source = first_placeholder[grid] + seg.position[order]  # [M] index of each token's own placeholder
        # reduced rows: text rows stay, each grid's tokens fill the start of its placeholder run
        text_index = torch.tensor([i for i, _ in text_rows], dtype=torch.long, device=self.device)
        rank = torch.arange(len(order), device=self.device)
        sort_key = torch.cat([text_index * (len(order) + 1), first_placeholder[grid] * (len(order) + 1) + 1 + rank])
        rows = torch.argsort(sort_key)
        index = torch.cat([text_index, source])[rows]
        token = torch.cat([torch.full((len(text_rows),), -1, dtype=torch.long, device=self.device), order])[rows]
        text_embeds = self.embed_ids([tid for _, tid in text_rows])
        embeds = torch.cat([text_embeds, seg.features[order].to(text_embeds.dtype)])[rows]
        self.next_text = int(rope_full[:, -1].max()) + 1
        deepstack = [side[order] for side in seg.side] if seg.side else None
        return Chunk(embeds, token, rope_full[:, index], deepstack)

    def question(self, prompt: str) -> Chunk:
        suffix = self.check_prefix(prompt)
        chunk = self.text(suffix)
        chunk.rope = self.next_text + torch.arange(len(suffix), device=self.device).expand(3, -1)
        return chunk


def rope_index_is_per_grid(adapter) -> bool:
    """Whether the installed transformers' Qwen2.5-VL `get_rope_index` numbers each frame pair on its own
    (t from its index, rows and columns within its grid), the layout a stream can extend grid by grid. Some
    releases (5.5.x) give every pair of a video the same t and spread rows over the whole video, so a grid's
    positions there depend on frames that have not arrived yet; the stream then keeps the per-grid layout
    and differs from `summarize` (which follows the release)."""
    layout = Qwen2_5_VLLayout(adapter)
    layout.fps = 1.0
    merge = adapter.merge
    grids, h, w = 3, 2, 3
    found = layout.rope_index([adapter.video_token_id] * (grids * h * w), [True] * (grids * h * w),
                              [[grids, h * merge, w * merge]])
    rows = torch.arange(h * w)
    expected = torch.stack([layout.temporal_positions(grids).repeat_interleave(h * w),
                            (rows // w).repeat(grids), (rows % w).repeat(grids)])
    return torch.equal(found, expected)
