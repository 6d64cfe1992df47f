"""Encoder-side reduction keeps its inputs' device and dtype (proved on the CPU with meta as the default device,
see tests/device_checks.py): every `--encoder` mode on a tiny bf16 SigLIP tower, reuse across frames, merged
tokens straight to the LLM, per-stream state for policies, and bf16 against fp32 with nothing reduced."""

from __future__ import annotations

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from streamprune.encoder import StreamSet, VisionEncoder, parse_encoder, run_layers, siglip_tower
from streamprune.encoder.tokens import cell_sources, merged_visual_tokens
from streamprune.encoder.tower import attention_probs
from streamprune.reduce.reuse import reuse_mask
from streamprune.reduce.vit import MERGE_METHODS, TokenState
from tests.device_checks import assert_on, bf16_exact, check_device_discipline

SIDE, PATCH = 112, 14  # an 8×8 patch grid
GRID = (SIDE // PATCH, SIDE // PATCH)
N = GRID[0] * GRID[1]


def _model(dtype: torch.dtype) -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3,
                                image_size=SIDE, patch_size=PATCH, vision_use_head=False)
    return SiglipVisionModel(config).eval().to(dtype)


@pytest.fixture(scope="module")
def tower_bf16():
    return siglip_tower(_model(torch.bfloat16), -1)


@pytest.fixture(scope="module")
def frames():
    """Three frames [3, 3, S, S] in bf16: a keyframe, then one patch changed, then the same again."""
    gen = torch.Generator().manual_seed(1)
    first = torch.rand(3, SIDE, SIDE, generator=gen) * 2 - 1
    changed = first.clone()
    changed[:, 2 * PATCH:3 * PATCH, 5 * PATCH:6 * PATCH] += 0.5  # patch (2, 5)
    return bf16_exact(torch.stack([first, changed, changed])).to(torch.bfloat16)


def _moving(dtype: torch.dtype = torch.bfloat16, count: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return bf16_exact(torch.rand(count, 3, SIDE, SIDE, generator=gen) * 2 - 1).to(dtype)


MERGING = [f"{name}:0.5" for name in sorted(MERGE_METHODS)]
SPECS = ["none", *MERGING, "tome:0.9", "reuse+tome:0.5", "reuse-alone+gtp:0.5"]


@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
@pytest.mark.parametrize("spec", SPECS)
def test_whole_frame_encoding_makes_no_tensor_without_a_device(tower_bf16, spec, schedule):
    config = parse_encoder(spec, schedule=schedule)
    pixels = _moving()

    def encode():
        return VisionEncoder(tower_bf16, config, attention=True, frames_per_batch=2).encode(pixels)

    out = check_device_discipline(encode, "cpu", what=spec)
    assert out.features.shape == (3, N, 32) and out.features.dtype == torch.bfloat16  # the tower's dtype
    assert out.attention.dtype == torch.float32 and torch.allclose(out.attention.sum(-1), torch.ones(3), atol=1e-2)
    assert out.keyframe.all() and out.computed.tolist() == [N] * 3


@pytest.mark.parametrize("spec", ["reuse", "reuse-alone", "reuse+tome:0.5", "reuse-alone+token-transforming:0.5",
                                  "reuse+zero-tprune:0.5"])
def test_reuse_across_frames_makes_no_tensor_without_a_device(tower_bf16, frames, spec):
    """Three frames in sequence through one encoder (its reference lives across them): a keyframe, a frame with
    one changed patch (plus its halo), an unchanged frame."""
    config = parse_encoder(spec, schedule="decreasing")

    def encode_sequence():
        encoder = VisionEncoder(tower_bf16, config, attention=True)
        return [encoder.encode(frames[t:t + 1]) for t in range(3)], vars(encoder.take_stats())

    outputs, stats = check_device_discipline(encode_sequence, "cpu", what=spec)
    assert [o.computed.item() for o in outputs] == [N, 9, 0]
    assert [o.keyframe.item() for o in outputs] == [True, False, False]
    assert all(o.features.dtype == torch.bfloat16 for o in outputs)
    assert torch.equal(outputs[2].features, outputs[1].features)
    assert stats["frames"] == 3 and stats["keyframes"] == 1 and stats["computed_patches"] == N + 9


@pytest.mark.parametrize("spec", ["tome:0.9", "gtp:0.5"])
def test_merged_tokens_to_the_llm_make_no_tensor_without_a_device(tower_bf16, spec):
    pixels = _moving()

    def merged():
        state = VisionEncoder(tower_bf16, parse_encoder(spec), frames_per_batch=2).encode_merged(pixels)
        return state, merged_visual_tokens(state, state.x, GRID, (4, 4))

    state, tokens = check_device_discipline(merged, "cpu", what=spec)
    assert state.x.dtype == tokens.features.dtype == torch.bfloat16 and state.size.dtype == torch.float32
    assert int(tokens.size.sum()) == 3 * 16 and tokens.num_frames == 3
    # each token is the merged token owning its first cell, in frame order
    owner_of_cell = state.owner[tokens.frame, cell_sources(GRID, (4, 4))[tokens.position]]
    assert torch.equal(tokens.features, state.x[tokens.frame, owner_of_cell])
    assert torch.equal(tokens.origin.flatten().unique(), torch.arange(len(tokens)))


@pytest.mark.parametrize("spec", ["reuse", "tome:0.5"])
def test_stream_set_makes_no_tensor_without_a_device(tower_bf16, frames, spec):
    """Two cameras, two batch elements, three control steps; each stream keeps its own reuse state."""
    config = parse_encoder(spec)
    other = _moving(count=2)  # camera 1: the same images every step

    def steps():
        streams = StreamSet(tower_bf16, config)
        out = []
        for step in range(3):
            streams.begin()
            out.append(streams.encode(frames[step:step + 1].expand(2, -1, -1, -1)))  # camera 0
            out.append(streams.encode(other))
        return out, vars(streams.take_stats())

    out, stats = check_device_discipline(steps, "cpu", what=spec)
    assert all(o.shape == (2, N, 32) and o.dtype == torch.bfloat16 for o in out)
    assert stats["frames"] == 12
    if spec == "reuse":  # per stream: step 1 recomputes the changed patch and its halo, the rest is reused
        assert stats["keyframes"] == 4 and stats["computed_patches"] == 4 * N + 2 * 9
    else:
        assert stats["keyframes"] == 12 and stats["computed_patches"] == 12 * N


def test_stream_set_without_reuse_batches_a_camera_like_its_streams_one_by_one():
    tower = siglip_tower(_model(torch.float32), -1)
    images = _moving(torch.float32, 2)
    batched = StreamSet(tower, parse_encoder("tome:0.5")).encode(images)
    single = torch.cat([VisionEncoder(tower, parse_encoder("tome:0.5")).encode(images[b:b + 1]).features
                        for b in range(2)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_bf16_tower_gives_the_fp32_features_within_bf16_rounding():
    full = siglip_tower(_model(torch.float32), -1)
    half = siglip_tower(_model(torch.bfloat16), -1)
    pixels = _moving(torch.float32)
    want = VisionEncoder(full, parse_encoder("none"), attention=True).encode(pixels)
    got = VisionEncoder(half, parse_encoder("none"), attention=True).encode(pixels.to(torch.bfloat16))
    assert_on(want.features, "cpu", torch.float32)
    assert_on(got.features, "cpu", torch.bfloat16)
    scale = want.features.abs().mean()
    torch.testing.assert_close(got.features.float(), want.features, atol=0.05 * scale, rtol=0.05)
    assert torch.nn.functional.cosine_similarity(got.features.float(), want.features, -1).min() > 0.999
    torch.testing.assert_close(got.attention, want.attention, atol=1e-3, rtol=0.05)


def test_runner_keeps_the_tower_dtype_and_scores_in_float32(tower_bf16):
    """Hidden states stay bf16 through merging; the attention handed to methods and recorded is float32; a
    merged state passed in (sizes already above 1) gets proportional attention without being told."""
    x = tower_bf16.embed(_moving())
    state, record = run_layers(tower_bf16, TokenState.start(x), [4, 4, 4], MERGE_METHODS["token-transforming"],
                               record_attention=True)
    assert state.x.dtype == torch.bfloat16 and state.size.dtype == torch.float32
    assert record.attention.dtype == torch.float32 and state.num_tokens == N - 12
    merged = TokenState.start(x)
    merged.size[:, :5] = 3.0
    with_sizes, _ = run_layers(tower_bf16, merged)
    plain, _ = run_layers(tower_bf16, TokenState.start(x))
    assert not torch.equal(with_sizes.x, plain.x)
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    probs = attention_probs(q, q, 0.3, None, per_head=True)
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(-1), torch.ones(1, 2, 5))


def test_siglip_tower_takes_the_vision_model_or_the_transformer_inside_it():
    """transformers ≤ 5.16 keeps the SigLIP modules in `SiglipVisionModel.vision_model`, 5.17+ on the model."""
    model = _model(torch.float32)
    inner = getattr(model, "vision_model", model)
    outer_tower, inner_tower = siglip_tower(model, -1), siglip_tower(inner, -1)
    assert outer_tower.grid == inner_tower.grid == GRID
    assert all(a is b for a, b in zip(outer_tower.layers, inner_tower.layers, strict=True))
    pixels = _moving(torch.float32, 1)
    state, _ = run_layers(outer_tower, TokenState.start(outer_tower.embed(pixels)))
    assert torch.equal(state.x, model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1])


def test_reuse_cap_makes_no_tensor_without_a_device():
    change = torch.tensor([0.0, 3.0, 1.0, 2.0, 9.0, 0.5, 2.0, 1.0, 0.0])

    def capped():
        return reuse_mask(change, (3, 3), threshold=8.0, halo=0, max_fraction=0.5)

    reuse = check_device_discipline(capped, "cpu")
    # 8 candidates (patch 4 changed), capped at round(4.5) = 4: the least changed, ties to the lower index
    assert reuse.nonzero().flatten().tolist() == [0, 2, 5, 8]
