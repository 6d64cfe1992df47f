"""Cuts inside the LLM for the method zoo: several layers (progressive pruning), every criterion, uniform
picks, removing all visual tokens, and DyCoke's decode-time KV pruning — each checked against the unmodified
model (identical when it cuts nothing) and against a no-cache recomputation (cached decoding is right)."""

from __future__ import annotations

import pytest
import torch

from streamprune import ConfigError
from streamprune.models.cache_compat import output_cache
from streamprune.models.inner_stage import InnerStage
from streamprune.reduce.inner import CRITERIA, InnerStep, step_plan, uniform_picks
from streamprune.reduce.inner_cuts import InnerConfig, KVPrune, cut_schedule, validate
from tests.test_inner import batch_inputs, cached_greedy, nocache_logits

# ---------------------------------------------------------------- pure functions


def test_uniform_picks_survive_whatever_their_score():
    visual = torch.zeros(1, 30, dtype=torch.bool)
    visual[0, 5:25] = True
    picks = uniform_picks(visual, 4)
    assert picks[0].nonzero().squeeze(1).tolist() == [5, 11, 18, 24]  # even stride over the 20 visual positions
    scores = torch.arange(30.0)[None]  # later = higher: the picks at 5, 11 would lose on score alone
    plan = step_plan(InnerStep(2, 0.5, "last", "drop", uniform=0.4), torch.randn(1, 30, 8), visual, scores)
    kept_visual = [p for p in plan.keep[0].tolist() if visual[0, p]]
    assert len(kept_visual) == 10 and {5, 11, 18, 24} <= set(kept_visual)
    assert set(kept_visual) - {5, 11, 18, 24} == {17, 19, 20, 21, 22, 23}  # then the top scores


def test_ratio_one_removes_every_visual_token():
    visual = torch.tensor([[False, True, True, True, False]])
    plan = step_plan(InnerStep(2, 1.0, "text", "drop"), torch.randn(1, 5, 4), visual, torch.rand(1, 5))
    assert plan.keep.tolist() == [[0, 4]]


def test_cut_schedule_scales_layers_and_folds_collisions():
    # AIM's 28-layer schedule on a 6-layer decoder: several cuts land on one layer and fold (later share wins)
    cuts = cut_schedule((15, 16, 22), (0.875, 0.75, 0.0), 6, 28)
    assert [k for k, _, _ in cuts] == [3, 5] and cuts[0][1] == pytest.approx(0.25) and cuts[1][1] == 1.0
    kept = 1.0
    for _, ratio, _ in cut_schedule((7, 9, 12), (0.875, 0.625, 0.125), 32, 32):
        kept *= 1 - ratio
    assert kept == pytest.approx(0.125)


def test_schedule_validation():
    assert validate(InnerConfig(steps=(InnerStep(2, 0.5), InnerStep(4, 0.5))), 6) == 2
    for bad in (InnerConfig(steps=(InnerStep(2, 0.5), InnerStep(2, 0.5))),
                InnerConfig(steps=(InnerStep(6, 0.5),)), InnerConfig(steps=(InnerStep(2, 0.5, "nope"),)),
                InnerConfig(steps=(InnerStep(2, 1.5),)), InnerConfig(kv=KVPrune(layer=9)),
                InnerConfig(steps=(InnerStep(2, 0.5),), kv=KVPrune())):
        with pytest.raises(ConfigError):
            validate(bad, 6)


# ---------------------------------------------------------------- on real decoders

SCORED = [c for c in CRITERIA if c != "similarity"]


@pytest.mark.parametrize("criterion", SCORED)
def test_a_schedule_that_cuts_nothing_is_the_unmodified_model(decoder_model, criterion):
    model, decoder = decoder_model
    embeds, mask, visual, sizes = batch_inputs(model, 2)
    ref_tokens, ref_logits = cached_greedy(model, embeds, mask)
    config = InnerConfig(steps=(InnerStep(2, 0.0, criterion), InnerStep(4, 0.0, criterion)), proportional=False)
    stage = InnerStage(decoder, config)
    stage.prepare(visual, sizes)
    with stage.installed():
        tokens, logits = cached_greedy(model, embeds, mask)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("criterion", SCORED)
@pytest.mark.parametrize("proportional", [False, True])
def test_two_cuts_decode_equals_nocache_recomputation(decoder_model, criterion, proportional):
    model, decoder = decoder_model
    embeds, mask, visual, sizes = batch_inputs(model, 2, seed=3)
    _, ref_logits = cached_greedy(model, embeds, mask)
    steps = (InnerStep(2, 0.5, criterion, "merge", uniform=0.25), InnerStep(4, 0.5, criterion, "drop"))
    stage = InnerStage(decoder, InnerConfig(steps=steps, proportional=proportional))
    stage.prepare(visual, sizes)
    with stage.installed():
        tokens, logits = cached_greedy(model, embeds, mask)
        n = embeds.shape[1]
        assert stage.tokens_by_layer(6, n) == [n] * 2 + [n - 20] * 2 + [n - 30] * 2
        stage.freeze = True
        recomputed = nocache_logits(model, embeds, mask, tokens)
    assert torch.allclose(logits, recomputed, atol=5e-4, rtol=1e-4), (logits - recomputed).abs().max()
    assert not torch.allclose(logits[:, 0], ref_logits[:, 0])  # it did act


def test_cache_of_each_layer_holds_the_survivors_of_the_cuts_before_it(decoder_model):
    model, decoder = decoder_model
    embeds, mask, visual, sizes = batch_inputs(model, 1)
    steps = (InnerStep(1, 0.5, "text"), InnerStep(3, 1.0, "received"))
    stage = InnerStage(decoder, InnerConfig(steps=steps, proportional=False))
    stage.prepare(visual, sizes)
    with stage.installed(), torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    n = embeds.shape[1]
    assert [layer.keys.shape[2] for layer in output_cache(out).layers] == [n] + [n - 20] * 2 + [n - 40] * 3


def test_transition_scores_follow_how_much_a_token_changes(decoder_model):
    """TransPrune's TTV: with the instruction's attention flat, the tokens a layer changes most survive."""
    from streamprune.models.inner_stage import transition_variation

    before = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    after = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])  # unchanged, turned 90°, tripled
    ttv = transition_variation(before, after)[0]
    assert ttv[0] == pytest.approx(0.0, abs=1e-6) and ttv[1] == pytest.approx(1.0) and ttv[2] == pytest.approx(2.0)


def test_kv_pruning_keeps_prefill_and_changes_only_decoding(decoder_model):
    model, decoder = decoder_model
    embeds, mask, visual, sizes = batch_inputs(model, 1, seed=4)
    ref_tokens, ref_logits = cached_greedy(model, embeds, mask)
    stage = InnerStage(decoder, InnerConfig(kv=KVPrune(layer=2, ratio=0.0), proportional=False))
    stage.prepare(visual, sizes)
    with stage.installed():
        _, logits = cached_greedy(model, embeds, mask)
    assert torch.allclose(logits, ref_logits, atol=1e-5)  # nothing left out: the unmodified model
    stage = InnerStage(decoder, InnerConfig(kv=KVPrune(layer=2, ratio=0.75, refresh=1.1), proportional=False))
    stage.prepare(visual, sizes)
    with stage.installed():
        _, logits = cached_greedy(model, embeds, mask)
        image_cols = stage._kv_cols[0, : visual.shape[1]] & visual[0]
    assert torch.equal(logits[:, 0], ref_logits[:, 0])  # the prefill's token is untouched
    assert not torch.allclose(logits[:, 1:], ref_logits[:, 1:])  # decoding saw a quarter of the image KV
    assert int(image_cols.sum()) == int(40 * 0.25)


def test_kv_pruning_reuses_the_selection_while_attention_is_stable(decoder_model):
    model, decoder = decoder_model
    embeds, mask, visual, sizes = batch_inputs(model, 1, seed=5)
    stage = InnerStage(decoder, InnerConfig(kv=KVPrune(layer=2, ratio=0.5, refresh=-1.0), proportional=False))
    stage.prepare(visual, sizes)
    picks = []
    original = stage._kv_hook

    def spy(module, args, kwargs):
        original(module, args, kwargs)
        if stage._kv_cols is not None:
            picks.append(stage._kv_cols[0, : visual.shape[1]].clone())

    stage._kv_hook = spy
    with stage.installed():
        cached_greedy(model, embeds, mask)
    assert len(picks) >= 2 and all(torch.equal(p, picks[0]) for p in picks)  # refresh −1: never recomputed
