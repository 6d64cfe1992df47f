"""SmolVLAPrunedPolicy on a tiny offline SmolVLA (real lerobot code, random weights, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lerobot.configs.policies import PreTrainedConfig  # noqa: E402
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot.policies.common.vla_utils import make_att_2d_masks  # noqa: E402
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS  # noqa: E402

from policies.smolvla_pruned import SmolVLAPrunedConfig, SmolVLAPrunedPolicy  # noqa: E402
from policies.tiny_smolvla import build_tiny_smolvla  # noqa: E402
from streamprune.encoder import run_layers, siglip_tower  # noqa: E402
from streamprune.errors import ConfigError, ModelError  # noqa: E402
from streamprune.reduce.vit import TokenState  # noqa: E402

CAMERA = "observation.image"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def baseline():
    """(SmolVLAPolicy, preprocessor) whose weights every pruned policy copies."""
    policy, pre, _ = build_tiny_smolvla()
    return policy, pre


def pruned(baseline, **overrides) -> SmolVLAPrunedPolicy:
    policy, _, _ = build_tiny_smolvla(SmolVLAPrunedPolicy, SmolVLAPrunedConfig, **overrides)
    policy.load_state_dict(baseline[0].state_dict())
    return policy


def observation(pre, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return pre({CAMERA: torch.rand(1, 3, 96, 96, generator=g), "observation.state": torch.rand(1, 2, generator=g),
                "task": ["push the T onto the target"]})


def noise(seed: int) -> torch.Tensor:
    return torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cut", ["before", "inside"])
def test_retain_one_matches_smolvla(baseline, cut):
    base, pre = baseline
    policy = pruned(baseline, retain=1.0, cut=cut, importance_window=1)  # prunes (keeping all) from chunk 2
    for step in range(3):
        batch = observation(pre, step)
        expected = base.predict_action_chunk(dict(batch), noise=noise(step))
        assert torch.equal(policy.predict_action_chunk(dict(batch), noise=noise(step)), expected)
        assert policy.tokens_kept == policy.tokens_total == 64


@pytest.mark.parametrize(("cut", "selection"), [("before", "vla_pruner"), ("inside", "vla_pruner"),
                                                ("inside", "semantic"), ("before", "random")])
def test_budget_warmup_and_reset(baseline, cut, selection):
    base, pre = baseline
    policy = pruned(baseline, retain=0.25, cut=cut, selection=selection, importance_window=2)
    kept_sizes = []
    for step in range(4):
        actions = policy.predict_action_chunk(observation(pre, step), noise=noise(step))
        kept = policy.last_kept[CAMERA]
        kept_sizes.append(kept.shape[1])
        assert kept.shape[0] == 1 and policy.tokens_kept == kept.shape[1] and policy.tokens_total == 64
        assert torch.equal(kept[0], kept[0].unique()) and 0 <= int(kept.min()) and int(kept.max()) < 64
    assert kept_sizes == [64, 64, 16, 16]  # first W=2 chunks unpruned, then exactly the budget
    assert not torch.equal(actions, base.predict_action_chunk(observation(pre, 3), noise=noise(3)))
    policy.reset()
    policy.predict_action_chunk(observation(pre, 0), noise=noise(0))
    assert policy.last_kept[CAMERA].shape[1] == 64  # warm-up restarts with the episode


def test_select_action_loop_prunes_after_warmup(baseline):
    _, pre = baseline
    policy = pruned(baseline, retain=0.5, cut="inside", importance_window=1, n_action_steps=2)
    sizes = []
    for step in range(6):  # one chunk per 2 actions
        assert policy.select_action(observation(pre, step)).shape == (1, 2)
        sizes.append(policy.last_kept[CAMERA].shape[1])
    assert sizes == [64, 64, 32, 32, 32, 32]


@pytest.mark.parametrize("cut", ["before", "inside"])
def test_kept_set_follows_the_observations(baseline, cut):
    """Cut "before" only sees its kept tokens after warm-up; dropped tokens must still be able to come back."""
    _, pre = baseline
    policy = pruned(baseline, retain=0.25, cut=cut, importance_window=1)
    kept = set()
    for step in range(6):
        policy.predict_action_chunk(observation(pre, step), noise=noise(step))
        kept.add(tuple(policy.last_kept[CAMERA][0].tolist()))
    assert len(kept) > 2  # the unpruned first chunk + more than one pruned set


def test_registered_and_round_trips(baseline, tmp_path):
    assert PreTrainedConfig.get_choice_class("smolvla_pruned") is SmolVLAPrunedConfig
    policy = pruned(baseline, retain=0.5, cut="inside", prune_layer=2)
    policy.save_pretrained(tmp_path)
    loaded = SmolVLAPrunedPolicy.from_pretrained(tmp_path)
    assert (loaded.config.type, loaded.config.retain, loaded.config.cut, loaded.config.prune_layer) == \
        ("smolvla_pruned", 0.5, "inside", 2)
    batch = observation(baseline[1], 0)
    assert torch.equal(loaded.predict_action_chunk(dict(batch), noise=noise(0)),
                       policy.predict_action_chunk(dict(batch), noise=noise(0)))


def prefix_inputs(policy, batch):
    images, img_masks = policy.prepare_images(batch)
    return images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK], policy.prepare_state(batch)


@pytest.fixture(scope="module")
def two_cameras():
    """(SmolVLAPolicy, preprocessor, batch) with two cameras and a batch of 2 whose language lengths differ,
    so the prefix has padding between the visual and the state tokens."""
    visual = PolicyFeature(type=FeatureType.VISUAL, shape=(3, 64, 64))
    features = {"observation.images.top": visual, "observation.images.wrist": visual,
                "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(14,))}
    policy, pre, _ = build_tiny_smolvla(input_features=features,
                                        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(14,))})
    g = torch.Generator().manual_seed(3)
    batch = pre({"observation.images.top": torch.rand(2, 3, 64, 64, generator=g),
                 "observation.images.wrist": torch.rand(2, 3, 64, 64, generator=g),
                 "observation.state": torch.rand(2, 14, generator=g), "task": ["push", "insert the peg into the socket"]})
    assert not batch[OBS_LANGUAGE_ATTENTION_MASK].all()
    return policy, pre, batch


@pytest.mark.parametrize("setup", ["pusht", "two_cameras"])
def test_inside_cut_cache_matches_no_cache_recomputation(baseline, two_cameras, setup):
    """One denoising step over the pruned KV cache (full for layers < K, pruned for ≥ K) equals a joint
    prefix+suffix pass without cache that prunes at layer K with the same kept set. The padded two-camera
    batch matters: without padding inside the prefix a wrong cross-attention mask slice goes unnoticed."""
    if setup == "pusht":
        batch, features = observation(baseline[1], 5), {}
    else:
        batch = two_cameras[2]
        features = {"input_features": two_cameras[0].config.input_features,
                    "output_features": two_cameras[0].config.output_features}
        baseline = two_cameras[:2]
    policy = pruned(baseline, retain=0.25, cut="inside", prune_layer=3, importance_window=1, **features)
    for step in range(2):
        policy.predict_action_chunk(dict(batch), noise=noise(step).expand(len(batch["task"]), -1, -1))
    keep, cameras = dict(policy.last_kept), list(policy.last_kept)
    assert all(kept.shape == (len(batch["task"]), 16) for kept in keep.values())
    dropped = 48 * len(cameras)
    model, chunk = policy.model, policy.config.chunk_size
    x_t, t = noise(7).expand(len(batch["task"]), -1, -1), torch.full((len(batch["task"]),), 0.6)

    with policy.pruning(cameras, keep=keep):
        prefix, prefix_pad, prefix_att = model.embed_prefix(*prefix_inputs(policy, batch))
        _, cache = model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(prefix_pad, prefix_att), position_ids=prefix_pad.cumsum(1) - 1,
            past_key_values=None, inputs_embeds=[prefix, None], use_cache=True)
        lengths = [prefix.shape[1]] * 3 + [prefix.shape[1] - dropped]
        assert [layer.keys.shape[2] for layer in cache.layers] == lengths
        cached = model.denoise_step(prefix_pad, cache, x_t, t)
        assert [layer.keys.shape[2] for layer in cache.layers] == lengths
        assert torch.equal(model.denoise_step(prefix_pad, cache, x_t, t), cached)  # cache restored

    with policy.pruning(cameras, keep=keep):
        prefix, prefix_pad, prefix_att = model.embed_prefix(*prefix_inputs(policy, batch))
        suffix, suffix_pad, suffix_att = model.embed_suffix(x_t, t)
        pad, att = torch.cat([prefix_pad, suffix_pad], 1), torch.cat([prefix_att, suffix_att], 1)
        (_, out), _ = model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad, att), position_ids=pad.cumsum(1) - 1, past_key_values=None,
            inputs_embeds=[prefix, suffix], use_cache=False)
        recomputed = model.action_out_proj(out[:, -chunk:].float())
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cut,layer", [("before", 3), ("inside", 2)])
def test_tokens_a_pruned_chunk_did_not_see_keep_their_action_score(baseline, cut, layer):
    """Action importance comes from the later half of the layers (2 and 3 of 4). Both see only the kept tokens
    here: the dropped ones keep last chunk's score and the kept ones share their previous total."""
    pre = baseline[1]
    policy = pruned(baseline, retain=0.25, cut=cut, prune_layer=layer, importance_window=1)
    policy.predict_action_chunk(observation(pre, 0), noise=noise(0))  # warm-up: every token seen
    previous = policy.last_scores()[CAMERA][1][0].clone()
    policy.predict_action_chunk(observation(pre, 1), noise=noise(1))
    dropped = torch.ones(64, dtype=torch.bool)
    dropped[policy.last_kept[CAMERA][0]] = False
    now = policy.last_scores()[CAMERA][1][0]
    assert int(dropped.sum()) == 48 and torch.equal(now[dropped], previous[dropped])
    assert not torch.allclose(now[~dropped], previous[~dropped])
    torch.testing.assert_close(now[~dropped].sum(), previous[~dropped].sum())


@pytest.mark.parametrize("bad", [{"retain": 0.0}, {"retain": 1.5}, {"cut": "after"}, {"prune_layer": 0},
                                 {"prune_layer": 16}, {"importance_window": 0}, {"importance_decay": 1.2},
                                 {"selection": "fastv"}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        SmolVLAPrunedConfig(**bad)


def test_prune_layer_beyond_backbone_is_config_error():
    with pytest.raises(ConfigError):
        build_tiny_smolvla(SmolVLAPrunedPolicy, SmolVLAPrunedConfig, prune_layer=4)  # tiny backbone: 4 layers


def test_reconfigured_policy_matches_one_built_that_way(baseline):
    _, pre = baseline
    switched = pruned(baseline, retain=1.0, cut="before", importance_window=1)
    built = pruned(baseline, retain=0.25, cut="inside", selection="semantic", importance_window=1)
    switched.configure_pruning(retain=0.25, cut="inside", selection="semantic")
    switched.reset()
    for step in range(3):
        batch = observation(pre, step)
        expected = built.predict_action_chunk(dict(batch), noise=noise(step))
        assert torch.equal(switched.predict_action_chunk(dict(batch), noise=noise(step)), expected)
        assert torch.equal(switched.last_kept[CAMERA], built.last_kept[CAMERA])
    with pytest.raises(ConfigError, match="unknown pruning option"):
        switched.configure_pruning(budget=3)
    with pytest.raises(ConfigError):
        switched.configure_pruning(cut="inside", prune_layer=99)
    assert (switched.config.cut, switched.config.prune_layer) == ("inside", 3)


def test_a_saved_unpruned_checkpoint_loads_as_the_pruned_policy(baseline, tmp_path):
    """The path users take with real checkpoints (`--policy-path lerobot/smolvla_base` or a folder): a folder
    saved by plain SmolVLAPolicy and its processors, loaded by `load_pruned_policy`."""
    from policies.loading import load_pruned_policy

    base, pre = baseline
    _, _, post = build_tiny_smolvla()
    for part in (base, pre, post):
        part.save_pretrained(tmp_path)
    features = {**base.config.input_features, **base.config.output_features}
    policy, loaded_pre, _ = load_pruned_policy("smolvla", str(tmp_path), features, retain=1.0, importance_window=1)
    assert type(policy) is SmolVLAPrunedPolicy and policy.config.type == "smolvla_pruned"
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), base.state_dict().values(), strict=True))
    raw = {CAMERA: torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(5)),
           "observation.state": torch.ones(1, 2), "task": ["push the T onto the target"]}
    batch = loaded_pre(dict(raw))
    assert torch.equal(batch["observation.state"], pre(dict(raw))["observation.state"])
    for step in range(2):  # the second chunk runs past the warm-up, keeping all tokens at retain 1.0
        assert torch.equal(policy.predict_action_chunk(dict(batch), noise=noise(step)),
                           base.predict_action_chunk(dict(batch), noise=noise(step)))
    policy.configure_pruning(retain=0.25)
    policy.predict_action_chunk(dict(batch), noise=noise(2))
    assert policy.tokens_kept == 16
    with pytest.raises(ModelError, match="not a PI0Config"):  # a SmolVLA folder is not a pi0 checkpoint
        load_pruned_policy("pi0", str(tmp_path), features)


# ---------------------------------------------------------------- encoder-side reduction


@pytest.mark.parametrize("encoder", ["none", "tome:0", "reuse:0"])
def test_encoder_off_is_the_unmodified_policy(baseline, encoder):
    base, pre = baseline
    policy = pruned(baseline, retain=1.0, encoder=encoder)
    for step in range(2):
        batch = observation(pre, step)
        expected = base.predict_action_chunk(dict(batch), noise=noise(step))
        assert torch.equal(policy.predict_action_chunk(dict(batch), noise=noise(step)), expected)
        assert policy.encoder_stats is None


def test_encoder_reuse_across_control_steps(baseline):
    base, pre = baseline
    policy = pruned(baseline, retain=1.0, encoder="reuse")
    batch = observation(pre, 0)
    first = policy.predict_action_chunk(dict(batch), noise=noise(0))
    assert policy.encoder_stats.computed_fraction == 1.0 and policy.encoder_stats.keyframes == 1
    assert torch.allclose(first, base.predict_action_chunk(dict(batch), noise=noise(0)), atol=1e-5)
    # the same image again: no patch is recomputed and the chunk is the same
    again = policy.predict_action_chunk(dict(batch), noise=noise(0))
    assert policy.encoder_stats.computed_patches == 0 and torch.equal(again, first)
    # a new image: what changed is recomputed; reset forgets the reference
    policy.predict_action_chunk(observation(pre, 1), noise=noise(1))
    assert 0 < policy.encoder_stats.computed_fraction
    policy.reset()
    policy.predict_action_chunk(dict(batch), noise=noise(0))
    assert policy.encoder_stats.computed_fraction == 1.0


def test_encoder_merging_with_pruning_keeps_the_budget(baseline):
    _, pre = baseline
    policy = pruned(baseline, retain=0.25, importance_window=1, encoder="tome:0.5")
    for step in range(3):
        policy.predict_action_chunk(observation(pre, step), noise=noise(step))
        assert policy.encoder_stats.flops < policy.encoder_stats.flops_full
    assert policy.tokens_kept == 16
    policy.configure_pruning(encoder="none")
    policy.predict_action_chunk(observation(pre, 3), noise=noise(3))
    assert policy.encoder_stats is None
    with pytest.raises(ConfigError, match="unknown encoder method"):
        policy.configure_pruning(encoder="nope")
    assert policy.config.encoder == "none"


def test_encoder_runner_without_reduction_is_the_unmodified_smolvla_tower():
    """The encoder-side runner (tests/test_encoder.py) on SmolVLA's SmolVLM vision model."""
    policy, _, _ = build_tiny_smolvla()
    vision = policy.model.vlm_with_expert.get_vlm_model().vision_model
    tower = siglip_tower(vision, -1, final_norm=True)
    images = torch.rand(2, 3, 512, 512) * 2 - 1
    state, _ = run_layers(tower, TokenState.start(tower.embed(images)))
    expected = vision(pixel_values=images).last_hidden_state
    assert torch.allclose(tower.finish(state.x), expected, atol=1e-5)
