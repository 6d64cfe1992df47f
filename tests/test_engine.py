"""StreamEngine on the tiny LLaVA-OneVision: online segmentation, incremental prefill, frame skipping,
bounded memory, and questions that leave the context unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamprune import ConfigError
from streamprune.engine import StreamConfig, StreamEngine
from streamprune.models import load_video_llm
from streamprune.reduce.holitom import temporal_segments
from streamprune.sources import read_video


@pytest.fixture(scope="module")
def adapter():
    return load_video_llm("tiny").adapter


@pytest.fixture(scope="module")
def clip(sample_video):
    return read_video(sample_video, num_frames=24)


def feed(engine: StreamEngine, frames, times) -> list:
    records = []
    for image, t in zip(frames, times, strict=True):
        records += engine.push(image, float(t))
    return records + engine.flush()


def moving_box(count: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """A still textured background with a bright square moving across it: [count, size, size, 3]."""
    rng = np.random.default_rng(seed)
    background = (rng.random((size, size, 3)) * 120).astype(np.uint8)
    frames = np.repeat(background[None], count, 0)
    for i in range(count):
        x = (3 * i) % (size - 12)
        frames[i, 18:30, x:x + 12] = 255
    return frames


def test_full_lookahead_gives_the_offline_segments(adapter, clip):
    engine = StreamEngine(adapter, StreamConfig(retain=0.25, lookahead=None, max_segment=1024, skip_threshold=0))
    records = feed(engine, clip.frames, clip.timestamps)
    offline = temporal_segments(adapter.encode_pixels(adapter.pixel_values(clip.frames)).features, tau=0.8)
    assert [r.frames for r in records] == offline
    assert sum(r.tokens_in for r in records) == 24 * 196


@pytest.mark.parametrize("lookahead,max_segment", [(1, 64), (3, 5), (8, 8)])
def test_short_lookahead_segments_are_valid(adapter, clip, lookahead, max_segment):
    engine = StreamEngine(adapter, StreamConfig(retain=0.25, lookahead=lookahead, max_segment=max_segment))
    records = feed(engine, clip.frames, clip.timestamps)
    frames = [r.frames for r in records]
    assert frames[0][0] == 0 and frames[-1][1] == len(clip.frames) - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(frames, frames[1:], strict=False))
    assert all(e - s + 1 <= max_segment for s, e in frames)
    assert engine.stats()["pending_frames"] == 0


def test_incremental_prefill_answers_like_a_single_prefill(adapter, clip):
    engine = StreamEngine(adapter, StreamConfig(retain=0.25, lookahead=4, skip_threshold=0))
    feed(engine, clip.frames, clip.timestamps)
    answer_ids = (engine.ask("What happens?", max_new_tokens=8), engine.last_answer_ids)[1]

    # the same final sequence in one pass: prefix, every segment's tokens, newline, question
    _, suffix = engine._split_prompt("What happens?")
    model = adapter.model
    newline = model.model.image_newline[None, None]
    embeds = torch.cat([engine.entry_embed[None], newline, model.get_input_embeddings()(suffix[None])], 1)
    with torch.no_grad():
        one_pass = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                  max_new_tokens=8, do_sample=False)
    assert answer_ids == one_pass[0].tolist()
    assert len(engine.entry_embed) == engine.kv_tokens


def test_ask_leaves_the_context_unchanged_and_feeds_importance(adapter, clip):
    engine = StreamEngine(adapter, StreamConfig(retain=0.25, lookahead=4))
    feed(engine, clip.frames[:12], clip.timestamps[:12])
    before = engine.kv_tokens, engine.next_position, [t.clone() for t in (engine.cache.layers[0].keys,)]
    first = engine.ask("Describe.", max_new_tokens=6)
    assert (engine.kv_tokens, engine.next_position) == before[:2]
    assert torch.equal(engine.cache.layers[0].keys, before[2][0])
    assert engine.ask("Describe.", max_new_tokens=6) == first
    assert engine.importance.steps == 2 and engine.importance.value().sum() > 0


def test_still_camera_skips_the_encoder_and_context_stays_flat(adapter):
    engine = StreamEngine(adapter, StreamConfig(retain=0.1, lookahead=8, max_segment=64, max_context_tokens=1024))
    image = moving_box(1)[0]
    kv = []
    for i in range(20_000):
        engine.push(image, i / 25)
        if i % 1000 == 999:
            kv.append(engine.kv_tokens)
    engine.flush()
    stats = engine.stats()
    assert stats["frames_encoded"] == 1 and stats["frames_skipped"] == 19_999
    assert stats["tokens_kept"] <= 196 and len(set(kv)) == 1  # nothing new, nothing added
    assert stats["segments"] >= 20_000 // 64


def test_memory_is_bounded_and_evictions_recorded(adapter):
    budget = 300
    engine = StreamEngine(adapter, StreamConfig(retain=0.25, lookahead=2, max_segment=4, max_context_tokens=budget))
    frames = moving_box(120)
    peak = 0
    for i, image in enumerate(frames):
        engine.push(image, i / 10)
        peak = max(peak, engine.kv_tokens)
        assert engine.stats()["pending_frames"] <= 4 + 2
    engine.flush()
    assert peak <= budget - 32  # room left for a question
    stats = engine.stats()
    assert stats["evicted_segments"] == len(engine.evicted) > 0 and stats["merged_kv_tokens"] > 0
    first = engine.evicted[0]
    assert first["segment"] == 0 and first["frames"][0] == 0 and first["tokens"] > 0
    assert engine.ask("What moved?", max_new_tokens=4) is not None  # still answers after evictions
    assert int((engine.entry_segment == -1).sum()) == len(engine.prefix_ids)  # the prompt prefix is kept


def test_frame_skip_threshold(adapter):
    engine = StreamEngine(adapter, StreamConfig(retain=0.25))
    frames = moving_box(10, size=320)  # a 12-pixel box on a 320-pixel frame: small, but it moves
    for i, image in enumerate(frames):
        engine.push(image, i)
    assert engine.stats()["frames_encoded"] == 10
    noisy = np.clip(frames[-1].astype(int) + np.random.default_rng(1).integers(-3, 4, frames[-1].shape), 0, 255)
    engine.push(noisy.astype(np.uint8), 10.0)  # sensor-like noise on a still frame
    engine.push(frames[-1], 11.0)
    assert engine.stats()["frames_skipped"] == 2


@pytest.mark.parametrize("config", [StreamConfig(retain=0.0), StreamConfig(lookahead=0), StreamConfig(max_segment=0),
                                    StreamConfig(max_context_tokens=10)])
def test_bad_config(adapter, config):
    with pytest.raises(ConfigError):
        StreamEngine(adapter, config)
