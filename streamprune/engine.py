"""`StreamEngine`: watch a video frame by frame with a context that grows with what is new, not with time.

    push(frame) ─▶ pixel skip test ─▶ token grid ─▶ vision tower ─▶ pending window ─▶ online segmentation
                   (near-identical     (frames_per_grid  (skipped grids    (HoliTom's DP over the window;
                    frames never        frames: Qwen's    reuse the last    a segment closes once `lookahead`
                    reach the tower)    pairs)            features)         grids follow it)
    closed segment ─▶ HoliTom merge (important positions protected) ─▶ layout.segment ─▶ incremental prefill
    ask(prompt) ─▶ layout.question on top of the cache, greedy answer, cache cropped back

The same pieces as `summarize` — encoder, HoliTom segmentation and merging, the model's adapter — but the
DP sees a bounded look-ahead instead of the whole video, and tokens are prefilled once, as their segment
closes. What is model-specific (prompt prefix and question split, newlines, per-frame timestamps and
wrappers, 1-D or M-RoPE positions, DeepStack side inputs) is the adapter's `StreamLayout`
(`models/streaming.py`); the engine is one engine for every model. With the look-ahead covering the whole
stream (`lookahead=None`) the pending grids are reduced in one pass at the end, exactly as `summarize`
reduces the clip, and the cached prompt equals `summarize`'s row for row.

Memory is bounded by `max_context_tokens`: when the cache would exceed it, the oldest segment's KV
entries are merged pairwise by similarity (bipartite matching, size-weighted), then evicted whole; the
prompt prefix is never touched and every eviction is recorded.

Devices: frames arrive as numpy and the skip test stays on the host; every tensor (features, the cache and
its per-entry bookkeeping, importance) lives on the model's device, in the model's dtype for values. Which
segments the cache holds, and how many entries each, is also counted on the host, so eviction decisions
never read the device. Host reads per push: the pending window's similarities for the segmentation DP;
per closed segment: its kept-token count per grid where the layout writes per-frame text (SmolVLM2,
Qwen3-VL); per question: one per generated token (the end-of-sequence check).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from streamprune.encoder import EncoderConfig
from streamprune.errors import ConfigError
from streamprune.importance import ImportanceState
from streamprune.models.base import VideoLLMAdapter
from streamprune.models.cache_compat import cache_kwargs, crop_cache
from streamprune.models.inner_stage import query_attention
from streamprune.models.streaming import Chunk, ClipInfo, SegmentTokens
from streamprune.reduce.holitom import default_tau, holitom_reduce, segment_by_gains, static_gains
from streamprune.reduce.inner import MergePlan, apply_plan, bipartite_plan
from streamprune.summarize import cache_bytes
from streamprune.tokens import Fate, VisualTokens

THUMB = 32  # side of the thumbnail used for the frame-skip test


@dataclass
class StreamConfig:
    retain: float = 0.1  # fraction of each closed segment's tokens that enter the LLM
    tau: float | None = None  # static threshold; HoliTom's default for `retain` when None
    lookahead: int | None = 8  # frames that must follow a segment before it closes; None = whole stream
    max_segment: int = 64  # longest segment, in frames
    # a frame is skipped when no cell of its 32×32 colour thumbnail moved by this many levels (0–255): cell
    # averages flatten sensor noise, while any visible motion moves some cell by far more
    skip_threshold: float = 6.0
    max_context_tokens: int | None = None  # KV-cache budget in tokens (prompt prefix included)
    protect_fraction: float = 0.1  # grid positions protected from merging once questions have been asked
    importance_window: int = 3
    importance_decay: float = 0.8
    # encoder-side reduction; its reuse state spans the stream (frames the skip test lets through still
    # recompute only the patches that changed)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def validate(self) -> None:
        if not 0.0 < self.retain <= 1.0:
            raise ConfigError(f"--retain must be in (0, 1], got {self.retain}")
        if self.lookahead is not None and self.lookahead < 1:
            raise ConfigError(f"--lookahead must be at least 1 frame, got {self.lookahead}")
        if self.max_segment < 1:
            raise ConfigError(f"max segment length must be at least 1 frame, got {self.max_segment}")
        if self.max_context_tokens is not None and self.max_context_tokens < 64:
            raise ConfigError(f"--max-context-tokens must be at least 64, got {self.max_context_tokens}")


@dataclass
class SegmentRecord:
    """One closed segment, as `--json-lines` reports it."""

    segment: int
    frames: tuple[int, int]
    time_s: tuple[float, float]
    frames_skipped: int
    tokens_in: int
    tokens_kept: int
    kv_tokens: int
    kv_bytes: int
    evicted_segments: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Pending:
    """Token grids since the last closed segment: features [W, N, D], attention [W, N] and bookkeeping, one
    entry per grid (a frame, or Qwen's pair of frames)."""

    features: list[torch.Tensor] = field(default_factory=list)
    attention: list[torch.Tensor] = field(default_factory=list)
    side: list[list[torch.Tensor]] = field(default_factory=list)  # per grid, per side-feature layer [N, C]
    similarity: list[torch.Tensor] = field(default_factory=list)  # [N] fp32 per transition i → i+1 (W−1)
    index: list[int] = field(default_factory=list)  # consecutive stream grid indices
    frames: list[tuple[int, int, float, float]] = field(default_factory=list)  # first/last frame index and time
    skipped: list[bool] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)

    def pop_front(self, count: int) -> _Pending:
        """Remove and return the first `count` grids (and the transitions out of them)."""
        head = _Pending(**{f: getattr(self, f)[:count] for f in self.__dataclass_fields__})
        for f in self.__dataclass_fields__:
            del getattr(self, f)[:count]
        return head


class StreamEngine:
    def __init__(self, adapter: VideoLLMAdapter, config: StreamConfig | None = None) -> None:
        if not adapter.supports_streaming:
            raise ConfigError(f"streaming is not supported for {adapter.model_type} "
                              "(use `streamprune summarize` for it)")
        self.adapter = adapter
        self.config = config or StreamConfig()
        self.config.validate()
        self.device, self.dtype = adapter.model.device, adapter.model.dtype
        self.tau = self.config.tau if self.config.tau is not None else default_tau(self.config.retain)
        self.grid_hw: tuple[int, int] | None = None  # known once the first grid is encoded (Qwen: per video)
        self.importance: ImportanceState | None = None
        self.vision = adapter.vision_encoder(self.config.encoder) if self.config.encoder.active else None
        self.layout = adapter.stream_layout()
        self._pending = _Pending()
        # frames of the grid being filled: (image, time, thumbnail, skip-test passed, stream frame index)
        self._group: list[tuple[np.ndarray, float, np.ndarray, bool, int]] = []
        self._last_thumb: np.ndarray | None = None
        self._counts = dict(frames_in=0, frames_skipped=0, frames_encoded=0, tokens_encoded=0, tokens_kept=0,
                            segments=0, evicted_segments=0, merged_kv_tokens=0, patches_computed=0, patches_total=0)
        self._grids = 0  # token grids formed so far
        self.evicted: list[dict] = []  # what left the context: segment, frames, tokens
        self._merged_segments: set[int] = set()  # segments whose KV entries were already halved
        self.last_answer = ""
        self._last_view: tuple[np.ndarray, torch.Tensor | np.ndarray] | None = None
        self._push_seconds = 0.0
        self._started = time.perf_counter()
        self._stream_time = 0.0
        self._reset_cache()
        if self.config.lookahead is not None:
            self._start()  # live: the prefix goes in now; with the whole stream as look-ahead, at the end

    # ------------------------------------------------------------------ prompt and cache
    @property
    def tokens_per_frame(self) -> int:
        """Tokens per token grid (0 before the first grid is encoded)."""
        return 0 if self.grid_hw is None else self.grid_hw[0] * self.grid_hw[1]

    def _reset_cache(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.adapter.model.config.text_config)
        self.next_position = 0  # 1-D models: the next position; M-RoPE positions come from the layout
        # per cache entry [L]: segment (-1 for the prompt prefix), first frame of its grid and grid position (-1
        # for layout rows: text, newlines), size (original tokens it stands for, fp32) and input embedding
        # [L, C] (model dtype), all on the model's device
        device = self.device
        self.entry_segment = torch.empty(0, dtype=torch.long, device=device)
        self.entry_frame = torch.empty(0, dtype=torch.long, device=device)
        self.entry_pos = torch.empty(0, dtype=torch.long, device=device)
        self.entry_size = torch.empty(0, device=device)
        self.entry_rope = torch.empty(3, 0, dtype=torch.long, device=device)  # [3, L] position (1-D: rows equal)
        self.entry_embed = torch.empty(0, self.adapter.model.config.text_config.hidden_size, dtype=self.dtype,
                                       device=device)
        self._segment_entries: dict[int, int] = {}  # host count of cache entries per segment, oldest first
        self.prefix_ids: torch.Tensor | None = None

    def _start(self, clip: ClipInfo | None = None) -> None:
        """Prefill the prompt prefix (once). `clip`: the whole clip, when known (see `models.streaming`)."""
        if self.prefix_ids is not None:
            return
        chunk = self.layout.start(clip)
        self.prefix_ids = torch.tensor(self.layout.prefix_ids, dtype=torch.long, device=self.device)
        self._prefill(chunk, segment=-1)

    def _split_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids before and after the video placeholder, as [n] long tensors on the model's device."""
        prefix, suffix = self.layout.split(prompt)
        return (torch.tensor(prefix, dtype=torch.long, device=self.device),
                torch.tensor(suffix, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def _run(self, chunk: Chunk, logits: bool = False) -> torch.Tensor | None:
        """One forward of the chunk's rows on top of the cache (appending their keys and values) at their
        positions: the next 1-D positions, or the layout's M-RoPE rows after a cache-index row (the text row
        the model's mask reads). Returns the last row's logits [1, 1, V] when asked; keeps the rows' positions
        [3, m] in `_chunk_rope`."""
        embeds = chunk.embeds[None]
        m = embeds.shape[1]
        if chunk.rope is None:
            positions = torch.arange(self.next_position, self.next_position + m, device=self.device)[None]
            self.next_position += m
            self._chunk_rope = positions.expand(3, -1)
        else:
            kv = self.kv_tokens
            index = torch.arange(kv, kv + m, device=self.device)[None]
            positions = torch.cat([index, chunk.rope.to(self.device)])[:, None]  # [4, 1, m]
            self._last_rope = chunk.rope[:, -1:]
            self._chunk_rope = chunk.rope
        extra = {}
        if chunk.deepstack:
            extra = {"visual_pos_masks": (chunk.token >= 0)[None], "deepstack_visual_embeds": chunk.deepstack}
        language_model = self.adapter.language_model
        out = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True,
                             **cache_kwargs(language_model, self.cache), **extra)
        return self.adapter.model.lm_head(out.last_hidden_state[:, -1:]) if logits else None

    def _prefill(self, chunk: Chunk, segment: int, grid_frame: torch.Tensor | None = None,
                 position: torch.Tensor | None = None, size: torch.Tensor | None = None) -> None:
        """Append the chunk to the KV cache (never re-prefilled) with its per-entry bookkeeping: for the rows
        that are tokens (chunk.token ≥ 0), the first frame of their grid, grid position and size [M]."""
        m = chunk.embeds.shape[0]
        if m == 0:
            return
        self._run(chunk)
        device = self.device
        token = chunk.token
        is_token = token >= 0
        pick = token.clamp(min=0)

        def per_row(values: torch.Tensor | None, layout_value: float, dtype=torch.long) -> torch.Tensor:
            if values is None:
                return torch.full((m,), layout_value, dtype=dtype, device=device)
            return torch.where(is_token, values[pick].to(dtype), torch.full((), layout_value, dtype=dtype,
                                                                            device=device))

        self.entry_segment = torch.cat([self.entry_segment, torch.full((m,), segment, device=device)])
        self.entry_frame = torch.cat([self.entry_frame, per_row(grid_frame, -1)])
        self.entry_pos = torch.cat([self.entry_pos, per_row(position, -1)])
        self.entry_size = torch.cat([self.entry_size, per_row(size, 1.0, torch.float32)])
        self.entry_embed = torch.cat([self.entry_embed, chunk.embeds.to(self.entry_embed.dtype)])
        self.entry_rope = torch.cat([self.entry_rope, self._chunk_rope], 1)
        if segment >= 0:
            self._segment_entries[segment] = self._segment_entries.get(segment, 0) + m

    @property
    def kv_tokens(self) -> int:
        return self.cache.get_seq_length()

    # ------------------------------------------------------------------ ingest
    @torch.no_grad()
    def push(self, image: np.ndarray, timestamp: float) -> list[SegmentRecord]:
        """Ingest one RGB frame [H, W, 3] uint8 taken at `timestamp` seconds. Returns segments it closed.

        Frames form token grids of `adapter.frames_per_grid` (Qwen: pairs); a grid whose frames all pass the
        skip test repeats the last encoded grid and never reaches the tower."""
        started = time.perf_counter()
        self._counts["frames_in"] += 1
        self._stream_time = timestamp
        thumb = _thumbnail(image)
        skip = (self._last_thumb is not None and self.config.skip_threshold > 0
                and float(np.abs(thumb - self._last_thumb).max()) < self.config.skip_threshold)
        self._group.append((image, timestamp, thumb, skip, self._counts["frames_in"] - 1))
        closed = []
        if len(self._group) == self.adapter.frames_per_grid:
            closed = self._add_grid()
        self._push_seconds += time.perf_counter() - started
        return closed

    def _add_grid(self) -> list[SegmentRecord]:
        """Encode (or repeat) the grid of the frames in `_group`, append it to the pending window, and close
        what is settled."""
        group, self._group = self._group, []
        p = self._pending
        skip = bool(p.features) and all(frame[3] for frame in group)
        if skip:  # counts as a repeat of the last encoded grid: fully static
            features, attention, side = p.features[-1], p.attention[-1], p.side[-1]
            self._counts["frames_skipped"] += len({frame[4] for frame in group})
        else:
            frames = np.stack([frame[0] for frame in group])
            times = np.array([frame[1] for frame in group])
            encoded = self.adapter.encode_frames(frames, times, encoder=self.vision)
            features, attention = encoded.features[0], encoded.attention[0]
            side = [layer[0] for layer in encoded.side_features]
            self._ready(encoded.grid_hw)
            self._last_thumb = group[-1][2]
            self._counts["frames_encoded"] += len({frame[4] for frame in group})
            self._counts["tokens_encoded"] += features.shape[0]
            self._counts["patches_computed"] += encoded.encoder.computed_patches
            self._counts["patches_total"] += encoded.encoder.patches
        if p.features:  # a skipped grid is identical to its predecessor by construction
            similarity = (torch.ones(features.shape[0], device=features.device) if skip
                          else F.cosine_similarity(p.features[-1].float(), features.float(), -1))
            p.similarity.append(similarity)
        p.features.append(features)
        p.attention.append(attention)
        p.side.append(side)
        p.index.append(self._grids)
        self._grids += 1
        p.frames.append((group[0][4], group[-1][4], float(group[0][1]), float(group[-1][1])))
        p.skipped.append(skip)
        p.images.append(_small(group[-1][0]))
        # segment again only when something new arrived or the window is full: a repeated grid cannot
        # settle a boundary that the grids before it left open, and this keeps still cameras cheap
        window_full = len(p.features) >= self.config.max_segment + (self.config.lookahead or 0)
        return self._close_settled() if not skip or window_full else []

    def _ready(self, grid_hw: tuple[int, int]) -> None:
        """The token grid is known (first encoded grid): importance state sized to it."""
        if self.grid_hw is None:
            self.grid_hw = grid_hw
            self.importance = ImportanceState(self.tokens_per_frame, window=self.config.importance_window,
                                              decay=self.config.importance_decay, device=self.device)
        elif grid_hw != self.grid_hw:
            raise ConfigError(f"the frame size changed mid-stream: token grid {grid_hw}, was {self.grid_hw}")

    def flush(self) -> list[SegmentRecord]:
        """End of stream: segment and prefill whatever is pending (a half-filled grid is completed with its
        last frame, as the model's processor pads a clip)."""
        closed = []
        if self._group:
            last = self._group[-1]
            while len(self._group) < self.adapter.frames_per_grid:
                self._group.append(last)
            closed += self._add_grid()
        if self.config.lookahead is None:
            return closed + self._close_all()
        return closed + self._close_settled(final=True)

    def _close_settled(self, final: bool = False) -> list[SegmentRecord]:
        closed = []
        lookahead = self.config.lookahead
        while self._pending.features:
            w = len(self._pending.features)
            if not final and (lookahead is None or w <= lookahead):
                break
            segments = self._segment_pending()
            first_end = segments[0][1]
            if not final and first_end >= w - lookahead:
                break  # not enough grids after it yet
            closed.append(self._close(first_end + 1))
        return closed

    def _segment_pending(self) -> list[tuple[int, int]]:
        if len(self._pending.features) == 1:
            return [(0, 0)]
        gains = static_gains(torch.stack(self._pending.similarity), self.tau, self.config.max_segment)
        return segment_by_gains(gains, self.config.max_segment)[0]

    def _reduce(self, seg: _Pending) -> VisualTokens:
        return holitom_reduce(torch.stack(seg.features), torch.stack(seg.attention), self.grid_hw,
                              self.config.retain, tau=self.tau, protected=self._protected_positions())

    def _close_all(self) -> list[SegmentRecord]:
        """Look-ahead over the whole stream: one reduction over every pending grid, exactly as `summarize`
        reduces the clip, then each of its segments prefilled in turn."""
        if not self._pending.features:
            self._start()
            return []
        seg = self._pending.pop_front(len(self._pending.features))
        tokens = self._reduce(seg)
        carried = [tokens.carry(torch.stack(layer)) for layer in zip(*seg.side, strict=True)]
        kept = torch.unique(tokens.frame).tolist()  # grids that keep a token (for SmolVLM2's intro)
        times = {index: t for first, last, t0, t1 in seg.frames for index, t in ((first, t0), (last, t1))}
        self._start(ClipInfo(times=[times[i] for i in sorted(times)],  # each stream frame once (not padding)
                             kept_times=[seg.frames[g][2] for g in kept]))
        records = []
        for s, e in tokens.segments:
            mask = (tokens.frame >= s) & (tokens.frame <= e)
            pick = mask.nonzero().squeeze(1)
            part = _Pending(**{f: getattr(seg, f)[s : e + 1] for f in seg.__dataclass_fields__
                               if f != "similarity"})
            records.append(self._close_reduced(part, tokens, pick, [side[pick] for side in carried], offset=s))
        return records

    def _close(self, length: int) -> SegmentRecord:
        """Merge the first `length` pending grids as one segment and prefill its tokens."""
        seg = self._pending.pop_front(length)
        if all(seg.skipped) and self._counts["segments"] - 1 in self._segment_entries:
            return self._extend_previous(seg)
        tokens = self._reduce(seg)
        side = [tokens.carry(torch.stack(layer)) for layer in zip(*seg.side, strict=True)]
        return self._close_reduced(seg, tokens, None, side, offset=0)

    def _extend_previous(self, seg: _Pending) -> SegmentRecord:
        """Nothing new since the previous segment, still in context: it now stands for these grids too."""
        segment_id = self._counts["segments"]
        self._counts["segments"] += 1
        n = self.tokens_per_frame
        previous = self.entry_segment == segment_id - 1
        share = torch.where(previous & (self.entry_pos >= 0), self.entry_size, 0.0)
        self.entry_size = self.entry_size + len(seg.features) * n * share / share.sum()
        self.entry_segment = torch.where(previous, segment_id, self.entry_segment)
        self._segment_entries[segment_id] = self._segment_entries.pop(segment_id - 1)
        return self._record(seg, segment_id, 0)

    def _close_reduced(self, seg: _Pending, tokens: VisualTokens, pick: torch.Tensor | None,
                       side: list[torch.Tensor], offset: int) -> SegmentRecord:
        """Prefill one segment's reduced tokens: `tokens` (or its rows `pick`) whose grids count from the
        reduction's first grid, this segment's grids starting at `offset` of them."""
        segment_id = self._counts["segments"]
        self._counts["segments"] += 1
        select = (lambda t: t) if pick is None else (lambda t: t[pick])
        grid = select(tokens.frame) - offset  # within the segment
        part = SegmentTokens(features=select(tokens.features).to(self.dtype), grid=grid + seg.index[0],
                             position=select(tokens.position), size=select(tokens.size).float(),
                             grid_hw=self.grid_hw, first_grid=seg.index[0], grids=list(seg.frames), side=side)
        chunk = self.layout.segment(part)
        self._make_room(chunk.embeds.shape[0])
        first_frames = torch.tensor([f[0] for f in seg.frames], dtype=torch.long, device=self.device)
        self._prefill(chunk, segment=segment_id, grid_frame=first_frames[grid], position=part.position,
                      size=part.size)
        kept_count = len(part.features)
        self._counts["tokens_kept"] += kept_count
        last = len(seg.frames) - 1 + offset
        self._last_view = (seg.images[-1], (tokens.fate[last] == Fate.KEPT).view(*self.grid_hw))
        return self._record(seg, segment_id, kept_count)

    def _record(self, seg: _Pending, segment_id: int, kept: int) -> SegmentRecord:
        return SegmentRecord(segment=segment_id, frames=(seg.frames[0][0], seg.frames[-1][1]),
                             time_s=(round(seg.frames[0][2], 3), round(seg.frames[-1][3], 3)),
                             frames_skipped=sum(f[1] - f[0] + 1 for f, s in zip(seg.frames, seg.skipped, strict=True)
                                                if s),
                             tokens_in=len(seg.features) * self.tokens_per_frame, tokens_kept=kept,
                             kv_tokens=self.kv_tokens, kv_bytes=cache_bytes(self.cache),
                             evicted_segments=self._counts["evicted_segments"])

    @property
    def last_view(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(frame [H, W, 3] uint8, kept grid [h, w] bool) of the last segment, for the web view; the grid is
        read from the device on first access only."""
        if self._last_view is not None and isinstance(self._last_view[1], torch.Tensor):
            self._last_view = (self._last_view[0], self._last_view[1].cpu().numpy())
        return self._last_view

    def _protected_positions(self) -> torch.Tensor | None:
        """[N] bool: the grid positions the questions so far looked at most (None before enough questions)."""
        if self.importance is None or not self.importance.ready or self.config.protect_fraction <= 0:
            return None
        k = round(self.config.protect_fraction * self.tokens_per_frame)
        protected = torch.zeros(self.tokens_per_frame, dtype=torch.bool, device=self.device)
        return protected.index_fill_(0, self.importance.top(k), True)

    # ------------------------------------------------------------------ bounded memory
    def _make_room(self, incoming: int) -> None:
        """Keep cache + incoming (+ room for a question) within max_context_tokens."""
        budget = self.config.max_context_tokens
        if budget is None:
            return
        reserve = 32  # newline + a short question
        while self.kv_tokens + incoming + reserve > budget:
            if not self._segment_entries:
                return  # nothing left to free: the incoming segment is larger than the budget allows
            oldest = next(iter(self._segment_entries))  # segment ids only grow: the first is the oldest
            if self._segment_entries[oldest] >= 4 and oldest not in self._merged_segments:
                self._merge_segment_kv(oldest)
            else:
                self._evict(oldest)

    def _merge_segment_kv(self, segment: int) -> None:
        """Halve a segment's KV entries: bipartite matching on input embeddings, size-weighted averages
        of keys and values in every layer (survivors keep their RoPE positions)."""
        in_seg = (self.entry_segment == segment)[None]
        n_remove = self._segment_entries[segment] // 2
        target = bipartite_plan(self.entry_embed[None], in_seg, n_remove)
        keep = (target[0] < 0).nonzero().squeeze(1)[None]  # the call's one host read
        plan = MergePlan(keep=keep, target=target)
        sizes = self.entry_size[None]
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)  # [1, kv_heads, L, hd]
                b, h, length, d = t.shape
                flat = t.permute(0, 2, 1, 3).reshape(1, length, h * d)
                merged, _ = apply_plan(flat, plan, sizes)
                setattr(layer, name, merged.view(1, -1, h, d).permute(0, 2, 1, 3).contiguous())
        self.entry_embed, self.entry_size = (x[0] for x in apply_plan(self.entry_embed[None], plan, sizes))
        for name in ("entry_segment", "entry_frame", "entry_pos"):
            setattr(self, name, getattr(self, name)[keep[0]])
        self.entry_rope = self.entry_rope[:, keep[0]]
        self._segment_entries[segment] -= target.shape[1] - keep.shape[1]
        self._merged_segments.add(segment)
        self._counts["merged_kv_tokens"] += n_remove

    def _evict(self, segment: int) -> None:
        """Drop every cache entry of `segment` (keys and values in every layer, bookkeeping) and record it."""
        count = self._segment_entries.pop(segment)
        # entries of other segments first, each group in cache order: the split needs no host read
        order = torch.argsort((self.entry_segment == segment).to(torch.uint8), stable=True)
        keep, gone = order[: len(order) - count], order[len(order) - count :]
        frames, sizes = self.entry_frame[gone], self.entry_size[gone]
        first_frame = torch.where(frames >= 0, frames, frames.max()).min()  # layout rows have no frame
        first, last, originals = torch.stack([first_frame.double(), frames.max().double(),
                                              sizes.sum().double()]).tolist()  # one host read for the record
        self.evicted.append({"segment": segment, "frames": [int(first), int(last)], "tokens": count,
                             "originals": int(originals)})
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        for name in ("entry_segment", "entry_frame", "entry_pos", "entry_size", "entry_embed"):
            setattr(self, name, getattr(self, name)[keep])
        self.entry_rope = self.entry_rope[:, keep]
        self._counts["evicted_segments"] += 1

    # ------------------------------------------------------------------ questions
    @torch.no_grad()
    def ask(self, prompt: str, max_new_tokens: int = 64) -> str:
        """Answer from the current context; the context is unchanged afterwards (the question's attention
        on visual tokens is recorded into the importance state)."""
        self._start()
        question = self.layout.question(prompt)
        saved_length, saved_position = self.kv_tokens, self.next_position
        layer = self.adapter.language_model.layers[len(self.adapter.language_model.layers) // 2]
        seen = {}
        handle = layer.self_attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        try:
            logits = self._run(question, logits=True)
            self.last_logits = logits[0, -1]  # [V] the first answer token's logits (fidelity checks)
        finally:
            handle.remove()
        self._record_importance(layer.self_attn, seen, saved_length)
        answer = []
        eos = self.adapter.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        embed = self.adapter.model.get_input_embeddings()
        for _ in range(max_new_tokens):
            next_token = logits[0, -1].argmax().view(1)  # stays on the device as the next input
            token = int(next_token)  # the one host read per token: the end-of-sequence check
            if token in stop:
                break
            answer.append(token)
            # decode steps: every M-RoPE row one past the last, as generate steps them
            rope = None if question.rope is None else self._last_rope + 1
            logits = self._run(Chunk(embed(next_token), next_token, rope), logits=True)
        crop_cache(self.cache, saved_length)
        self.next_position = saved_position
        self.last_answer = self.adapter.processor.tokenizer.decode(answer, skip_special_tokens=True)
        self.last_answer_ids = answer
        return self.last_answer

    def _record_importance(self, attn: torch.nn.Module, seen: dict, context_length: int) -> None:
        """Attention of the question's last token over the cached visual tokens, summed per grid position."""
        keys_layer = self.cache.layers[attn.layer_idx]
        hidden = seen["hidden_states"]
        cos, sin = seen["position_embeddings"]
        # scores over every key the last token saw: cached context + the question itself
        scores = query_attention(attn, hidden[:, -1:], (cos[..., -1:, :], sin[..., -1:, :]), keys_layer.keys)
        scores = scores[0, :context_length]
        n = self.tokens_per_frame
        if self.importance is None:
            return  # nothing seen yet
        # layout entries (prompt text, newlines, timestamps) add into a spare slot n (a mask, not a boolean
        # index: no host sync)
        slot = torch.where(self.entry_pos >= 0, self.entry_pos, n)
        per_position = torch.zeros(n + 1, dtype=scores.dtype, device=scores.device).index_add_(0, slot, scores)
        self.importance.update(per_position[:n])

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        frames = self._counts["frames_in"]
        return {**self._counts, "pending_frames": len(self._pending.features), "kv_tokens": self.kv_tokens,
                "kv_bytes": cache_bytes(self.cache), "fps": round(frames / elapsed, 2),
                "ms_per_frame": round(1000 * self._push_seconds / max(frames, 1), 2),
                "stream_time_s": round(float(self._stream_time), 3), "answer": self.last_answer}


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """[3, THUMB, THUMB] float32 colour cell averages: a cheap, resolution-independent view for the skip
    test (per channel, since a change of colour at equal brightness is still a change)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    return F.adaptive_avg_pool2d(tensor, THUMB)[0].numpy()


def _small(image: np.ndarray, side: int = 320) -> np.ndarray:
    """A display-size copy of a frame (bounded memory for the pending window)."""
    h, w = image.shape[:2]
    step = max(1, max(h, w) // side)
    return np.ascontiguousarray(image[::step, ::step])
