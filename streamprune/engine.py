"""`StreamEngine`: watch a video frame by frame with a context that grows with what is new, not with time.

    push(frame) ─▶ pixel skip test ─▶ vision tower ─▶ pending window ─▶ online segmentation
                   (near-identical        (skipped frames reuse    (HoliTom's DP over the window;
                    frames never reach     the last features)       a segment closes once `lookahead`
                    the tower)                                      frames follow it)
    closed segment ─▶ HoliTom merge (important positions protected) ─▶ incremental prefill into the KV cache
    ask(prompt) ─▶ newline + question on top of the cache, greedy answer, cache cropped back

The same pieces as `summarize` — encoder, HoliTom segmentation and merging, LLaVA-OneVision adapter —
but the DP sees a bounded look-ahead instead of the whole video, and tokens are prefilled once, as their
segment closes. With the look-ahead covering the whole video the segments equal the offline ones.

Memory is bounded by `max_context_tokens`: when the cache would exceed it, the oldest segment's KV
entries are merged pairwise by similarity (bipartite matching, size-weighted), then evicted whole; the
prompt prefix is never touched and every eviction is recorded.

Devices: frames arrive as numpy and the skip test stays on the host; every tensor (features, the cache and
its per-entry bookkeeping, importance) lives on the model's device, in the model's dtype for values. Which
segments the cache holds, and how many entries each, is also counted on the host, so eviction decisions
never read the device. Host reads per push: the pending window's similarities for the segmentation DP;
per question: one per generated token (the end-of-sequence check).
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
from streamprune.models.cache_compat import cache_kwargs, crop_cache
from streamprune.models.inner_stage import query_attention
from streamprune.models.llava_onevision import LlavaOnevisionAdapter
from streamprune.reduce.holitom import default_tau, holitom_reduce, segment_by_gains, static_gains
from streamprune.reduce.inner import MergePlan, apply_plan, bipartite_plan
from streamprune.summarize import cache_bytes
from streamprune.tokens import Fate

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
    """Frames since the last closed segment: features [W, N, D], attention [W, N] and bookkeeping."""

    features: list[torch.Tensor] = field(default_factory=list)
    attention: list[torch.Tensor] = field(default_factory=list)
    similarity: list[torch.Tensor] = field(default_factory=list)  # [N] fp32 per transition i → i+1 (W−1)
    index: list[int] = field(default_factory=list)  # consecutive stream frame indices
    time: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)

    def pop_front(self, count: int) -> _Pending:
        """Remove and return the first `count` frames (and the transitions out of them)."""
        head = _Pending(**{f: getattr(self, f)[:count] for f in self.__dataclass_fields__})
        for f in self.__dataclass_fields__:
            del getattr(self, f)[:count]
        return head


class StreamEngine:
    def __init__(self, adapter: LlavaOnevisionAdapter, config: StreamConfig | None = None) -> None:
        if not adapter.supports_streaming:
            raise ConfigError(f"streaming supports LLaVA-OneVision models; this model is {adapter.model_type} "
                              "(use `streamprune summarize` for it)")
        self.adapter = adapter
        self.config = config or StreamConfig()
        self.config.validate()
        self.device, self.dtype = adapter.model.device, adapter.model.dtype
        self.tau = self.config.tau if self.config.tau is not None else default_tau(self.config.retain)
        self.grid_hw = adapter.grid_hw
        self.importance = ImportanceState(adapter.tokens_per_frame, window=self.config.importance_window,
                                          decay=self.config.importance_decay, device=self.device)
        self.vision = adapter.vision_encoder(self.config.encoder) if self.config.encoder.active else None
        self._prefix, _ = self._prompt_ids("?")
        self.prefix_ids = torch.tensor(self._prefix, dtype=torch.long, device=self.device)
        self._pending = _Pending()
        self._last_thumb: np.ndarray | None = None
        self._counts = dict(frames_in=0, frames_skipped=0, frames_encoded=0, tokens_encoded=0, tokens_kept=0,
                            segments=0, evicted_segments=0, merged_kv_tokens=0, patches_computed=0, patches_total=0)
        self.evicted: list[dict] = []  # what left the context: segment, frames, tokens
        self._merged_segments: set[int] = set()  # segments whose KV entries were already halved
        self.last_answer = ""
        self._last_view: tuple[np.ndarray, torch.Tensor | np.ndarray] | None = None
        self._push_seconds = 0.0
        self._started = time.perf_counter()
        self._stream_time = 0.0
        self._reset_cache()

    # ------------------------------------------------------------------ prompt and cache
    def _prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids (host lists) before and after the video placeholder in the chat-formatted prompt."""
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.adapter.processor.apply_chat_template(conversation, add_generation_prompt=True)
        ids = list(self.adapter.processor.tokenizer(text).input_ids)
        at = [i for i, token in enumerate(ids) if token == self.adapter.video_token_id]
        if len(at) != 1:
            raise ConfigError("the chat template must place exactly one video placeholder")
        return ids[: at[0]], ids[at[0] + 1 :]

    def _split_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids before and after the video placeholder, as [n] long tensors on the model's device."""
        prefix, suffix = self._prompt_ids(prompt)
        return (torch.tensor(prefix, dtype=torch.long, device=self.device),
                torch.tensor(suffix, dtype=torch.long, device=self.device))

    def _reset_cache(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.adapter.model.config.text_config)
        self.next_position = 0
        # per cache entry [L]: segment (-1 for the prompt prefix), frame, grid position, size (original tokens
        # it stands for, fp32) and input embedding [L, C] (model dtype), all on the model's device
        device = self.device
        self.entry_segment = torch.empty(0, dtype=torch.long, device=device)
        self.entry_frame = torch.empty(0, dtype=torch.long, device=device)
        self.entry_pos = torch.empty(0, dtype=torch.long, device=device)
        self.entry_size = torch.empty(0, device=device)
        self.entry_embed = torch.empty(0, self.adapter.model.config.text_config.hidden_size, dtype=self.dtype,
                                       device=device)
        self._segment_entries: dict[int, int] = {}  # host count of cache entries per segment, oldest first
        embeds = self.adapter.model.get_input_embeddings()(self.prefix_ids[None])
        m = embeds.shape[1]
        self._prefill(embeds, segment=-1, frame=torch.full((m,), -1, device=device),
                      pos=torch.full((m,), -1, device=device), size=torch.ones(m, device=device))

    @torch.no_grad()
    def _prefill(self, embeds: torch.Tensor, segment: int, frame: torch.Tensor, pos: torch.Tensor,
                 size: torch.Tensor) -> None:
        """Append `embeds` [1, m, C] to the KV cache at the next positions (never re-prefilled); frame, pos,
        size: [m] per entry."""
        m = embeds.shape[1]
        positions = torch.arange(self.next_position, self.next_position + m, device=embeds.device)[None]
        self.adapter.language_model(inputs_embeds=embeds, position_ids=positions,
                                    **cache_kwargs(self.adapter.language_model, self.cache),
                                    use_cache=True)
        self.next_position += m
        self.entry_segment = torch.cat([self.entry_segment, torch.full((m,), segment, device=embeds.device)])
        self.entry_frame = torch.cat([self.entry_frame, frame])
        self.entry_pos = torch.cat([self.entry_pos, pos])
        self.entry_size = torch.cat([self.entry_size, size.float()])
        self.entry_embed = torch.cat([self.entry_embed, embeds[0].to(self.entry_embed.dtype)])
        if segment >= 0:
            self._segment_entries[segment] = self._segment_entries.get(segment, 0) + m

    @property
    def kv_tokens(self) -> int:
        return self.cache.get_seq_length()

    # ------------------------------------------------------------------ ingest
    @torch.no_grad()
    def push(self, image: np.ndarray, timestamp: float) -> list[SegmentRecord]:
        """Ingest one RGB frame [H, W, 3] uint8 taken at `timestamp` seconds. Returns segments it closed."""
        started = time.perf_counter()
        self._counts["frames_in"] += 1
        self._stream_time = timestamp
        thumb = _thumbnail(image)
        skip = (self._last_thumb is not None and self._pending.features and self.config.skip_threshold > 0
                and float(np.abs(thumb - self._last_thumb).max()) < self.config.skip_threshold)
        if skip:  # counts as a repeat of the last encoded frame: fully static
            features, attention = self._pending.features[-1], self._pending.attention[-1]
            self._counts["frames_skipped"] += 1
        else:
            pixels = self.adapter.pixel_values(image[None])
            encoded = self.adapter.encode_pixels(pixels, encoder=self.vision)
            features, attention = encoded.features[0], encoded.attention[0]
            self._last_thumb = thumb
            self._counts["frames_encoded"] += 1
            self._counts["tokens_encoded"] += features.shape[0]
            self._counts["patches_computed"] += encoded.encoder.computed_patches
            self._counts["patches_total"] += encoded.encoder.patches
        p = self._pending
        if p.features:  # a skipped frame is identical to its predecessor by construction
            similarity = (torch.ones(features.shape[0], device=features.device) if skip
                          else F.cosine_similarity(p.features[-1].float(), features.float(), -1))
            p.similarity.append(similarity)
        p.features.append(features)
        p.attention.append(attention)
        p.index.append(self._counts["frames_in"] - 1)
        p.time.append(timestamp)
        p.skipped.append(skip)
        p.images.append(_small(image))
        # segment again only when something new arrived or the window is full: a repeated frame cannot
        # settle a boundary that the frames before it left open, and this keeps still cameras cheap
        window_full = len(p.features) >= self.config.max_segment + (self.config.lookahead or 0)
        closed = self._close_settled() if not skip or window_full else []
        self._push_seconds += time.perf_counter() - started
        return closed

    def flush(self) -> list[SegmentRecord]:
        """End of stream: segment and prefill whatever is pending."""
        return self._close_settled(final=True)

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
                break  # not enough frames after it yet
            closed.append(self._close(first_end + 1))
        return closed

    def _segment_pending(self) -> list[tuple[int, int]]:
        if len(self._pending.features) == 1:
            return [(0, 0)]
        gains = static_gains(torch.stack(self._pending.similarity), self.tau, self.config.max_segment)
        return segment_by_gains(gains, self.config.max_segment)[0]

    def _close(self, length: int) -> SegmentRecord:
        """Merge the first `length` pending frames as one segment and prefill its tokens."""
        seg = self._pending.pop_front(length)
        segment_id = self._counts["segments"]
        self._counts["segments"] += 1
        n = self.adapter.tokens_per_frame
        if all(seg.skipped) and segment_id - 1 in self._segment_entries:
            # nothing new since the previous segment, still in context: it now stands for these frames too
            previous = self.entry_segment == segment_id - 1
            share = torch.where(previous, self.entry_size, 0.0)
            self.entry_size = self.entry_size + length * n * share / share.sum()
            self.entry_segment = torch.where(previous, segment_id, self.entry_segment)
            self._segment_entries[segment_id] = self._segment_entries.pop(segment_id - 1)
            kept_count = 0
        else:
            features, attention = torch.stack(seg.features), torch.stack(seg.attention)
            tokens = holitom_reduce(features, attention, self.grid_hw, self.config.retain, tau=self.tau,
                                    protected=self._protected_positions())
            self._make_room(len(tokens))
            # the segment's frames are consecutive stream frames: tokens.frame counts from its first
            self._prefill(tokens.features.to(self.dtype)[None], segment=segment_id, frame=tokens.frame + seg.index[0],
                          pos=tokens.position, size=tokens.size)
            kept_count = len(tokens)
            self._last_view = (seg.images[-1], (tokens.fate[-1] == Fate.KEPT).view(*self.grid_hw))
        self._counts["tokens_kept"] += kept_count
        return SegmentRecord(segment=segment_id, frames=(seg.index[0], seg.index[-1]),
                             time_s=(round(float(seg.time[0]), 3), round(float(seg.time[-1]), 3)),
                             frames_skipped=int(sum(seg.skipped)), tokens_in=length * n, tokens_kept=kept_count,
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
        if not self.importance.ready or self.config.protect_fraction <= 0:
            return None
        k = round(self.config.protect_fraction * self.adapter.tokens_per_frame)
        protected = torch.zeros(self.adapter.tokens_per_frame, dtype=torch.bool, device=self.device)
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
        first, last, originals = torch.stack([frames.min().double(), frames.max().double(),
                                              sizes.sum().double()]).tolist()  # one host read for the record
        self.evicted.append({"segment": segment, "frames": [int(first), int(last)], "tokens": count,
                             "originals": int(originals)})
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        for name in ("entry_segment", "entry_frame", "entry_pos", "entry_size", "entry_embed"):
            setattr(self, name, getattr(self, name)[keep])
        self._counts["evicted_segments"] += 1

    # ------------------------------------------------------------------ questions
    @torch.no_grad()
    def ask(self, prompt: str, max_new_tokens: int = 64) -> str:
        """Answer from the current context; the context is unchanged afterwards (the question's attention
        on visual tokens is recorded into the importance state)."""
        prefix, suffix = self._prompt_ids(prompt)
        if prefix != self._prefix:
            raise ConfigError("the chat template's prefix depends on the question; cannot reuse the cache")
        embed = self.adapter.model.get_input_embeddings()
        newline = self.adapter.model.model.image_newline[None, None].to(self.dtype)
        question = torch.cat([newline, embed(torch.tensor([suffix], dtype=torch.long, device=self.device))], 1)
        saved_length, saved_position = self.kv_tokens, self.next_position
        layer = self.adapter.language_model.layers[len(self.adapter.language_model.layers) // 2]
        seen = {}
        handle = layer.self_attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        try:
            logits = self._forward(question)
        finally:
            handle.remove()
        self._record_importance(layer.self_attn, seen, saved_length)
        answer = []
        eos = self.adapter.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        for _ in range(max_new_tokens):
            next_token = logits[0, -1].argmax().view(1, 1)  # stays on the device as the next input
            token = int(next_token)  # the one host read per token: the end-of-sequence check
            if token in stop:
                break
            answer.append(token)
            logits = self._forward(embed(next_token))
        crop_cache(self.cache, saved_length)
        self.next_position = saved_position
        self.last_answer = self.adapter.processor.tokenizer.decode(answer, skip_special_tokens=True)
        self.last_answer_ids = answer
        return self.last_answer

    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        m = embeds.shape[1]
        positions = torch.arange(self.next_position, self.next_position + m, device=embeds.device)[None]
        self.next_position += m
        out = self.adapter.model(inputs_embeds=embeds, position_ids=positions,
                                 **cache_kwargs(self.adapter.model, self.cache),
                                 use_cache=True, logits_to_keep=1)
        return out.logits

    def _record_importance(self, attn: torch.nn.Module, seen: dict, context_length: int) -> None:
        """Attention of the question's last token over the cached visual tokens, summed per grid position."""
        keys_layer = self.cache.layers[attn.layer_idx]
        hidden = seen["hidden_states"]
        cos, sin = seen["position_embeddings"]
        # scores over every key the last token saw: cached context + the question itself
        scores = query_attention(attn, hidden[:, -1:], (cos[..., -1:, :], sin[..., -1:, :]), keys_layer.keys)
        scores = scores[0, :context_length]
        n = self.adapter.tokens_per_frame
        # prompt-prefix entries add into a spare slot n (a mask, not a boolean index: no host sync)
        slot = torch.where(self.entry_segment >= 0, self.entry_pos, n)
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
