"""The LLaVA-Video adapter on the tiny random-weight LLaVA-Video (LLaVA-OneVision classes + LLaVA-NeXT's video
keys): detection from config.json, equivalence with an independent LLaVA-Video computation (transformers has
no LLaVA-Video forward), per-row newlines after reduction, cached vs no-cache decoding, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from streamprune import ConfigError
from streamprune.encoder import parse_encoder
from streamprune.engine import StreamEngine
from streamprune.models import adapter_for, load_video_llm
from streamprune.models.llava_onevision import LlavaOnevisionAdapter
from streamprune.models.llava_video import LlavaVideoAdapter
from streamprune.models.tiny import tiny_model_dir
from streamprune.reduce import reduce_tokens
from streamprune.reduce.holitom import default_tau
from streamprune.reduce.inner_cuts import InnerConfig
from streamprune.sources import read_video
from tests.adapter_checks import assert_cached_equals_nocache
from tests.test_summarize import run_cli

FRAMES = 8
NEW_TOKENS = 10
PROMPT = "Summarize the video."


@pytest.fixture(scope="module")
def adapter():
    return load_video_llm("tiny-llava-video").adapter


@pytest.fixture(scope="module")
def clip(sample_video):
    return read_video(sample_video, num_frames=FRAMES)


@pytest.fixture(scope="module")
def prompt_inputs(adapter, clip):
    return adapter.prepare(clip.frames, PROMPT)


@pytest.fixture(scope="module")
def encoded(adapter, prompt_inputs):
    return adapter.encode(prompt_inputs, frames_per_batch=3)  # batching must not matter


def llava_video_reference(adapter, frames, prompt: str, new_tokens: int):
    """Unmodified LLaVA-Video from the model's own modules: SigLIP hidden state at vision_feature_layer →
    projector → avg_pool2d(2) on the 27×27 grid → image_newline after every row → the prompt's placeholders
    (resized to that count) → generate. Returns input_ids [1, L], inputs_embeds [1, L, D] and the new token
    ids [1, new_tokens], on the model's device."""
    model, processor, config = adapter.model, adapter.processor, adapter.model.config
    device = model.device
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    out = processor(text=processor.apply_chat_template(conversation, add_generation_prompt=True),
                    videos=[frames], return_tensors="pt")
    pixels = out["pixel_values_videos"][0].to(device, model.dtype)  # [T, 3, 384, 384]
    side = config.vision_config.image_size // config.vision_config.patch_size
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        projected = model.model.multi_modal_projector(hidden)  # [T, 729, D]
        t, _, d = projected.shape
        grid = projected.view(t, side, side, d).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, kernel_size=2, stride=2).permute(0, 2, 3, 1)  # [T, 13, 13, D]
        newline = model.model.image_newline.view(1, 1, 1, d).expand(t, pooled.shape[1], 1, d)
        video = torch.cat([pooled, newline], 2).reshape(-1, d)  # [T·13·14, D], row by row
        ids = out["input_ids"][0].to(device)
        at = (ids == config.video_token_index).nonzero().squeeze(1)
        ids = torch.cat([ids[: at[0]], torch.full((len(video),), config.video_token_index, device=device),
                         ids[at[-1] + 1 :]])[None]
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == config.video_token_index] = video.to(embeds.dtype)
        new = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False)
    return ids, embeds, new


@pytest.fixture(scope="module")
def reference(adapter, clip):
    return llava_video_reference(adapter, clip.frames, PROMPT, NEW_TOKENS)


def kept_rows(tokens) -> set[tuple[int, int]]:
    """The (frame, grid row) pairs that keep at least one token (13 tokens per row)."""
    return {(f, p // 13) for f, p in zip(tokens.frame.tolist(), tokens.position.tolist(), strict=True)}


@pytest.fixture(scope="module")
def reduced(adapter, encoded):
    return reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.1)


# ---------------------------------------------------------------- detection


def test_config_keys_pick_llava_video_and_survive_save_and_load(adapter, tmp_path):
    assert type(adapter) is LlavaVideoAdapter and adapter.grid_hw == (13, 13) and adapter.tokens_per_frame == 169
    assert type(load_video_llm("tiny").adapter) is LlavaOnevisionAdapter  # no keys: OneVision
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("tiny-llava-video"))
    assert type(config).__name__ == "LlavaOnevisionConfig" and config.mm_spatial_pool_mode == "average"
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert (again.mm_spatial_pool_mode, again.mm_newline_position, again.mm_spatial_pool_stride) == ("average", "grid", 2)
    assert adapter_for(again) is LlavaVideoAdapter
    again.mm_newline_position = "one_token"  # both keys are needed
    assert adapter_for(again) is LlavaOnevisionAdapter


# ---------------------------------------------------------------- equivalence with LLaVA-Video


@pytest.mark.parametrize("method,retain", [("none", 0.1), ("holitom", 1.0)])
def test_reduction_off_generates_what_llava_video_does(adapter, prompt_inputs, encoded, reference, method, retain):
    ref_ids, ref_embeds, ref_new = reference
    assert torch.equal(prompt_inputs.input_ids, ref_ids)  # prepare counts LLaVA-Video's T·182 placeholders
    tokens = reduce_tokens(method, encoded.features, encoded.attention, encoded.grid_hw, retain)
    inputs = adapter.reduced_inputs(prompt_inputs, tokens)
    assert inputs.inputs_embeds.shape[1] == ref_ids.shape[1]
    assert inputs.visual_mask.sum() == FRAMES * 13 * (13 + 1)
    # the same rows in the same places (a token and a newline swapped can still greedy-decode alike)
    assert torch.allclose(inputs.inputs_embeds, ref_embeds, atol=1e-5)
    assert adapter.generate(inputs, NEW_TOKENS).tolist() == ref_new.tolist()


def test_reduced_output_differs_from_unreduced(adapter, prompt_inputs, reduced, reference):
    """Guards the equivalence test: a model that ignored its video would pass it trivially."""
    inputs = adapter.reduced_inputs(prompt_inputs, reduced)
    assert inputs.inputs_embeds.shape[1] < reference[0].shape[1]
    assert adapter.generate(inputs, NEW_TOKENS).tolist() != reference[2].tolist()


def test_encoding_pools_features_and_attention_to_13x13(adapter, prompt_inputs, encoded):
    assert encoded.features.shape == (FRAMES, 169, adapter.config.text_config.hidden_size)
    assert encoded.attention.shape == (FRAMES, 169) and (encoded.attention > 0).all()
    # received attention over 729 patches sums to 1; the 2×2 means over 26×26 of them keep ≈ the mean
    assert torch.allclose(encoded.attention.mean(1), torch.full((FRAMES,), 1 / 729), rtol=0.1)
    # encoder-side path (projector + pooling on the encoder's output): reuse on a still clip computes only the
    # first frame, then copies it; the model's tower gives the same tokens
    still = prompt_inputs.pixel_values_videos[:, :1].expand(-1, 3, -1, -1, -1).contiguous()
    plain = adapter.encode_pixels(still)
    reused = adapter.encode_pixels(still, encoder=adapter.vision_encoder(parse_encoder("reuse")))
    assert reused.features.shape == plain.features.shape and reused.encoder.flops < plain.encoder.flops
    assert torch.allclose(reused.features, plain.features, atol=1e-5)
    assert torch.allclose(reused.attention, plain.attention, atol=1e-6)
    with pytest.raises(ConfigError, match="LLaVA-Video"):
        adapter.encode_tokens(still, adapter.vision_encoder(parse_encoder("tome:0.5")))
    assert StreamEngine(adapter).kv_tokens > 0  # streams too: the prompt prefix is in the cache


# ---------------------------------------------------------------- newlines


def test_one_newline_after_each_kept_row_in_raster_order(adapter, prompt_inputs, reduced):
    tokens, width = reduced, 13
    inputs = adapter.reduced_inputs(prompt_inputs, tokens)
    span = inputs.inputs_embeds[0][inputs.visual_mask[0]]  # the video's rows, in LLM order
    span_sizes = inputs.sizes[0][inputs.visual_mask[0]]
    newline = adapter.model.model.image_newline
    is_newline = (span == newline).all(-1)

    frame, position = tokens.frame.tolist(), tokens.position.tolist()
    pairs = kept_rows(tokens)
    assert int(is_newline.sum()) == len(pairs)
    assert len(pairs) < FRAMES * 13  # some rows lost every token: they must get no newline
    assert len(span) == len(tokens) + len(pairs)

    # expected layout: tokens by (frame, position); a newline right after the last token of each (frame, row)
    expected: list[int | None] = []  # token index, or None for a newline
    by_raster = sorted(range(len(tokens)), key=lambda i: (frame[i], position[i]))
    for k, i in enumerate(by_raster):
        expected.append(i)
        nxt = by_raster[k + 1] if k + 1 < len(by_raster) else None
        if nxt is None or (frame[nxt], position[nxt] // width) != (frame[i], position[i] // width):
            expected.append(None)
    for slot, i in enumerate(expected):
        if i is None:
            assert is_newline[slot] and span_sizes[slot] == 1
        else:
            assert not is_newline[slot]
            assert torch.equal(span[slot], tokens.features[i]) and span_sizes[slot] == tokens.size[i]
    assert span_sizes.sum() == FRAMES * 169 + len(pairs)


# ---------------------------------------------------------------- cached vs no-cache


@pytest.mark.parametrize("inner", [None, InnerConfig(mode="holitom", ratio=0.5)], ids=["outer", "inner-holitom"])
def test_cached_generation_equals_nocache_recomputation(adapter, prompt_inputs, reduced, inner):
    inputs = adapter.reduced_inputs(prompt_inputs, reduced)
    stage = assert_cached_equals_nocache(adapter, inputs, inner)
    if inner is not None:
        assert stage is not None and stage.tokens_after < inputs.inputs_embeds.shape[1]


# ---------------------------------------------------------------- CLI


def test_cli_json_with_tiny_llava_video(sample_video, adapter, encoded):
    res = run_cli("summarize", str(sample_video), "--model", "tiny-llava-video", "--frames", str(FRAMES),
                  "--retain", "0.25", "--max-new-tokens", "3", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    tok = report["tokens"]
    assert tok["vision"] == FRAMES * 169 and isinstance(report["summary"], str) and report["generated_tokens"] == 3
    # the same reduction in process: one newline per (frame, row) it keeps a token in
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25,
                           tau=default_tau(0.25))
    pairs = kept_rows(tokens)
    assert tok["kept"] == len(tokens) and tok["layout"] == len(pairs) > 0
    assert tok["llm_input"] == tok["kept"] + tok["layout"]
    assert tok["prompt_unreduced"] - tok["prompt"] == FRAMES * 182 - tok["llm_input"]
