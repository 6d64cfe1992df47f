"""Qwen2.5-VL and Qwen3-VL on their tiny random-weight models: equivalence with the unmodified model, 3-D
M-RoPE positions kept for reduced tokens, DeepStack carried (Qwen3-VL), cached decode equal to a no-cache
recomputation, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamprune.errors import ConfigError
from streamprune.models import load_video_llm
from streamprune.models.qwen2_5_vl import Qwen2_5_VLAdapter
from streamprune.models.qwen3_vl import Qwen3VLAdapter
from streamprune.reduce import reduce_tokens
from streamprune.reduce.inner_cuts import InnerConfig
from streamprune.sources import read_video
from streamprune.tokens import VisualTokens
from tests.adapter_checks import assert_cached_equals_nocache
from tests.test_summarize import run_cli

FRAMES = 8
NEW_TOKENS = 10


ADAPTERS = {"tiny-qwen2.5-vl": Qwen2_5_VLAdapter, "tiny-qwen3-vl": Qwen3VLAdapter}


@pytest.fixture(scope="module", params=list(ADAPTERS))
def qwen(request):
    return load_video_llm(request.param).adapter


@pytest.fixture(scope="module")
def clip(sample_video):
    return read_video(sample_video, num_frames=FRAMES)


@pytest.fixture(scope="module")
def prompt(qwen, clip):
    return qwen.prepare(clip.frames, "Summarize the video.", clip.timestamps)


@pytest.fixture(scope="module")
def encoded(qwen, prompt):
    return qwen.encode(prompt)


@pytest.fixture(scope="module")
def reference(qwen, prompt):
    """The unmodified model: its own processor output, vision path, placeholders and positions."""
    with torch.no_grad():
        out = qwen.model.generate(**prompt.model_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, prompt.input_ids.shape[1]:]


def test_adapter_and_token_grid_come_from_the_checkpoint(qwen, prompt, encoded):
    assert isinstance(qwen, Qwen2_5_VLAdapter) and type(qwen).model_type == qwen.config.model_type
    t, h, w = prompt.extra["video_grid_thw"][0].tolist()
    assert t == FRAMES // 2 and qwen.grid_hw == (h // 2, w // 2)  # 2 frames per grid, 2×2 patches per token
    n = qwen.tokens_per_frame
    assert encoded.features.shape == (t, n, qwen.config.text_config.hidden_size)
    assert int((prompt.input_ids == qwen.video_token_id).sum()) == t * n
    # received attention is a distribution over each frame pair's patches, averaged over 2×2 per token
    assert torch.allclose(encoded.attention.sum(1), torch.full((t,), 0.25), atol=1e-5)


def test_vision_batching_does_not_change_features(qwen, prompt, encoded):
    again = qwen.encode(prompt, frames_per_batch=2)
    assert torch.allclose(again.features, encoded.features, atol=1e-5)
    assert torch.allclose(again.attention, encoded.attention, atol=1e-6)


@pytest.mark.parametrize("method,retain", [("none", 0.1), ("holitom", 1.0)])
def test_reduction_off_generates_exactly_what_the_unmodified_model_does(qwen, prompt, encoded, reference, method,
                                                                         retain):
    tokens = reduce_tokens(method, encoded.features, encoded.attention, encoded.grid_hw, retain)
    inputs = qwen.reduced_inputs(prompt, tokens, encoded)
    assert inputs.position_ids.shape == (4, 1, prompt.input_ids.shape[1])
    assert torch.equal(inputs.position_ids[1:], qwen.full_positions(prompt))
    assert qwen.generate(inputs, NEW_TOKENS).tolist() == reference.tolist()


@pytest.fixture(scope="module")
def reduced(qwen, prompt, encoded):
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
    return tokens, qwen.reduced_inputs(prompt, tokens, encoded)


def test_kept_tokens_keep_their_positions_in_the_unreduced_sequence(qwen, prompt, encoded, reduced):
    tokens, inputs = reduced
    full = qwen.full_positions(prompt)[:, 0]  # [3, L]
    ids = prompt.input_ids[0]
    video = (ids == qwen.video_token_id).nonzero().squeeze(1)  # grid-major placeholders, one run per grid or one
    text = (ids != qwen.video_token_id).nonzero().squeeze(1)
    visual = inputs.visual_mask[0]
    assert int(visual.sum()) == len(tokens) < len(video)
    order = torch.argsort(tokens.frame, stable=True)  # HoliTom's order is already grid by grid
    assert torch.equal(order, torch.arange(len(tokens)))
    source = video[tokens.frame * tokens.tokens_per_frame + tokens.position]
    assert torch.equal(inputs.position_ids[1:, 0, visual], full[:, source])
    # all text (timestamps and wrappers included) keeps its original t/h/w, so decoding continues from the
    # unmodified model's last position + 1 (generate steps every row by one)
    assert torch.equal(inputs.position_ids[1:, 0, ~visual], full[:, text])
    assert torch.equal(inputs.position_ids[1:, 0, -1], full[:, -1])
    # the mask's row is plain 1-D over the shorter sequence
    assert torch.equal(inputs.position_ids[0, 0], torch.arange(inputs.inputs_embeds.shape[1]))


def test_reduced_output_depends_on_positions_and_tokens(qwen, prompt, encoded, reduced, reference):
    """Guards the tests above: a reduction, and the positions, must each change what the model says."""
    tokens, inputs = reduced
    kept_3d = qwen.generate(inputs, NEW_TOKENS)
    assert kept_3d.tolist() != reference.tolist()
    qwen.keep_3d_positions = False
    try:
        naive = qwen.reduced_inputs(prompt, tokens, encoded)
    finally:
        qwen.keep_3d_positions = True
    assert torch.equal(naive.position_ids[1], torch.arange(naive.inputs_embeds.shape[1])[None])
    assert torch.equal(naive.inputs_embeds, inputs.inputs_embeds)
    first_kept = qwen.forward(inputs).logits[0, -1]
    first_naive = qwen.forward(naive).logits[0, -1]
    assert not torch.allclose(first_kept, first_naive, atol=1e-3)


def test_cached_generation_equals_nocache_recomputation(qwen, reduced):
    _, inputs = reduced
    assert assert_cached_equals_nocache(qwen, inputs) is None


def test_inner_stage_on_the_qwen_decoder_cached_equals_nocache(qwen, reduced):
    _, inputs = reduced
    inner = InnerConfig(mode="holitom", ratio=0.5, layer=3)
    plain = qwen.forward(inputs).logits[0, -1]
    stage = assert_cached_equals_nocache(qwen, inputs, inner)
    assert stage.tokens_after == inputs.inputs_embeds.shape[1] - round(0.5 * int(inputs.visual_mask.sum()))
    with qwen.inner_stage(inputs, inner):
        assert not torch.allclose(plain, qwen.forward(inputs).logits[0, -1], atol=1e-3)  # the stage acts


@pytest.mark.parametrize("model", list(ADAPTERS))
def test_cli_summarize_on_qwen(sample_video, tmp_path, model):
    viz = tmp_path / "q.png"
    res = run_cli("summarize", str(sample_video), "--model", model, "--frames", str(FRAMES),
                  "--retain", "0.25", "--max-new-tokens", "3", "--json", "--save-viz", str(viz))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    tok = report["tokens"]
    assert report["frames"] == FRAMES and tok["token_grids"] == FRAMES // 2
    assert tok["vision"] % (FRAMES // 2) == 0 and tok["layout"] == 0  # timestamps and wrappers are text
    assert tok["kept"] == tok["llm_input"] == round(0.25 * tok["vision"])
    assert tok["prompt_unreduced"] - tok["prompt"] == tok["vision"] - tok["kept"]
    assert report["generated_tokens"] == 3 and viz.exists()


@pytest.fixture(scope="module")
def qwen3():
    return load_video_llm("tiny-qwen3-vl").adapter


def test_qwen3_gives_each_frame_pair_its_timestamp_and_keeps_empty_ones(qwen3, clip):
    still = np.repeat(clip.frames[:1], FRAMES, axis=0)  # every later pair merges into the first
    prompt = qwen3.prepare(still, "Summarize the video.", clip.timestamps)
    encoded = qwen3.encode(prompt)
    decode = qwen3.processor.tokenizer.decode
    text = decode(prompt.input_ids[0])
    assert text.count("seconds>") == FRAMES // 2 == text.count("<|vision_start|>")
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.1)
    assert set(tokens.frame.tolist()) == {0}
    inputs = qwen3.reduced_inputs(prompt, tokens, encoded)
    keep, _ = qwen3.layout(prompt, tokens)
    kept = decode(prompt.input_ids[0, keep])
    assert kept.count("seconds>") == FRAMES // 2 and kept.count("<|vision_start|><|vision_end|>") == FRAMES // 2 - 1
    assert int(inputs.visual_mask.sum()) == len(tokens)


def test_qwen3_deepstack_is_carried_with_the_tokens(qwen3, clip):
    prompt = qwen3.prepare(clip.frames, "Summarize the video.", clip.timestamps)
    encoded = qwen3.encode(prompt)
    assert len(encoded.side_features) == 3 and encoded.side_features[0].shape == encoded.features.shape
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
    inputs = qwen3.reduced_inputs(prompt, tokens, encoded)
    assert [d.shape[0] for d in inputs.deepstack] == [len(tokens)] * 3
    # a kept token that stands only for itself carries exactly its own DeepStack features
    alone = (tokens.size == 1).nonzero().squeeze(1)
    j = int(alone[0])
    t, p = int(tokens.frame[j]), int(tokens.position[j])
    assert torch.equal(inputs.deepstack[1][j], encoded.side_features[1][t, p])
    # a merged token carries the mean over what it stands for
    big = int(tokens.size.argmax())
    members = (tokens.origin == big) & (tokens.fate != 2)
    assert torch.allclose(inputs.deepstack[0][big], encoded.side_features[0][members].mean(0), atol=1e-5)
    # DeepStack reaches the decoder: unreduced, our logits equal the model's own (DeepStack included) far
    # more closely than zeroing DeepStack moves them (random DeepStack mergers add little, hence the margin)
    full = qwen3.reduced_inputs(prompt, VisualTokens.unreduced(encoded.features, encoded.grid_hw), encoded)
    ours = qwen3.forward(full).logits[0, -1]
    with torch.no_grad():
        own = qwen3.model(**prompt.model_inputs).logits[0, -1]
    full.deepstack = [torch.zeros_like(d) for d in full.deepstack]
    without = qwen3.forward(full).logits[0, -1]
    assert (ours - own).abs().max() < 1e-5 < 1e-4 < (ours - without).abs().max()
    with pytest.raises(ValueError, match="DeepStack"):
        qwen3.reduced_inputs(prompt, tokens)


def test_qwen3_inner_stage_must_sit_after_deepstack(qwen3, clip):
    prompt = qwen3.prepare(clip.frames, "Summarize the video.", clip.timestamps)
    encoded = qwen3.encode(prompt)
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
    inputs = qwen3.reduced_inputs(prompt, tokens, encoded)
    with pytest.raises(ConfigError, match="at least 3"):
        with qwen3.inner_stage(inputs, InnerConfig(mode="holitom", ratio=0.5, layer=2)):
            pass
