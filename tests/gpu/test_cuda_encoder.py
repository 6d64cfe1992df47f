"""Every encoder mode on CUDA: the tower runner, reuse and the four merging methods keep device and dtype, and
with nothing active equal the model's own tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamprune.encoder import parse_encoder
from streamprune.models import load_video_llm
from tests.device_checks import assert_on

SPECS = ["none", "reuse", "reuse-alone", "tome:0.5", "zero-tprune:0.5", "gtp:0.5", "token-transforming:0.5",
         "reuse+tome:0.5"]


@pytest.fixture(scope="module")
def adapters():
    return {dtype: load_video_llm("tiny", device="cuda", dtype=dtype).adapter for dtype in ("float32", "bfloat16")}


def _pixels(adapter):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    frames[3:] = frames[2]  # still frames: reuse has something to reuse
    frames[4, :16, :16] = 255 - frames[4, :16, :16]  # and a small change
    return adapter.prepare(frames, "hi").pixel_values_videos


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
def test_encoder_mode_on_cuda(adapters, spec, schedule):
    for adapter in adapters.values():
        pixels = _pixels(adapter)
        config = parse_encoder(spec, None, None, None, schedule)
        encoded = adapter.encode_pixels(pixels, encoder=adapter.vision_encoder(config) if config.active else None)
        assert_on(encoded.features, "cuda", adapter.model.dtype)
        assert encoded.attention.is_cuda
        if not config.active:
            full = adapter.encode_pixels(pixels)
            assert torch.equal(encoded.features, full.features)


def test_unreduced_runner_equals_tower_on_cuda(adapters):
    adapter = adapters["float32"]
    pixels = _pixels(adapter)
    own = adapter.encode_pixels(pixels)
    runner = adapter.encode_pixels(pixels, encoder=adapter.vision_encoder(parse_encoder("tome:0", None, None, None, None)))
    torch.testing.assert_close(runner.features, own.features, atol=1e-4, rtol=1e-4)
