"""The video-LLM adapters make no tensor without a device and keep the model's dtype (proved on the CPU in
bf16 with meta as the default device, see tests/device_checks.py), `LLMInputs.sizes` waits until it is read,
and `load_video_llm` puts the weights where and in the dtype it is asked to."""

from __future__ import annotations

import pytest
import torch

from streamprune.errors import ConfigError
from streamprune.models import load_video_llm
from streamprune.models.base import LLMInputs, VideoLLMAdapter
from streamprune.models.qwen2_5_vl import received_attention_grids, window_raster_order
from streamprune.reduce import reduce_tokens
from streamprune.reduce.inner_cuts import InnerConfig
from streamprune.runtime import resolve_runtime
from streamprune.sources import read_video
from tests.device_checks import assert_on, check_device_discipline

MODELS = ["tiny", "tiny-llava-video", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-smolvlm2"]
FRAMES = 4
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def clip(sample_video):
    return read_video(sample_video, num_frames=FRAMES)


@pytest.fixture(scope="module", params=MODELS)
def bf16(request, clip):
    """(adapter in bf16 on the CPU, its prompt for the clip), the prompt made outside any meta context."""
    adapter = load_video_llm(request.param, device="cpu", dtype="bfloat16").adapter
    return adapter, adapter.prepare(clip.frames, "Summarize the video.", clip.timestamps)


def test_prepare_puts_the_processor_output_on_the_model(bf16):
    adapter, prompt = bf16
    assert adapter.device == torch.device("cpu") and adapter.dtype == BF16
    assert_on(prompt, "cpu")
    assert prompt.pixel_values_videos.dtype == BF16
    assert not prompt.input_ids.is_floating_point()


def test_encode_reduce_and_layout_make_no_tensor_without_a_device(bf16):
    adapter, prompt = bf16
    if adapter.model_type in ("qwen2_5_vl", "qwen3_vl"):
        # transformers' own Qwen vision forwards make default-device tensors (Qwen2.5-VL's window index,
        # Qwen3-VL's position-embedding interpolation reads `.tolist()`), so the whole encode cannot run under
        # meta; our parts of it are checked in test_qwen2_5_vl_encode_parts
        encoded = adapter.encode(prompt)
    else:
        encoded = check_device_discipline(lambda: adapter.encode(prompt), "cpu", what="encode")
    assert encoded.features.dtype == BF16 and encoded.attention.dtype == torch.float32
    assert all(side.dtype == BF16 for side in encoded.side_features)

    def reduced() -> LLMInputs:
        tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
        return adapter.reduced_inputs(prompt, tokens, encoded)

    # check_device_discipline reads every field, so the lazy sizes (and the attribution behind them) run
    # under meta too
    inputs = check_device_discipline(reduced, "cpu", what="reduced_inputs")
    assert inputs.inputs_embeds.dtype == BF16 and inputs.sizes.dtype == torch.float32
    assert all(d.dtype == BF16 for d in inputs.deepstack or [])
    assert int(inputs.visual_mask.sum()) < encoded.features.shape[0] * encoded.features.shape[1]  # it reduced


def test_generate_and_forward_make_no_tensor_without_a_device(bf16):
    adapter, prompt = bf16
    encoded = adapter.encode(prompt)
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
    inputs = adapter.reduced_inputs(prompt, tokens, encoded)
    new = check_device_discipline(lambda: adapter.generate(inputs, 3), "cpu", what="generate")
    assert new.shape == (1, 3)
    answer = torch.tensor([[5, 6]])
    logits = check_device_discipline(lambda: adapter.forward(inputs, answer).logits, "cpu", BF16, what="forward")
    assert logits.shape[:2] == (1, inputs.inputs_embeds.shape[1] + 2)
    if inputs.position_ids is not None:  # M-RoPE rows continue by +1 per appended token
        more = check_device_discipline(lambda: inputs.positions_for(2), "cpu", what="positions_for")
        assert torch.equal(more[..., -2:], inputs.position_ids[..., -1:] + torch.tensor([1, 2]))
    text = check_device_discipline(lambda: adapter.text_embeddings("a dog"), "cpu", BF16, what="text_embeddings")
    assert text.shape == (5, inputs.inputs_embeds.shape[-1])


def test_qwen2_5_vl_encode_parts(clip):
    """Qwen2.5-VL's importance (attention received in a full-attention vision block, per frame pair) and the
    window → raster order, under meta: the parts of `encode` that are ours."""
    adapter = load_video_llm("tiny-qwen2.5-vl", device="cpu", dtype="bfloat16").adapter
    prompt = adapter.prepare(clip.frames, "Summarize the video.", clip.timestamps)
    inputs: dict = {}

    def keep(module, args, kwargs):
        inputs.update(hidden=kwargs.get("hidden_states", args[0] if args else None),
                      rope=kwargs["position_embeddings"])

    handle = adapter.importance_block().attn.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model.model.get_video_features(prompt.pixel_values_videos, prompt.extra["video_grid_thw"])
    finally:
        handle.remove()
    t, h, w = prompt.extra["video_grid_thw"][0].tolist()
    attn = adapter.importance_block().attn
    with torch.no_grad():
        received = check_device_discipline(
            lambda: received_attention_grids(inputs["hidden"], attn, inputs["rope"], h * w), "cpu",
            torch.float32, what="received_attention_grids")
    # a distribution over each frame pair's patches, averaged over heads and queries
    torch.testing.assert_close(received.view(t, -1).sum(1), torch.ones(t), atol=1e-5, rtol=0)
    grid_hw = (h // adapter.merge, w // adapter.merge)
    check_device_discipline(lambda: adapter.token_order(grid_hw, torch.device("cpu")), "cpu", what="token_order")


@pytest.mark.parametrize("grid_hw,window", [((8, 6), 4), ((12, 9), 4), ((4, 4), 4), ((3, 10), 2), ((13, 13), 8)])
def test_window_raster_order_is_the_inverse_of_the_models_window_index(grid_hw, window):
    """Our window → raster permutation equals the argsort of transformers' own window index (a method of the
    vision model up to 5.16, `vision_utils.get_vision_window_index` from 5.17), for two grids."""
    merge, patch = 2, 14
    grid = torch.tensor([[2, grid_hw[0] * merge, grid_hw[1] * merge]])
    try:
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, merge, window * merge * patch, patch)
    except ImportError:
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        vision = Qwen2_5_VLConfig(vision_config={"depth": 1, "hidden_size": 8, "num_heads": 1, "out_hidden_size": 8,
                                                 "intermediate_size": 8, "patch_size": patch,
                                                 "spatial_merge_size": merge, "window_size": window * merge * patch,
                                                 "fullatt_block_indexes": [0]}).vision_config
        window_index, _ = Qwen2_5_VisionTransformerPretrainedModel(vision).get_window_index(grid)
    order = window_raster_order(grid_hw, window)
    n = grid_hw[0] * grid_hw[1]
    per_grid = torch.cat([order, order + n])
    assert torch.equal(per_grid, torch.argsort(window_index))
    assert not torch.equal(order, torch.arange(n)) or max(grid_hw) <= window


class _Called:
    def __init__(self, value: torch.Tensor) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.value


def test_llm_inputs_sizes_resolve_once_on_first_read():
    sizes = torch.tensor([[1.0, 3.0, 1.0]])
    make = _Called(sizes)
    visual = torch.tensor([[False, True, False]])
    inputs = LLMInputs(torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.long), visual, make)
    assert make.calls == 0
    assert inputs.sizes is sizes and inputs.sizes is sizes and make.calls == 1
    eager = LLMInputs(torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.long), visual, sizes=sizes)
    assert eager.sizes is sizes
    with pytest.raises(TypeError):
        LLMInputs(torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.long), visual)  # sizes stays required


@pytest.mark.parametrize("inner,reads", [
    (None, False),
    (InnerConfig(proportional=False), False),  # inactive
    (InnerConfig(mode="holitom", ratio=0.5, proportional=False), False),  # merging: a stage either way
    (InnerConfig(mode="holitom", ratio=0.5), False),
    (InnerConfig(), True),  # proportional only: worth it only if some token stands for several
])
def test_needs_stage_reads_sizes_only_for_proportional_attention_alone(inner, reads):
    make = _Called(torch.tensor([[1.0, 2.0]]))
    inputs = LLMInputs(torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.long), torch.tensor([[False, True]]), make)
    needed = VideoLLMAdapter.needs_stage(inputs, inner)
    assert make.calls == int(reads)
    assert needed == (inner is not None and inner.active)


def test_reduced_inputs_leave_the_attribution_to_the_first_read_of_sizes(clip):
    adapter = load_video_llm("tiny", device="cpu", dtype="float32").adapter
    prompt = adapter.prepare(clip.frames, "Summarize the video.", clip.timestamps)
    encoded = adapter.encode(prompt)
    tokens = reduce_tokens("divprune", encoded.features, encoded.attention, encoded.grid_hw, 0.1)
    assert not tokens.attributed  # the method leaves the dropped tokens' attribution open
    inputs = adapter.reduced_inputs(prompt, tokens, encoded)
    assert not tokens.attributed
    assert int(inputs.sizes[inputs.visual_mask].sum()) == FRAMES * adapter.tokens_per_frame + 1  # + the newline
    assert tokens.attributed


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_load_video_llm_dtype(dtype, expected):
    loaded = load_video_llm("tiny", device="cpu", dtype=dtype)
    params = list(loaded.adapter.model.parameters())
    assert {p.dtype for p in params} == {expected} and {p.device.type for p in params} == {"cpu"}
    assert loaded.runtime == resolve_runtime("cpu", dtype)
    assert loaded.runtime.dtype == expected and loaded.adapter.dtype == expected


def test_load_video_llm_takes_a_resolved_runtime():
    runtime = resolve_runtime("cpu", "bfloat16", "eager")
    loaded = load_video_llm("tiny-smolvlm2", device=runtime)
    assert loaded.runtime is runtime and loaded.adapter.dtype == torch.bfloat16
    assert loaded.adapter.model.config._attn_implementation == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_load_video_llm_on_cuda_without_a_gpu_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_video_llm("tiny", device="cuda")
    assert "\n" not in str(err.value) and "--device cuda" in str(err.value)
