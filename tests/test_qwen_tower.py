"""Encoder-side reduction inside the Qwen-VL vision transformers (`streamprune.encoder.qwen_tower`), on the tiny
random-weight Qwen2.5-VL and Qwen3-VL: our loop equals the model's tower with nothing active (features and
DeepStack), the window order and raster mapping are the model's, a still clip computes one temporal patch group,
merged tokens unmerge to their patches, reuse on a real video stays close to a full encode, no tensor is made
without a device, and `--encoder` runs end to end from the CLI."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamprune.encoder import EncoderConfig, parse_encoder
from streamprune.encoder.qwen_tower import (
    QwenVisionEncoder,
    block_inputs,
    group_layout,
    qwen_tower,
    received_per_patch,
    run_blocks,
    window_raster_order,
)
from streamprune.models import load_video_llm
from streamprune.reduce.vit import MERGE_METHODS, TokenState, merge_schedule, unmerge
from streamprune.sources import read_video
from tests.device_checks import bf16_exact, check_device_discipline
from tests.test_summarize import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = 8
MODELS = ["tiny-qwen2.5-vl", "tiny-qwen3-vl"]


@pytest.fixture(scope="module", params=MODELS)
def qwen(request):
    return load_video_llm(request.param).adapter


@pytest.fixture(scope="module")
def clip(sample_video):
    return read_video(sample_video, num_frames=FRAMES)


@pytest.fixture(scope="module")
def prompt(qwen, clip):
    return qwen.prepare(clip.frames, "Summarize the video.", clip.timestamps)


@pytest.fixture(scope="module")
def full(qwen, prompt):
    """The model's own tower (`get_video_features`, through the adapter's plain path)."""
    return qwen.encode(prompt)


def _grid(prompt) -> tuple[int, int, int]:
    return tuple(int(x) for x in prompt.extra["video_grid_thw"][0])


def _group(qwen, prompt, g: int = 0):
    """Tower, layout and block-0 inputs of temporal patch group g."""
    tower = qwen_tower(qwen.model.model.visual)
    _, h, w = _grid(prompt)
    pixels = prompt.pixel_values_videos[g * h * w:(g + 1) * h * w]
    layout = group_layout((h, w), tower.merge, tower.window_units, pixels.device)
    embeddings, cos, sin = block_inputs(tower.visual, pixels, torch.tensor([[1, h, w]]))
    return tower, layout, embeddings, cos, sin


def test_nothing_active_equals_the_models_tower(qwen, prompt, full):
    """Our loop over the blocks, nothing reduced: the model's features exactly (and DeepStack on Qwen3-VL)."""
    encoder = QwenVisionEncoder(qwen_tower(qwen.model.model.visual), EncoderConfig())
    out = encoder.encode(prompt.pixel_values_videos, _grid(prompt))
    assert torch.equal(out.features, full.features)
    taps = getattr(qwen.config.vision_config, "deepstack_visual_indexes", None) or []
    assert len(out.side) == len(full.side_features) == len(taps)
    for ours, model in zip(out.side, full.side_features, strict=True):
        assert torch.equal(ours, model)
    torch.testing.assert_close(out.attention, full.attention, atol=1e-6, rtol=0)
    stats = encoder.take_stats()
    assert stats.computed_patches == stats.patches and stats.flops == stats.flops_full
    # the adapter's estimate counts every window full; ours counts edge windows as they are
    estimate = qwen.tower_stats(len(full.features), stats.patches // len(full.features)).flops_full
    assert stats.flops_full <= estimate and (stats.flops_full == estimate or qwen.model_type == "qwen2_5_vl")


def test_adapter_encode_with_an_encoder_that_changes_nothing_is_the_model(qwen, prompt, full):
    config = replace(parse_encoder("tome"), merge_ratio=1e-9)  # active, but removes no token
    out = qwen.encode(prompt, encoder=qwen.vision_encoder(config))
    assert torch.equal(out.features, full.features) and out.grid_hw == full.grid_hw
    assert all(torch.equal(a, b) for a, b in zip(out.side_features, full.side_features, strict=True))
    assert out.encoder.computed_patches == out.encoder.patches and out.recomputed.all()


def test_window_order_and_raster_mapping_are_the_models(qwen, prompt):
    """Block 0's input is the patch embedding of the processor's rows in our layout's order (Qwen2.5-VL: the
    model's own window index); the merge groups map back to raster order as the adapter's `token_order`."""
    tower, layout, embeddings, _, _ = _group(qwen, prompt)
    _, h, w = _grid(prompt)
    pixels = prompt.pixel_values_videos[:h * w]
    if tower.window_units:  # Qwen2.5-VL: no learned positions, so block 0's input is the patch embedding
        assert torch.equal(embeddings, qwen.model.model.visual.patch_embed(pixels)[layout.source])
    p = h * w
    assert torch.equal(layout.raster.sort().values, torch.arange(p)) and torch.equal(layout.source.sort().values,
                                                                                      torch.arange(p))
    # each patch's merge group, from its raster position, is the group the layout says
    unit = (layout.raster // w // tower.merge) * (w // tower.merge) + (layout.raster % w) // tower.merge
    assert torch.equal(unit, layout.unit_raster.repeat_interleave(tower.merge ** 2))
    order = qwen.token_order(qwen.grid_hw, torch.device("cpu"))
    to_raster = torch.argsort(layout.unit_raster)
    if order is None:
        assert torch.equal(to_raster, torch.arange(len(to_raster)))
    else:
        assert torch.equal(to_raster, order)
        # windows are contiguous runs in the blocks' order, of at most window_units² merge groups
        assert torch.equal(layout.window, layout.window.sort().values)
        assert max(layout.window_sizes) <= (tower.window_units * tower.merge) ** 2


def test_window_raster_order_small_example():
    # a 4×4 token grid in 2×2 windows: window 0 holds raster tokens 0, 1, 4, 5
    order = window_raster_order((4, 4), 2)
    assert order.view(4, 4)[:2, :2].flatten().tolist() == [0, 1, 2, 3]
    assert order.view(4, 4)[2:, 2:].flatten().tolist() == [12, 13, 14, 15]


def test_a_still_clip_computes_only_its_first_temporal_group(qwen, clip):
    still = np.repeat(clip.frames[:1], FRAMES, axis=0)
    prompt = qwen.prepare(still, "Describe.", clip.timestamps)
    t, h, w = _grid(prompt)
    encoder = qwen.vision_encoder(parse_encoder("reuse+tome:0.5"))
    first = qwen.encode(prompt, encoder=encoder)
    stats = first.encoder
    assert stats.computed_patches == h * w and stats.keyframes == 1 and stats.patches == t * h * w
    assert first.recomputed[0].all() and not first.recomputed[1:].any()
    assert all(torch.equal(first.features[g], first.features[0]) for g in range(t))
    # the reference persists across calls (a stream) until reset
    again = qwen.encode(prompt, encoder=encoder)
    assert again.encoder.computed_patches == 0 and torch.equal(again.features, first.features)
    for ours, before in zip(again.side_features, first.side_features, strict=True):
        assert torch.equal(ours, before)
    encoder.reset()
    assert qwen.encode(prompt, encoder=encoder).encoder.computed_patches == h * w


def test_unmerge_restores_the_grid_and_merged_tokens_unmerge_to_their_owners(qwen, prompt):
    tower, layout, embeddings, cos, sin = _group(qwen, prompt)
    p = layout.num_patches
    state, _ = run_blocks(tower, layout, TokenState.start(embeddings[None]), cos, sin)
    assert torch.equal(state.owner[0], torch.arange(p)) and torch.equal(unmerge(state.x, state.owner), state.x)
    schedule = merge_schedule(p, len(tower.blocks), 0.5)
    merged, _ = run_blocks(tower, layout, TokenState.start(embeddings[None]), cos, sin, schedule, MERGE_METHODS["tome"])
    assert merged.num_tokens == p - sum(schedule)
    assert merged.size.sum() == p and torch.equal(torch.bincount(merged.owner[0], minlength=merged.num_tokens).float(),
                                                  merged.size[0])
    patches = unmerge(merged.x, merged.owner)[0]
    assert torch.equal(patches, merged.x[0, merged.owner[0]])
    # a token continues one of its own patches, and (Qwen2.5-VL) ToMe matched only within windows
    assert torch.equal(merged.owner[0][merged.position[0]], torch.arange(merged.num_tokens))
    assert torch.equal(layout.window[merged.position[0]][merged.owner[0]], layout.window)


# measured on bigbuckbunny, 32 frames (16 temporal patch groups), `reuse` (context) at the defaults, mean cosine of
# the LLM tokens to a full encode (transformers 5.25 and 5.5.4 alike): Qwen2.5-VL 0.9996 (94% of the patches
# computed: its 112-px windows mostly see motion), Qwen3-VL 0.9993 (75% computed), DeepStack 0.9991–0.9993
REUSE_COSINE = {"tiny-qwen2.5-vl": 0.999, "tiny-qwen3-vl": 0.998}


def test_reuse_on_a_real_video_stays_close_to_a_full_encode(qwen, sample_video, request):
    clip = read_video(sample_video, num_frames=32)
    prompt = qwen.prepare(clip.frames, "Summarize.", clip.timestamps)
    full = qwen.encode(prompt)
    out = qwen.encode(prompt, encoder=qwen.vision_encoder(parse_encoder("reuse")))
    cosine = F.cosine_similarity(out.features.float(), full.features.float(), dim=-1).mean()
    name = request.node.callspec.params["qwen"]
    assert cosine >= REUSE_COSINE[name], float(cosine)
    assert out.encoder.computed_patches < out.encoder.patches and not out.recomputed.all()
    for ours, model in zip(out.side_features, full.side_features, strict=True):
        assert F.cosine_similarity(ours.float(), model.float(), dim=-1).mean() >= REUSE_COSINE[name]


@pytest.mark.parametrize("spec", ["none", "tome:0.5", "gtp:0.5", "zero-tprune:0.5"])
def test_runner_makes_no_tensor_without_a_device(qwen, prompt, spec):
    """Our functions in bf16 under meta as the default device. Scoped to them: the model's embedding stage
    (`block_inputs`) runs outside, as transformers 5.5's rotary table makes tensors on the default device."""
    _, layout, embeddings, cos, sin = _group(qwen, prompt)
    tower = qwen_tower(copy.deepcopy(qwen.model.model.visual).to(torch.bfloat16))
    x = bf16_exact(embeddings).to(torch.bfloat16)
    config = parse_encoder(spec)
    method = MERGE_METHODS[config.merge] if config.merge else None
    schedule = merge_schedule(layout.num_patches, len(tower.blocks), config.merge_ratio) if method else None

    def run():
        lay = group_layout(layout.grid, tower.merge, tower.window_units, x.device)
        state, record = run_blocks(tower, lay, TokenState.start(x[None]), cos, sin, schedule, method,
                                   record_kv=True, record_attention=True)
        every = torch.arange(lay.num_patches, device=x.device)
        received = received_per_patch(record.attention, record.sizes, record.owner, every, every[:0],
                                      lay.num_patches)
        hidden = unmerge(state.x, state.owner)[0]
        return tower.merger(hidden), tower.deepstack(record.taps) if tower.taps else [], received, record.kv

    features, side, received, kv = check_device_discipline(run, "cpu", what=spec)
    assert features.dtype == torch.bfloat16 and all(s.dtype == torch.bfloat16 for s in side)
    assert received.dtype == torch.float32 and abs(float(received.sum()) - 1) < 1e-3


def test_cli_summarize_runs_encoder_side_reduction_on_qwen(sample_video, qwen, tmp_path):
    name = "tiny-qwen2.5-vl" if qwen.model_type == "qwen2_5_vl" else "tiny-qwen3-vl"
    res = run_cli("summarize", str(sample_video), "--model", name, "--frames", "8", "--encoder", "reuse+tome",
                  "--retain", "0.1", "--max-new-tokens", "1", "--json", "--save-viz", str(tmp_path / "v.png"))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    encoder = report["encoder"]
    assert encoder["spec"] == "reuse:1+tome:0.5" and encoder["flops"] < encoder["flops_full"]
    assert report["flops"]["vision"] < report["flops"]["vision_unreduced"]
    assert (tmp_path / "v_encoder.png").exists()  # recomputed patches drawn on the frame pairs' patch grid
