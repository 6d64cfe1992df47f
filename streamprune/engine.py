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
    similarity: list[torch.Tensor] = field(default_factory=list)  # [N] per transition i → i+1 (W−1 of them)
    index: list[int] = field(default_factory=list)
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
        self.tau = self.config.tau if self.config.tau is not None else default_tau(self.config.retain)
        self.grid_hw = adapter.grid_hw
        self.importance = ImportanceState(adapter.tokens_per_frame, window=self.config.importance_window,
                                          decay=self.config.importance_decay)
        self.vision = adapter.vision_encoder(self.config.encoder) if self.config.encoder.active else None
        self.prefix_ids, _ = self._split_prompt("?")
        self._pending = _Pending()
        self._last_thumb: np.ndarray | None = None
        self._counts = dict(frames_in=0, frames_skipped=0, frames_encoded=0, tokens_encoded=0, tokens_kept=0,
                            segments=0, evicted_segments=0, merged_kv_tokens=0, patches_computed=0, patches_total=0)
        self.evicted: list[dict] = []  # what left the context: segment, frames, tokens
        self._merged_segments: set[int] = set()  # segments whose KV entries were already halved
        self.last_answer = ""
        self.last_view: tuple[np.ndarray, np.ndarray] | None = None  # (frame, kept grid) of the last segment
        self._push_seconds = 0.0
        self._started = time.perf_counter()
        self._stream_time = 0.0
        self._reset_cache()

    # ------------------------------------------------------------------ prompt and cache
    def _split_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids before and after the video placeholder in the chat-formatted prompt."""
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.adapter.processor.apply_chat_template(conversation, add_generation_prompt=True)
        ids = torch.tensor(self.adapter.processor.tokenizer(text).input_ids)
        at = (ids == self.adapter.video_token_id).nonzero().squeeze(1)
        if len(at) != 1:
            raise ConfigError("the chat template must place exactly one video placeholder")
        return ids[: at[0]], ids[at[0] + 1 :]

    def _reset_cache(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.adapter.model.config.text_config)
        self.next_position = 0
        # per cache entry: kind (0 prefix, 1 visual), segment, frame, grid position, size, input embedding
        self.entry_segment = torch.empty(0, dtype=torch.long)
        self.entry_frame = torch.empty(0, dtype=torch.long)
        self.entry_pos = torch.empty(0, dtype=torch.long)
        self.entry_size = torch.empty(0)
        self.entry_embed = torch.empty(0, self.adapter.model.config.text_config.hidden_size)
        embeds = self.adapter.model.get_input_embeddings()(self.prefix_ids[None])
        self._prefill(embeds, segment=-1, frame=torch.full((embeds.shape[1],), -1),
                      pos=torch.full((embeds.shape[1],), -1), size=torch.ones(embeds.shape[1]))

    @torch.no_grad()
    def _prefill(self, embeds: torch.Tensor, segment: int, frame, pos, size) -> None:
        """Append `embeds` [1, m, C] to the KV cache at the next positions (never re-prefilled)."""
        m = embeds.shape[1]
        positions = torch.arange(self.next_position, self.next_position + m)[None]
        self.adapter.language_model(inputs_embeds=embeds, position_ids=positions, past_key_values=self.cache,
                                    use_cache=True)
        self.next_position += m
        self.entry_segment = torch.cat([self.entry_segment, torch.full((m,), segment)])
        self.entry_frame = torch.cat([self.entry_frame, frame])
        self.entry_pos = torch.cat([self.entry_pos, pos])
        self.entry_size = torch.cat([self.entry_size, size.float()])
        self.entry_embed = torch.cat([self.entry_embed, embeds[0].float()])

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
            similarity = torch.ones(features.shape[0]) if skip else F.cosine_similarity(p.features[-1], features, -1)
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
        previous = self.entry_segment == segment_id - 1
        if all(seg.skipped) and previous.any():
            # nothing new since the previous segment, still in context: it now stands for these frames too
            self.entry_size[previous] += length * n * self.entry_size[previous] / self.entry_size[previous].sum()
            self.entry_segment[previous] = segment_id
            kept_count = 0
        else:
            features, attention = torch.stack(seg.features), torch.stack(seg.attention)
            tokens = holitom_reduce(features, attention, self.grid_hw, self.config.retain, tau=self.tau,
                                    protected=self._protected_positions())
            self._make_room(len(tokens))
            self._prefill(tokens.features.to(self.adapter.model.dtype)[None], segment=segment_id,
                          frame=torch.tensor(seg.index)[tokens.frame], pos=tokens.position, size=tokens.size)
            kept_count = len(tokens)
            self.last_view = (seg.images[-1], (tokens.fate[-1] == Fate.KEPT).view(*self.grid_hw).numpy())
        self._counts["tokens_kept"] += kept_count
        return SegmentRecord(segment=segment_id, frames=(seg.index[0], seg.index[-1]),
                             time_s=(round(float(seg.time[0]), 3), round(float(seg.time[-1]), 3)),
                             frames_skipped=int(sum(seg.skipped)), tokens_in=length * n, tokens_kept=kept_count,
                             kv_tokens=self.kv_tokens, kv_bytes=cache_bytes(self.cache),
                             evicted_segments=self._counts["evicted_segments"])

    def _protected_positions(self) -> torch.Tensor | None:
        if not self.importance.ready or self.config.protect_fraction <= 0:
            return None
        k = round(self.config.protect_fraction * self.adapter.tokens_per_frame)
        protected = torch.zeros(self.adapter.tokens_per_frame, dtype=torch.bool)
        protected[self.importance.top(k)] = True
        return protected

    # ------------------------------------------------------------------ bounded memory
    def _make_room(self, incoming: int) -> None:
        """Keep cache + incoming (+ room for a question) within max_context_tokens."""
        budget = self.config.max_context_tokens
        if budget is None:
            return
        reserve = 32  # newline + a short question
        while self.kv_tokens + incoming + reserve > budget:
            visual = self.entry_segment >= 0
            if not visual.any():
                return  # nothing left to free: the incoming segment is larger than the budget allows
            oldest = int(self.entry_segment[visual].min())
            in_oldest = self.entry_segment == oldest
            if in_oldest.sum() >= 4 and oldest not in self._merged_segments:
                self._merge_segment_kv(oldest)
            else:
                self._evict(in_oldest, oldest)

    def _merge_segment_kv(self, segment: int) -> None:
        """Halve a segment's KV entries: bipartite matching on input embeddings, size-weighted averages
        of keys and values in every layer (survivors keep their RoPE positions)."""
        in_seg = (self.entry_segment == segment)[None]
        n_remove = int(in_seg.sum()) // 2
        target = bipartite_plan(self.entry_embed[None], in_seg, n_remove)
        keep = (target[0] < 0).nonzero().squeeze(1)[None]
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
        self._merged_segments.add(segment)
        self._counts["merged_kv_tokens"] += n_remove

    def _evict(self, mask: torch.Tensor, segment: int) -> None:
        keep = (~mask).nonzero().squeeze(1)
        frames = self.entry_frame[mask]
        self.evicted.append({"segment": segment, "frames": [int(frames.min()), int(frames.max())],
                             "tokens": int(mask.sum()), "originals": int(self.entry_size[mask].sum())})
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
        prefix, suffix = self._split_prompt(prompt)
        if not torch.equal(prefix, self.prefix_ids):
            raise ConfigError("the chat template's prefix depends on the question; cannot reuse the cache")
        embed = self.adapter.model.get_input_embeddings()
        newline = self.adapter.model.model.image_newline[None, None].to(self.adapter.model.dtype)
        question = torch.cat([newline, embed(suffix[None])], 1)
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
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            eos = self.adapter.model.generation_config.eos_token_id
            if eos is not None and token in (eos if isinstance(eos, list) else [eos]):
                break
            answer.append(token)
            logits = self._forward(embed(torch.tensor([[token]])))
        self.cache.crop(saved_length)
        self.next_position = saved_position
        self.last_answer = self.adapter.processor.tokenizer.decode(answer, skip_special_tokens=True)
        self.last_answer_ids = answer
        return self.last_answer

    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        m = embeds.shape[1]
        positions = torch.arange(self.next_position, self.next_position + m)[None]
        self.next_position += m
        out = self.adapter.model(inputs_embeds=embeds, position_ids=positions, past_key_values=self.cache,
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
        visual = self.entry_segment >= 0
        per_position = torch.zeros(self.adapter.tokens_per_frame).index_add_(0, self.entry_pos[visual],
                                                                             scores[visual])
        self.importance.update(per_position)

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
