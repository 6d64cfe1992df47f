"""Encoder-side reduction on the real towers (tiny random-weight LLaVA-OneVision SigLIP and SmolVLM vision):
equivalence with the unmodified tower, temporal reuse on still and changing videos, merging bookkeeping
back to the patch grid, and the `--encoder` knob in summarize, fidelity and the stream engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamprune import ConfigError
from streamprune.encoder import EncoderConfig, VisionEncoder, parse_encoder, run_layers
from streamprune.encoder.tower import Context, attention_probs
from streamprune.engine import StreamConfig, StreamEngine
from streamprune.models import load_video_llm
from streamprune.reduce.vit import MERGE_METHODS, TokenState
from streamprune.sources import read_video
from tests.test_summarize import run_cli


@pytest.fixture(scope="module")
def adapter():
    return load_video_llm("tiny").adapter


@pytest.fixture(scope="module")
def pixels(adapter, sample_video):
    """12 frames of the sample video as the model's pixel values [T, 3, 384, 384]."""
    return adapter.pixel_values(read_video(sample_video, num_frames=12).frames)[0]


def tower_output(adapter, pixels: torch.Tensor) -> torch.Tensor:
    """The unmodified tower's output as LLaVA-OneVision uses it (hidden_states[vision_feature_layer])."""
    out = adapter.model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[adapter.config.vision_feature_layer]


# ---------------------------------------------------------------- equivalence with the model's tower


def test_runner_without_reduction_is_the_unmodified_siglip_tower(adapter, pixels):
    tower = adapter.tower
    state, _ = run_layers(tower, TokenState.start(tower.embed(pixels[:4])))
    assert torch.equal(state.x, tower_output(adapter, pixels[:4]))


@pytest.mark.parametrize("spec", ["none", "tome:0", "reuse:0", "reuse:0+gtp:0"])
def test_ratio_zero_is_the_unmodified_tower(adapter, pixels, spec):
    config = parse_encoder(spec)
    assert not config.active
    prompt = pixels[None]
    plain = adapter.encode_pixels(prompt)
    encoded = adapter.encode_pixels(prompt, encoder=adapter.vision_encoder(config))
    assert torch.equal(encoded.features, plain.features) and torch.equal(encoded.attention, plain.attention)


def test_proportional_attention_makes_merging_duplicates_exact(adapter, pixels):
    """Two copies of a token weigh like one token of size 2, through every layer."""
    tower = adapter.tower
    x = tower.embed(pixels[:1])[:, :50]
    duplicated = torch.cat([x, x[:, :10]], 1)  # tokens 0..9 twice
    full, _ = run_layers(tower, TokenState.start(duplicated))
    state = TokenState.start(x)
    state.size[:, :10] = 2.0
    merged, _ = run_layers(tower, state)
    assert torch.allclose(merged.x, full.x[:, :50], atol=1e-5)


def test_context_keys_are_attended_like_tokens_of_the_frame(adapter, pixels):
    """Running half the patches with the other half as cached context keys/values gives the same first
    layer output for the computed half as the whole frame (context comes from the same layer input)."""
    tower = adapter.tower
    x = tower.embed(pixels[:1])
    layer = tower.layers[0]
    h = layer.layer_norm1(x)
    attn = layer.self_attn
    k = attn.k_proj(h).view(1, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(1, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    first = type(tower)(tower.embed, tower.layers[:1], None, tower.grid, tower.patch)
    whole, _ = run_layers(first, TokenState.start(x))
    part, _ = run_layers(first, TokenState.start(x[:, :300]), context=Context([k[:, :, 300:]], [v[:, :, 300:]]))
    assert torch.allclose(part.x, whole.x[:, :300], atol=1e-5)


def test_head_mean_attention_equals_the_mean_of_heads():
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 9, 8)
    bias = torch.randn(2, 1, 1, 9)
    heads = attention_probs(q, k, 0.3, bias, per_head=True)
    assert torch.allclose(heads.sum(-1), torch.ones(2, 4, 6))
    assert torch.allclose(attention_probs(q, k, 0.3, bias), heads.mean(1), atol=1e-6)


# ---------------------------------------------------------------- temporal reuse


def test_still_video_encodes_only_the_first_frame(adapter, pixels):
    still = pixels[:1].expand(6, -1, -1, -1).contiguous()
    for spec in ("reuse", "reuse-alone"):
        encoder = adapter.vision_encoder(parse_encoder(spec))
        out = encoder.encode(still)
        n = adapter.tower.num_patches
        assert out.computed.tolist() == [n, 0, 0, 0, 0, 0] and out.keyframe.tolist() == [True] + [False] * 5
        assert all(torch.equal(out.features[t], out.features[0]) for t in range(6))
        assert all(torch.equal(out.attention[t], out.attention[0]) for t in range(6))
        assert torch.equal(out.features[:1], tower_output(adapter, pixels[:1]))  # the keyframe is the full encode
        stats = encoder.take_stats()
        assert stats.computed_patches == n and stats.keyframes == 1 and stats.frames == 6


def test_reuse_recomputes_exactly_the_changed_patches_and_their_halo(adapter, pixels):
    frame = pixels[0].clone()
    moved = frame.clone()
    patch = adapter.tower.patch
    moved[:, 10 * patch:11 * patch, 5 * patch:6 * patch] += 0.5  # one patch (row 10, col 5) brightens
    frames = torch.stack([frame, moved])
    for halo, expected in ((0, 1), (1, 9)):
        encoder = adapter.vision_encoder(parse_encoder("reuse", halo=halo))
        out = encoder.encode(frames)
        assert out.computed.tolist() == [adapter.tower.num_patches, expected]
        unchanged = torch.ones(27, 27, dtype=torch.bool)
        unchanged[10 - halo:11 + halo, 5 - halo:6 + halo] = False
        assert torch.equal(out.features[1][unchanged.flatten()], out.features[0][unchanged.flatten()])
        assert not torch.equal(out.features[1][10 * 27 + 5], out.features[0][10 * 27 + 5])


def test_reuse_state_persists_across_calls_and_resets(adapter, pixels):
    encoder = adapter.vision_encoder(parse_encoder("reuse"))
    encoder.encode(pixels[:1])
    again = encoder.encode(pixels[:1])
    assert again.computed.tolist() == [0]
    encoder.reset()
    assert encoder.encode(pixels[:1]).computed.tolist() == [adapter.tower.num_patches]


def test_a_scene_cut_becomes_a_keyframe(adapter, pixels):
    cut = torch.stack([pixels[0], -pixels[0]])  # every patch changes
    out = adapter.vision_encoder(parse_encoder("reuse")).encode(cut)
    assert out.keyframe.tolist() == [True, True]
    assert torch.equal(out.features, tower_output(adapter, cut))


# ---------------------------------------------------------------- merging inside the tower


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_merging_unmerges_to_the_grid_with_sizes_summing_to_the_patches(adapter, pixels, name):
    tower = adapter.tower
    encoder = VisionEncoder(tower, parse_encoder(f"{name}:0.5"), attention=True)
    state, record = encoder._run(tower.embed(pixels[:3]))
    n = tower.num_patches
    assert state.num_tokens == n - round(0.5 * n)
    assert torch.equal(state.size.sum(1), torch.full((3,), float(n)))
    counts = torch.zeros(3, state.num_tokens).scatter_add_(1, state.owner, torch.ones(3, n))
    assert torch.equal(counts, state.size)  # each token owns as many patches as its size says
    out = encoder.encode(pixels[:3])
    assert out.features.shape == (3, n, tower.width)
    assert torch.allclose(out.attention.sum(-1), torch.ones(3), atol=1e-4)
    assert encoder.stats.flops < encoder.stats.flops_full


def test_tome_runs_in_the_release_order_and_tome_raster_keeps_raster_order(adapter, pixels):
    tower = adapter.tower
    embedded = tower.embed(pixels[:2])
    states = {name: VisionEncoder(tower, parse_encoder(f"{name}:0.5"))._run(embedded)[0]
              for name in ("tome", "tome-raster")}
    raster = states["tome-raster"].position
    assert torch.equal(raster, raster.sort(1).values)  # survivors never move
    assert not torch.equal(states["tome"].position, raster)  # ToMe's order: unmerged A first, then B
    for state in states.values():  # either way each token owns its patches, and its grid position is one of them
        assert torch.equal(state.owner.gather(1, state.position), torch.arange(state.num_tokens).expand(2, -1))
    assert parse_encoder("tome-raster:0.5").name == "tome-raster:0.5"


def test_adapter_encode_with_merging_feeds_the_projector_and_pooling(adapter, pixels):
    encoded = adapter.encode_pixels(pixels[None, :4], encoder=adapter.vision_encoder(parse_encoder("tome:0.5")))
    plain = adapter.encode_pixels(pixels[None, :4])
    assert encoded.features.shape == plain.features.shape == (4, 196, adapter.config.text_config.hidden_size)
    assert encoded.attention.shape == (4, 196)
    assert encoded.encoder.flops < plain.encoder.flops == plain.encoder.flops_full


def test_cell_sources_read_each_pooled_cell_at_its_centre():
    from streamprune.encoder.tokens import cell_sources

    rows = cell_sources((27, 27), (14, 14)).view(14, 14) // 27
    assert rows[:, 0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26]  # bilinear 27 → 14 centres
    assert cell_sources((32, 32), (8, 8)).view(8, 8)[1, 1] == 6 * 32 + 6  # SmolVLM's 4×4 pixel-shuffle blocks


def test_merged_tokens_go_straight_to_the_llm_as_visual_tokens(adapter, pixels):
    encoder = adapter.vision_encoder(parse_encoder("tome:0.9"))
    tokens = adapter.encode_tokens(pixels[None, :3], encoder)
    assert tokens.num_frames == 3 and tokens.tokens_per_frame == 196
    assert int(tokens.size.sum()) == 3 * 196 and len(tokens) < 3 * 196
    assert torch.equal(tokens.origin.flatten().unique(), torch.arange(len(tokens)))  # every token owns a cell
    assert (tokens.fate == 0).sum() == len(tokens)  # one representative cell per token
    prompt = adapter.prepare(np.zeros((3, 384, 384, 3), np.uint8), "What happens?")
    inputs = adapter.reduced_inputs(prompt, tokens)
    assert inputs.visual_mask.sum() == len(tokens) + 1
    assert adapter.generate(inputs, max_new_tokens=2).shape == (1, 2)
    with pytest.raises(ConfigError):
        adapter.encode_tokens(pixels[None, :1], adapter.vision_encoder(parse_encoder("reuse+tome")))


# ---------------------------------------------------------------- the knob


@pytest.mark.parametrize("spec,message", [
    ("foo", "unknown encoder method"), ("tome:1", "must be in [0, 1)"), ("tome+gtp", "at most one merging"),
    ("reuse+reuse-alone", "at most one of reuse"), ("tome:x", "not a number")])
def test_bad_encoder_specs_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_encoder(spec)


def test_spec_parsing_and_defaults():
    config = parse_encoder("reuse+tome", ratio=None, threshold=4, halo=0, schedule="decreasing")
    assert config.reuse.ratio == 1.0 and config.reuse.threshold == 4 and config.reuse.halo == 0
    assert config.merge == "tome" and config.merge_ratio == 0.5 and config.merge_schedule == "decreasing"
    assert config.name == "reuse:1+tome:0.5"
    assert parse_encoder(config.name) == EncoderConfig(reuse=config.reuse.__class__(), merge="tome",
                                                       merge_ratio=0.5)
    assert parse_encoder("reuse-alone:0.7", ratio=0.2).reuse.mode == "alone"


def test_summarize_reports_the_encoder_and_its_flops(sample_video, tmp_path):
    res = run_cli("summarize", str(sample_video), "--frames", "8", "--max-new-tokens", "4", "--json",
                  "--encoder", "reuse+tome:0.5", "--reuse-threshold", "12", "--save-viz", str(tmp_path / "v.png"))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["viz_encoder"] == str(tmp_path / "v_encoder.png") and (tmp_path / "v_encoder.png").stat().st_size
    enc = report["encoder"]
    assert enc["spec"] == "reuse:1+tome:0.5" and enc["reuse"]["threshold"] == 12.0 and enc["frames"] == 8
    assert 0 < enc["computed_patches"] <= enc["patches"] == 8 * 729
    assert report["flops"]["vision"] < report["flops"]["vision_unreduced"]
    assert report["tokens"]["llm_input"] == round(0.1 * 8 * 196) + 1


def test_summarize_bad_encoder_flag_exits_2(sample_video):
    res = run_cli("summarize", str(sample_video), "--encoder", "tome:2")
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr


def test_fidelity_compares_against_the_full_encode(sample_video):
    res = run_cli("fidelity", str(sample_video), "--frames", "6", "--steps", "4", "--retain", "1.0", "--json",
                  "--encoder", "tome:0.5")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert 0.5 < result["vision_feature_cosine"] < 1.0 and result["kl_first_token"] > 0
    res = run_cli("fidelity", str(sample_video), "--frames", "6", "--steps", "4", "--retain", "1.0", "--json",
                  "--encoder", "tome:0")
    result = json.loads(res.stdout)
    assert result["vision_feature_cosine"] == 1.0 and result["kl_first_token"] == 0.0


def test_stream_engine_reuses_patches_across_frames(adapter):
    rng = np.random.default_rng(0)
    background = (rng.random((96, 96, 3)) * 120).astype(np.uint8)
    frames = np.repeat(background[None], 6, 0)
    for i in range(6):
        frames[i, 40:56, 8 * i:8 * i + 16] = 255  # a square moving over a still background
    engine = StreamEngine(adapter, StreamConfig(retain=0.5, lookahead=2, skip_threshold=0.0,
                                                encoder=parse_encoder("reuse")))
    for i, frame in enumerate(frames):
        engine.push(frame, i / 10)
    engine.flush()
    stats = engine.stats()
    assert stats["frames_encoded"] == 6 and stats["patches_total"] == 6 * 729
    assert 729 < stats["patches_computed"] < 2 * 729  # the first frame whole, then only around the square
