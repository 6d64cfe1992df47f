"""SmolVLM2 adapter on the tiny random-weight SmolVLM2: equivalence with the unmodified model, the per-frame
prompt layout after reduction (frames left without tokens lose their whole block), cached generation against
a no-cache recomputation (with and without the inner stage), and the CLI end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from num2words import num2words

from streamprune.encoder import parse_encoder
from streamprune.models import load_video_llm
from streamprune.models.base import raster_order
from streamprune.models.smolvlm2 import SmolVLM2Adapter, pool_patch_scores
from streamprune.reduce import reduce_tokens
from streamprune.reduce.inner_cuts import InnerConfig
from streamprune.sources import read_video
from streamprune.tokens import Fate, VisualTokens
from tests.adapter_checks import assert_cached_equals_nocache
from tests.test_summarize import run_cli

FRAMES = 8
PER_FRAME = 64
NEW_TOKENS = 10
PROMPT = "Summarize the video."
BLOCK = re.compile(r"\nFrame from (\d\d:\d\d):<fake_token_around_image><global-img>((?:<image>)*)"
                   r"<fake_token_around_image>")


@pytest.fixture(scope="module")
def adapter() -> SmolVLM2Adapter:
    loaded = load_video_llm("tiny-smolvlm2")
    assert isinstance(loaded.adapter, SmolVLM2Adapter) and loaded.random_weights
    return loaded.adapter


@pytest.fixture(scope="module")
def clip(sample_video):
    return read_video(sample_video, num_frames=FRAMES)


@pytest.fixture(scope="module")
def prompt(adapter, clip):
    return adapter.prepare(clip.frames, PROMPT, clip.timestamps)


@pytest.fixture(scope="module")
def encoded(adapter, prompt):
    return adapter.encode(prompt, frames_per_batch=3)  # batching must not matter (checked below)


@pytest.fixture(scope="module")
def reference_tokens(adapter, prompt):
    """What the unmodified model generates from the processor's output: its own vision path and merge."""
    with torch.no_grad():
        out = adapter.model.generate(**prompt.model_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, prompt.input_ids.shape[1]:]


def model_embeddings(adapter, prompt) -> torch.Tensor:
    """The unmodified model's own LLM input [1, L, D] for a processor output (its vision path and placeholder merge)."""
    model = adapter.model.model
    with torch.no_grad():
        images = model.get_image_features(prompt.pixel_values_videos, **prompt.extra).pooler_output
        embeds = model.get_input_embeddings()(prompt.input_ids)
        if hasattr(model, "inputs_merger"):  # transformers < 5.2x
            return model.inputs_merger(prompt.input_ids, embeds, images)
        # later releases: the model's placeholder mask and a scatter of the per-batch-row features
        images = torch.cat(images) if isinstance(images, (list, tuple)) else images
        mask = model.get_placeholder_mask(prompt.input_ids, inputs_embeds=embeds, image_features=images)
        return embeds.masked_scatter(mask, images.to(embeds.dtype))


def blocks(adapter, ids: torch.Tensor) -> list[tuple[str, int]]:
    """(MM:SS, number of <image> tokens) per frame block of a prompt, in order."""
    text = adapter.processor.tokenizer.decode(ids, skip_special_tokens=False)
    return [(stamp, len(images) // len("<image>")) for stamp, images in BLOCK.findall(text)]


def mmss(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def test_geometry_and_prompt_layout(adapter, clip, prompt):
    assert adapter.grid_hw == (8, 8) and adapter.tokens_per_frame == PER_FRAME
    assert prompt.pixel_key == "pixel_values" and prompt.pixel_values_videos.shape == (1, FRAMES, 3, 512, 512)
    assert blocks(adapter, prompt.input_ids[0]) == [(mmss(t), PER_FRAME) for t in clip.timestamps]
    text = adapter.processor.tokenizer.decode(prompt.input_ids[0])
    assert f"series of {num2words(FRAMES)} frames from a 0:00:05 [H:MM:SS] video." in text  # 5.24 s, floored


def test_prepare_without_timestamps_assumes_one_fps(adapter, clip):
    ids = adapter.prepare(clip.frames[:3], PROMPT).input_ids[0]
    assert [stamp for stamp, _ in blocks(adapter, ids)] == ["00:00", "00:01", "00:02"]
    with pytest.raises(ValueError, match="timestamps"):
        adapter.prepare(clip.frames[:3], PROMPT, np.array([0.0, 1.0]))


def test_encode_matches_the_model_and_batching_does_not_matter(adapter, prompt, encoded):
    model = adapter.model.model
    with torch.no_grad():
        own = model.get_image_features(prompt.pixel_values_videos, **prompt.extra).pooler_output
    if isinstance(own, (list, tuple)):  # transformers ≥ 5.2x: one [F·N, D] per video
        own = torch.cat(own).view(encoded.features.shape)
    assert encoded.features.shape == (FRAMES, PER_FRAME, adapter.config.text_config.hidden_size)
    assert torch.equal(encoded.features, own)
    one_batch = adapter.encode(prompt, frames_per_batch=FRAMES)
    assert torch.equal(encoded.features, one_batch.features) and torch.equal(encoded.attention, one_batch.attention)
    # summed over each token's 16 patches, the attention received is a distribution over a frame's 64 tokens
    assert encoded.attention.shape == (FRAMES, PER_FRAME) and (encoded.attention > 0).all()
    assert torch.allclose(encoded.attention.sum(1), torch.ones(FRAMES), atol=1e-5)
    assert encoded.encoder.patches == FRAMES * 32 * 32 and encoded.encoder.flops > 0


def test_token_scores_pool_the_4x4_patch_block_the_pixel_shuffle_groups(adapter):
    side = adapter.patch_side  # 32
    rows, cols = torch.tensor([0, 3, 4, 31, 17]), torch.tensor([0, 3, 0, 31, 9])
    scores = torch.zeros(len(rows), side * side)
    scores[torch.arange(len(rows)), rows * side + cols] = 1.0
    pooled = pool_patch_scores(scores, adapter.model.model.connector)
    assert pooled.shape == (len(rows), PER_FRAME)
    assert pooled.argmax(-1).tolist() == ((rows // 4) * 8 + cols // 4).tolist()
    assert torch.equal(pooled.sum(-1), torch.ones(len(rows)))


@pytest.mark.parametrize("method,retain", [("none", 1.0), ("holitom", 1.0), ("none", 0.1)])
def test_reduction_off_generates_exactly_what_the_unmodified_model_does(adapter, prompt, encoded, reference_tokens,
                                                                         method, retain):
    tokens = reduce_tokens(method, encoded.features, encoded.attention, encoded.grid_hw, retain)
    inputs = adapter.reduced_inputs(prompt, tokens)
    assert torch.equal(inputs.inputs_embeds, model_embeddings(adapter, prompt))
    assert inputs.position_ids is None and int(inputs.visual_mask.sum()) == FRAMES * PER_FRAME
    assert adapter.generate(inputs, NEW_TOKENS).tolist() == reference_tokens.tolist()


def test_output_depends_on_the_video(adapter, prompt, encoded, reference_tokens):
    """Guards the equivalence test: a model that ignored its input would pass it trivially."""
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.1)
    inputs = adapter.reduced_inputs(prompt, tokens)
    assert adapter.generate(inputs, NEW_TOKENS).tolist() != reference_tokens.tolist()


def check_layout(adapter, prompt, tokens: VisualTokens, inputs) -> list[int]:
    """Each frame with tokens has one block holding exactly its tokens (in raster order), at its own time;
    frames without tokens have no block; the intro counts the blocks. Returns the kept frames."""
    counts = torch.bincount(tokens.frame, minlength=tokens.num_frames).tolist()
    kept = [t for t, n in enumerate(counts) if n]
    ids = adapter.video_ids(prompt, counts)[0]
    assert blocks(adapter, ids) == [(mmss(prompt.frame_times[t]), counts[t]) for t in kept]
    assert f"series of {num2words(len(kept))} frames" in adapter.processor.tokenizer.decode(ids)
    visual = inputs.visual_mask[0]
    assert torch.equal(visual, ids == adapter.image_token_id)  # only <image> rows are visual
    table = adapter.model.get_input_embeddings().weight
    assert torch.equal(inputs.inputs_embeds[0, ~visual], table[ids[~visual]])  # the rest is that text
    assert int(visual.sum()) == len(tokens)
    assert torch.equal(inputs.inputs_embeds[0, visual], tokens.features[raster_order(tokens)])
    assert inputs.sizes[0, visual].sum() == tokens.num_frames * PER_FRAME and (inputs.sizes[0, ~visual] == 1).all()
    return kept


def test_layout_after_holitom(adapter, prompt, encoded):
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.1)
    inputs = adapter.reduced_inputs(prompt, tokens)
    kept = check_layout(adapter, prompt, tokens, inputs)
    # on this clip every frame keeps some dynamic tokens at 0.1, and then each dropped token is one position less
    assert len(kept) == FRAMES
    assert inputs.inputs_embeds.shape[1] == prompt.input_ids.shape[1] - (FRAMES * PER_FRAME - len(tokens))


def test_still_video_keeps_one_block(adapter, clip):
    """A still video: HoliTom merges everything onto frame 0, so the other seven frames lose their blocks."""
    still = adapter.prepare(np.repeat(clip.frames[3:4], FRAMES, 0), PROMPT, clip.timestamps)
    enc = adapter.encode(still)
    tokens = reduce_tokens("holitom", enc.features, enc.attention, enc.grid_hw, 0.1)
    assert tokens.segments == [(0, FRAMES - 1)]
    assert check_layout(adapter, still, tokens, adapter.reduced_inputs(still, tokens)) == [0]


def drop_frames(encoded, dropped: dict[int, int]) -> VisualTokens:
    """All tokens, except that each frame d in `dropped` is merged whole into frame dropped[d] (as a temporal
    merge of identical frames would: same values, the target's tokens stand for two)."""
    full = VisualTokens.unreduced(encoded.features, encoded.grid_hw)
    t, n = full.origin.shape
    kept = [f for f in range(t) if f not in dropped]
    rows = torch.cat([torch.arange(f * n, (f + 1) * n) for f in kept])
    slot = {f: i for i, f in enumerate(kept)}
    origin = torch.stack([torch.arange(n) + slot[dropped.get(f, f)] * n for f in range(t)])
    fate = full.fate.clone()
    fate[list(dropped)] = Fate.MERGED
    size = torch.ones(len(rows), dtype=torch.long)
    for target in dropped.values():
        size[slot[target] * n:(slot[target] + 1) * n] += 1
    segments = [(f, max([f] + [d for d, target in dropped.items() if target == f])) for f in kept]
    return VisualTokens(full.features[rows], full.frame[rows], full.position[rows], size, origin, fate,
                        full.grid_hw, segments, len(rows))


def test_frames_without_tokens_give_the_processors_prompt_for_the_other_frames(adapter, clip, prompt, encoded):
    """The rule, exactly: dropping frames 2 and 5 gives what the processor writes (and the model embeds) for
    the six other frames alone — the last frame is kept, so the stated duration is the same."""
    tokens = drop_frames(encoded, {2: 1, 5: 4})
    inputs = adapter.reduced_inputs(prompt, tokens)
    assert check_layout(adapter, prompt, tokens, inputs) == [0, 1, 3, 4, 6, 7]
    kept = [0, 1, 3, 4, 6, 7]
    six = adapter.prepare(clip.frames[kept], PROMPT, clip.timestamps[kept])
    assert torch.equal(inputs.inputs_embeds, model_embeddings(adapter, six))
    assert inputs.sizes[0, inputs.visual_mask[0]].tolist() == [1.0] * 64 + [2.0] * 64 + [1.0] * 64 + [2.0] * 64 \
        + [1.0] * 128


def test_reduced_generation_with_cache_equals_nocache_recomputation(adapter, prompt, encoded):
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
    assert assert_cached_equals_nocache(adapter, adapter.reduced_inputs(prompt, tokens)) is None


def test_inner_stage_cached_equals_nocache_recomputation(adapter, prompt, encoded):
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
    inputs = adapter.reduced_inputs(prompt, tokens)
    plain_first = adapter.forward(inputs).logits[:, -1]
    inner = InnerConfig(mode="holitom", ratio=0.5)
    stage = assert_cached_equals_nocache(adapter, inputs, inner)
    assert stage.tokens_after == inputs.inputs_embeds.shape[1] - len(tokens) // 2
    with adapter.inner_stage(inputs, inner):
        assert not torch.allclose(adapter.forward(inputs).logits[:, -1], plain_first)  # the stage acts


def test_encoder_side_reduction_runs_on_the_siglip_tower(adapter, prompt, encoded, clip):
    # merging: the connector gets the unmerged [T, 32², C] grid, so the LLM side is unchanged
    merged = adapter.encode(prompt, encoder=adapter.vision_encoder(parse_encoder("tome:0.5")))
    assert merged.features.shape == encoded.features.shape and merged.attention.shape == encoded.attention.shape
    assert merged.encoder.flops < encoded.encoder.flops
    cosine = torch.nn.functional.cosine_similarity(merged.features, encoded.features, -1).mean()
    assert 0.5 < cosine < 1.0
    # reuse on a still video: only the first frame goes through the tower, and every frame's tokens equal
    # the model's own encoding of that frame
    still = adapter.prepare(np.repeat(clip.frames[:1], 4, axis=0), PROMPT)
    reused = adapter.encode(still, encoder=adapter.vision_encoder(parse_encoder("reuse")))
    assert reused.encoder.computed_patches == 32 * 32 and reused.recomputed[1:].sum() == 0
    plain = adapter.encode(still)
    assert torch.allclose(reused.features, plain.features, atol=1e-4)


def test_cli_json(sample_video):
    res = run_cli("summarize", str(sample_video), "--model", "tiny-smolvlm2", "--frames", "8", "--retain", "0.25",
                  "--max-new-tokens", "3", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    tok = report["tokens"]
    assert report["model"] == "tiny-smolvlm2" and report["random_weights"] and report["frames"] == 8
    assert tok["vision"] == 8 * 64 and tok["kept"] == 128 and tok["llm_input"] == 128  # no layout tokens
    # a frame that loses its block takes its timestamp and wrappers with it, so at least one per dropped token
    assert tok["prompt_unreduced"] - tok["prompt"] >= tok["vision"] - tok["kept"]
    assert report["flops"]["vision"] > 0 and report["generated_tokens"] == 3
    assert isinstance(report["summary"], str)
