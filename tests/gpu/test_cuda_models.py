"""Each model family on CUDA: reduction off ≡ the unmodified model, reduced cached decode ≡ no-cache
recomputation, the compiled static-cache decode ≡ generate, and summarize end to end (frames given, no
video decoder needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamprune.encoder import parse_encoder
from streamprune.models import load_video_llm
from streamprune.models.generation import generate_static
from streamprune.models.llava_video import LlavaVideoAdapter
from streamprune.reduce import reduce_tokens
from streamprune.reduce.inner_cuts import InnerConfig
from streamprune.sources.video import VideoClip
from streamprune.summarize import SummarizeOptions, encode_clip, finish
from streamprune.tokens import VisualTokens
from tests.adapter_checks import assert_cached_equals_nocache
from tests.device_checks import assert_on
from tests.test_model_llava_video import llava_video_reference

MODELS = ["tiny", "tiny-llava-video", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-smolvlm2"]


def _clip(frames: int = 8):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8)
    video[frames // 2:] = video[frames // 2]
    return video, np.arange(frames) / 4.0


@pytest.fixture(scope="module", params=MODELS)
def adapter(request):
    adapter = load_video_llm(request.param, device="cuda", dtype="float32").adapter
    adapter.model.generation_config.eos_token_id = None
    return adapter


def test_reduction_off_is_the_unmodified_model(adapter):
    video, times = _clip()
    prompt = adapter.prepare(video, "What happens?", times)
    if isinstance(adapter, LlavaVideoAdapter):  # no transformers class of its own: built from the model's modules
        expected = llava_video_reference(adapter, video, "What happens?", 8)[2]
    else:
        expected = adapter.model.generate(**prompt.model_inputs, max_new_tokens=8, do_sample=False)
        expected = expected[:, prompt.input_ids.shape[1]:]
    encoded = adapter.encode(prompt)
    assert_on(encoded.features, "cuda", torch.float32)
    inputs = adapter.reduced_inputs(prompt, VisualTokens.unreduced(encoded.features, encoded.grid_hw), encoded)
    got = adapter.generate(inputs, 8)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("inner", [InnerConfig(), InnerConfig(mode="holitom", layer=3, ratio=0.5)])
def test_reduced_cached_decode_equals_recompute(adapter, inner):
    video, times = _clip()
    prompt = adapter.prepare(video, "What happens?", times)
    encoded = adapter.encode(prompt)
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
    assert_on(tokens, "cuda", torch.float32)
    inputs = adapter.reduced_inputs(prompt, tokens, encoded)
    assert_cached_equals_nocache(adapter, inputs, inner, atol=2e-3)


def test_compiled_decode_equals_generate(adapter):
    video, times = _clip()
    prompt = adapter.prepare(video, "What happens?", times)
    encoded = adapter.encode(prompt)
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
    inputs = adapter.reduced_inputs(prompt, tokens, encoded)
    with adapter.inner_stage(inputs, InnerConfig()) as stage:
        expected = adapter.generate(inputs, 12)
    for _ in range(2):  # the second call reuses the compiled graph
        with adapter.inner_stage(inputs, InnerConfig()) as stage:
            got = generate_static(adapter, inputs, 12, stage=stage, compile=True)
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_summarize_end_to_end_on_cuda(dtype):
    video, times = _clip(16)
    opts = SummarizeOptions(video="frames", model="tiny", retain=0.25, frames=16, max_new_tokens=6, device="cuda",
                            dtype=dtype, encoder=parse_encoder("reuse+tome:0.5", None, None, None, "decreasing"))
    clip = VideoClip(frames=video, timestamps=times, frame_indices=np.arange(16), fps=4.0, duration=4.0,
                     total_frames=16, path="frames")
    report = finish(opts, encode_clip(opts, clip, {"decode_video": 0.0}))
    assert report.runtime["device"].startswith("cuda") and report.runtime["gpu"]
    assert report.runtime["dtype"] == dtype
    assert report.generated_tokens == 6 and report.tokens["kept"] < report.tokens["vision"]
