"""pi0_pruned on a tiny random-weight pi0 built offline (real lerobot code, 256 image tokens per camera)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: nothing may download

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from lerobot.configs import FeatureType, PolicyFeature  # noqa: E402
from lerobot.policies.common.flow_matching import euler_integrate  # noqa: E402
from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d  # noqa: E402
from lerobot.policies.pi0.configuration_pi0 import PI0Config  # noqa: E402
from lerobot.policies.pi0.modeling_pi0 import PI0Policy  # noqa: E402
from lerobot.policies.pi05.configuration_pi05 import PI05Config  # noqa: E402
from lerobot.policies.pi05.modeling_pi05 import PI05Policy  # noqa: E402

from policies.loading import load_pruned_policy  # noqa: E402
from policies.pi0_pruned import PI0PrunedConfig, PI0PrunedPolicy  # noqa: E402
from policies.pi0_pruned.pruning import gather_rows  # noqa: E402
from policies.pi05_pruned import PI05PrunedConfig, PI05PrunedPolicy  # noqa: E402
from policies.tiny_features import PUSHT_INPUTS  # noqa: E402
from policies.tiny_pi0 import PI0 as PI0_FAMILY  # noqa: E402
from policies.tiny_pi0 import PI05 as PI05_FAMILY  # noqa: E402
from policies.tiny_pi0 import build_tiny_pi0, load_spec, tiny_pi0_patches  # noqa: E402
from streamprune.errors import ConfigError, ModelError  # noqa: E402
from streamprune.reduce.vla import budget  # noqa: E402

WINDOW = 3
TOKENS = 256
TWO_CAMERAS = {
    "observation.images.top": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 96, 96)),
    "observation.images.wrist": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 64, 64)),
    "observation.state": PUSHT_INPUTS["observation.state"],
}


def observation(step: int, cameras: dict[str, PolicyFeature] = PUSHT_INPUTS) -> dict:
    gen = torch.Generator().manual_seed(step)
    obs = {key: torch.rand(feature.shape, generator=gen) for key, feature in cameras.items()}
    obs["task"] = "push the T block onto the target"
    return obs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference():
    """The unmodified PI0Policy and its preprocessor (same seed → same weights as every pruned build)."""
    policy, pre, _ = build_tiny_pi0()
    return policy, pre


@pytest.fixture(scope="module")
def reference05():
    policy, pre, _ = build_tiny_pi0(PI05Policy, PI05Config)
    return policy, pre


FAMILIES = {"pi0": ("reference", PI0PrunedPolicy, PI0PrunedConfig),
            "pi05": ("reference05", PI05PrunedPolicy, PI05PrunedConfig)}
BASES = {"pi0": (PI0Policy, PI0Config, PI0_FAMILY), "pi05": (PI05Policy, PI05Config, PI05_FAMILY)}


def chunk(policy, pre, step: int, seed: int | None = None, cameras=PUSHT_INPUTS) -> torch.Tensor:
    torch.manual_seed(step if seed is None else seed)  # the flow-matching noise
    return policy.predict_action_chunk(pre(observation(step, cameras)))


@contextmanager
def prefix_lengths(policy) -> Iterator[list[int]]:
    """Key lengths seen by each VLM layer in the prefix pass (appended per layer call)."""
    seen: list[int] = []
    layers = policy.model.paligemma_with_expert.paligemma.model.language_model.layers
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out: seen.append(out[1].shape[-1])) for layer in layers]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cut", ["before", "inside"])
def test_retain_one_is_the_unmodified_policy(request, family, cut):
    fixture, policy_cls, config_cls = FAMILIES[family]
    base, pre = request.getfixturevalue(fixture)
    pruned, _, _ = build_tiny_pi0(policy_cls, config_cls, retain=1.0, cut=cut)
    for step in range(WINDOW + 2):  # past the warm-up, where pruning would start
        assert torch.equal(chunk(pruned, pre, step), chunk(base, pre, step))
        assert pruned.tokens_kept == pruned.tokens_total == TOKENS


def run_and_check(policy, pre, step: int, pruning: bool, k: int = 64) -> None:
    """One chunk; the kept grid positions and the prefix length every VLM layer saw."""
    with prefix_lengths(policy) as seen:
        chunk(policy, pre, step)
    kept = policy.last_kept["observation.image"]
    assert policy.tokens_total == TOKENS
    assert policy.tokens_kept == (k if pruning else TOKENS)
    assert kept.shape == (1, k if pruning else TOKENS)
    assert torch.equal(kept, kept.sort(-1).values) and len(kept.unique()) == kept.shape[1]
    assert 0 <= int(kept.min()) and int(kept.max()) < TOKENS
    text = policy.config.tokenizer_max_length
    full, short = TOKENS + text, k + text
    if not pruning:
        assert set(seen) == {full}
    elif policy.config.cut == "before":
        assert set(seen) == {short}
    else:  # layers < K see the full prefix, layers ≥ K the pruned one
        K = policy.config.prune_layer
        assert seen == [full] * K + [short] * (len(seen) - K)


def test_first_window_chunks_unpruned_then_budget_and_reset(reference):
    _, pre = reference
    policy, _, _ = build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, retain=0.25)
    assert policy.config.importance_window == WINDOW
    for _episode in range(2):
        for step in range(WINDOW + 2):
            run_and_check(policy, pre, step, pruning=step >= WINDOW)
        policy.reset()


@pytest.mark.parametrize("family,cut,selection", [("pi0", "inside", "vla_pruner"), ("pi0", "before", "semantic"),
                                                  ("pi0", "before", "random"), ("pi05", "before", "vla_pruner")])
def test_cuts_and_baselines_keep_the_budget(request, family, cut, selection):
    fixture, policy_cls, config_cls = FAMILIES[family]
    _, pre = request.getfixturevalue(fixture)
    policy, _, _ = build_tiny_pi0(policy_cls, config_cls, retain=0.25, cut=cut, selection=selection,
                                  importance_window=1)
    run_and_check(policy, pre, 0, pruning=False)
    run_and_check(policy, pre, 1, pruning=True)


@pytest.mark.parametrize("cut,layer", [("before", 3), ("inside", 2)])
def test_tokens_a_pruned_chunk_did_not_see_keep_their_action_score(reference, cut, layer):
    """Action importance comes from the later half of the expert (layers 2 and 3 of 4). Both see only the kept
    tokens here: the dropped ones keep last chunk's score and the kept ones share their previous total."""
    _, pre = reference
    policy, _, _ = build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, retain=0.25, cut=cut, prune_layer=layer,
                                  importance_window=1)
    chunk(policy, pre, 0)  # warm-up: every token seen
    previous = policy.last_scores()["observation.image"][1][0].clone()
    chunk(policy, pre, 1)
    dropped = torch.ones(TOKENS, dtype=torch.bool)
    dropped[policy.last_kept["observation.image"][0]] = False
    now = policy.last_scores()["observation.image"][1][0]
    assert int(dropped.sum()) == TOKENS - 64 and torch.equal(now[dropped], previous[dropped])
    assert not torch.allclose(now[~dropped], previous[~dropped])
    torch.testing.assert_close(now[~dropped].sum(), previous[~dropped].sum())


def test_two_cameras_each_keep_their_budget():
    policy, pre, _ = build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, input_features=TWO_CAMERAS, retain=0.5,
                                    importance_window=1)
    for step in range(2):
        chunk(policy, pre, step, cameras=TWO_CAMERAS)
    assert set(policy.last_kept) == {"observation.images.top", "observation.images.wrist"}
    assert all(kept.shape == (1, 128) for kept in policy.last_kept.values())
    assert (policy.tokens_kept, policy.tokens_total) == (256, 512)


@pytest.mark.parametrize("family", FAMILIES)
def test_inside_cut_matches_masking_the_full_cache(request, family):
    """Physically dropping at layer K (shorter per-layer caches, re-indexed expert masks) equals the unmodified
    model with the dropped image tokens masked out as keys in VLM and expert layers ≥ K."""
    fixture, policy_cls, config_cls = FAMILIES[family]
    base, pre = request.getfixturevalue(fixture)
    policy, _, _ = build_tiny_pi0(policy_cls, config_cls, retain=0.25, cut="inside", importance_window=1)
    for step in range(2):
        pruned_actions = chunk(policy, pre, step)
    kept = policy.last_kept["observation.image"][0]
    text = policy.config.tokenizer_max_length
    dropped = torch.ones(TOKENS + text, dtype=torch.bool)
    dropped[kept] = False
    dropped[TOKENS:] = False

    def mask_dropped_keys(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()  # [B, 1, Q, keys]; prefix keys come first
        mask[..., : TOKENS + text][..., dropped] = torch.finfo(mask.dtype).min
        return args, {**kwargs, "attention_mask": mask}

    model = base.model.paligemma_with_expert
    K = policy.config.prune_layer
    layers = [*model.paligemma.model.language_model.layers[K:], *model.gemma_expert.model.layers[K:]]
    hooks = [layer.register_forward_pre_hook(mask_dropped_keys, with_kwargs=True) for layer in layers]
    try:
        masked_actions = chunk(base, pre, 1)
    finally:
        for hook in hooks:
            hook.remove()
    assert not torch.allclose(masked_actions, chunk(base, pre, 1), atol=1e-4)  # the masking matters
    torch.testing.assert_close(pruned_actions, masked_actions, atol=1e-5, rtol=1e-4)


def no_cache_chunk(policy, batch: dict, noise: torch.Tensor, keep: torch.Tensor | None, layer_k: int,
                   monkeypatch) -> torch.Tensor:
    """The action chunk recomputed without a KV cache: each Euler step runs prefix and suffix jointly through
    lerobot's own layer function (`compute_layer_complete`, its training path), and from `layer_k` on the prefix
    rows and columns outside `keep` [B, L'] (kept prefix positions; None = keep all) are dropped, with the
    original positions. Shares no code with the pruner's cached path (caches, crops, expert-mask hooks)."""
    model = policy.model
    lerobot_model = next(c for c in type(model).__mro__ if c.__module__.startswith("lerobot."))
    modeling = sys.modules[lerobot_model.__module__]
    vlm_layers = list(model.paligemma_with_expert.paligemma.model.language_model.layers)
    original = modeling.compute_layer_complete

    images, img_masks = policy._preprocess_images(batch)
    tokens, masks = batch["observation.language.tokens"], batch["observation.language.attention_mask"]
    prefix, prefix_pad, prefix_att = lerobot_model.embed_prefix(model, images, img_masks, tokens, masks)
    length = prefix.shape[1]
    with_state = lerobot_model.__name__ == "PI0Pytorch"  # pi05's suffix carries no state token
    state = policy.prepare_state(batch) if with_state else None

    def layer_with_cut(inputs_embeds, attention_mask, position_ids, adarms_cond, layers, rotary_emb):
        if keep is not None and vlm_layers.index(layers[0]) >= layer_k:
            index = torch.cat([keep, torch.arange(length, attention_mask.shape[-1]).expand(keep.shape[0], -1)], 1)
            if inputs_embeds[0].shape[1] == length:  # layer K: drop the prefix rows once
                inputs_embeds = [gather_rows(inputs_embeds[0], keep), inputs_embeds[1]]
            mask = attention_mask.squeeze(1)  # every layer gets the full mask and positions: take ours
            attention_mask = gather_rows(gather_rows(mask, index, 1), index, 2).unsqueeze(1)
            position_ids = position_ids.gather(1, index)
        return original(inputs_embeds, attention_mask, position_ids, adarms_cond, layers, rotary_emb)

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        suffix, suffix_pad, suffix_att, adarms = (model.embed_suffix(state, x_t, t) if with_state
                                                  else model.embed_suffix(x_t, t))
        pad, att = torch.cat([prefix_pad, suffix_pad], 1), torch.cat([prefix_att, suffix_att], 1)
        mask = prepare_attention_masks_4d(make_att_2d_masks(pad, att))
        (_, out), _ = model.paligemma_with_expert.forward(
            attention_mask=mask, position_ids=pad.cumsum(1) - 1, past_key_values=None,
            inputs_embeds=[prefix, suffix], use_cache=False, adarms_cond=[None, adarms])
        return model.action_out_proj(out[:, -policy.config.chunk_size:].float())

    with monkeypatch.context() as patch:
        patch.setattr(modeling, "compute_layer_complete", layer_with_cut)
        actions = euler_integrate(velocity, noise, policy.config.num_inference_steps)
    return actions[:, :, :policy.config.output_features["action"].shape[0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_inside_cut_rollout_matches_no_cache_recomputation(request, family, monkeypatch):
    """A pruned chunk through the per-layer caches (L prefix keys in layers < K, L' in layers ≥ K, every
    denoising step cropping back) equals recomputing prefix + suffix jointly at every step without a cache,
    pruned at layer K with the same kept set. Unpruned, the two paths agree too (the control)."""
    fixture, policy_cls, config_cls = FAMILIES[family]
    base, pre = request.getfixturevalue(fixture)
    policy, _, _ = build_tiny_pi0(policy_cls, config_cls, retain=0.25, cut="inside", importance_window=1)
    config = policy.config
    noise = torch.randn(1, config.chunk_size, config.max_action_dim, generator=torch.Generator().manual_seed(5))
    batch = pre(observation(1))
    chunk(policy, pre, 0)  # the warm-up chunk
    pruned_actions = policy.predict_action_chunk(dict(batch), noise=noise)
    kept = policy.last_kept["observation.image"]  # [1, k] grid positions = prefix positions (one camera first)
    assert kept.shape == (1, budget(TOKENS, 0.25))
    text = torch.arange(TOKENS, TOKENS + config.tokenizer_max_length).expand(1, -1)

    recomputed = no_cache_chunk(policy, dict(batch), noise, torch.cat([kept, text], 1), config.prune_layer,
                                monkeypatch)
    torch.testing.assert_close(pruned_actions, recomputed, atol=1e-5, rtol=1e-4)
    unpruned = base.predict_action_chunk(dict(batch), noise=noise)
    torch.testing.assert_close(no_cache_chunk(base, dict(batch), noise, None, 0, monkeypatch), unpruned,
                               atol=1e-5, rtol=1e-4)
    assert not torch.allclose(pruned_actions, unpruned, atol=1e-3)  # the cut changed the actions


def test_gather_rows_picks_per_batch_rows():
    x = torch.arange(24.0).view(2, 3, 4)
    index = torch.tensor([[2, 0], [1, 1]])
    assert torch.equal(gather_rows(x, index), torch.stack([x[0, [2, 0]], x[1, [1, 1]]]))
    assert torch.equal(gather_rows(x, index[:, :1].expand(2, 2) % 4, 2), torch.stack([x[0][:, [2, 2]], x[1][:, [1, 1]]]))


@pytest.mark.parametrize("overrides", [{"retain": 0.0}, {"retain": 1.5}, {"cut": "middle"},
                                       {"selection": "fastv"}, {"importance_window": 0},
                                       {"importance_decay": 1.2}, {"prune_layer": 0}])
@pytest.mark.parametrize("config_cls", [PI0PrunedConfig, PI05PrunedConfig])
def test_bad_config_is_a_config_error(config_cls, overrides):
    with pytest.raises(ConfigError):
        config_cls(**overrides)


def test_inside_cut_needs_a_layer_inside_the_vlm():
    with pytest.raises(ConfigError, match="prune_layer"):
        build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, cut="inside", prune_layer=4)


@pytest.mark.parametrize("cut", ["before", "inside"])
def test_reconfigured_policy_matches_one_built_that_way(reference, cut):
    """One instance switched between chunks (benchmarks do this at 16 GB a copy) acts as a fresh build."""
    _, pre = reference
    switched, _, _ = build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, retain=1.0, cut="before")
    built, _, _ = build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, retain=0.25, cut=cut, selection="semantic")
    switched.configure_pruning(retain=0.25, cut=cut, selection="semantic")
    switched.reset()
    for step in range(WINDOW + 2):
        assert torch.equal(chunk(switched, pre, step), chunk(built, pre, step))
        assert torch.equal(switched.last_kept["observation.image"], built.last_kept["observation.image"])
    assert switched.tokens_kept == 64


def test_bad_reconfiguration_changes_nothing():
    policy, _, _ = build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, retain=0.5)
    for bad in ({"cut": "inside", "prune_layer": 4}, {"retain": 2.0}, {"window": 3}):
        with pytest.raises(ConfigError):
            policy.configure_pruning(**bad)
    assert (policy.config.retain, policy.config.cut, policy.config.prune_layer) == (0.5, "before", 3)
    assert policy.pruner.options == policy.config.pruning_options()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_unpruned_checkpoint_loads_as_the_pruned_policy(request, family, tmp_path):
    """The path users take with `--policy-path lerobot/pi0_base` or a folder: a plain PI0Policy / PI05Policy
    folder and its processors, loaded by `load_pruned_policy` as the pruned type with the same weights. The
    tiny architecture is not expressible in a PI0Config (module docstring of `policies.tiny_pi0`), so the
    load runs under the tiny build's patches; the loading code is lerobot's own."""
    fixture, pruned_cls, _ = FAMILIES[family]
    base_cls, base_config, modules = BASES[family]
    base, pre = request.getfixturevalue(fixture)
    _, _, post = build_tiny_pi0(base_cls, base_config)
    for part in (base, pre, post):
        part.save_pretrained(tmp_path)
    with tiny_pi0_patches(load_spec(), modules):
        policy, loaded_pre, _ = load_pruned_policy(family, str(tmp_path), {}, retain=1.0, importance_window=1)
    assert type(policy) is pruned_cls and policy.config.type == f"{family}_pruned"
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), base.state_dict().values(), strict=True))
    for step in range(2):  # the second chunk runs past the warm-up, keeping all tokens at retain 1.0
        assert torch.equal(chunk(policy, loaded_pre, step), chunk(base, pre, step))
    policy.configure_pruning(retain=0.25)
    chunk(policy, loaded_pre, 2)
    assert policy.tokens_kept == 64
    with pytest.raises(ModelError, match="not a SmolVLAConfig"):  # a pi0 folder is not a SmolVLA checkpoint
        load_pruned_policy("smolvla", str(tmp_path), {})


# ---------------------------------------------------------------- encoder-side reduction


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_reuse_on_paligemmas_siglip(request, family):
    fixture, policy_cls, config_cls = FAMILIES[family]
    base, pre = request.getfixturevalue(fixture)
    off, _, _ = build_tiny_pi0(policy_cls, config_cls, retain=1.0, encoder="reuse:0")
    assert torch.equal(chunk(off, pre, 0), chunk(base, pre, 0)) and off.encoder_stats is None
    policy, _, _ = build_tiny_pi0(policy_cls, config_cls, retain=1.0, encoder="reuse")
    first = chunk(policy, pre, 0)
    assert policy.encoder_stats.computed_fraction == 1.0
    assert torch.allclose(first, chunk(base, pre, 0), atol=1e-5)
    again = chunk(policy, pre, 0)  # the same observation: nothing recomputed, the same actions
    assert policy.encoder_stats.computed_patches == 0 and torch.equal(again, first)
