"""Inner-LLM merging at decoder layer K: plan/merge arithmetic, equivalence at r = 0, and cached decoding
equal to a no-cache recomputation, on Qwen2 (tiny LLaVA-OneVision) and Llama decoders, batch 2 with left
padding included."""

from __future__ import annotations

import pytest
import torch

from streamprune import ConfigError
from streamprune.models.cache_compat import output_cache
from streamprune.models.inner_stage import InnerStage
from streamprune.reduce.inner import MergePlan, apply_plan, bipartite_plan, make_plan, merge_weights
from streamprune.reduce.inner_cuts import InnerConfig, default_layer, validate

# ---------------------------------------------------------------- pure functions


def test_mean_merge_is_size_weighted_and_sizes_add_up():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 6.0], [9.0, 9.0]]])
    sizes = torch.tensor([[1.0, 3.0, 2.0, 1.0]])
    # token 1 and 2 merge into token 0; token 3 is text and survives untouched
    plan = MergePlan(keep=torch.tensor([[0, 3]]), target=torch.tensor([[-1, 0, 0, -1]]))
    out, out_sizes = apply_plan(hidden, plan, sizes, "mean")
    assert torch.allclose(out[0, 0], torch.tensor([(1 * 1 + 3 * 3 + 0 * 2) / 6, (6 * 2) / 6]))
    assert torch.equal(out[0, 1], hidden[0, 3])
    assert out_sizes.tolist() == [[6.0, 1.0]] and out_sizes.sum() == sizes.sum()


def test_pairwise_merge_is_holitoms_running_average_in_index_order():
    hidden = torch.tensor([[[8.0], [4.0], [2.0], [100.0]]])
    plan = MergePlan(keep=torch.tensor([[0, 3]]), target=torch.tensor([[-1, 0, 0, -1]]))
    out, out_sizes = apply_plan(hidden, plan, torch.ones(1, 4), "pairwise")
    running = 8.0
    for j in (4.0, 2.0):  # h[i] ← (h[i] + h[j]) / 2, j ascending
        running = (running + j) / 2
    assert out[0, 0].item() == pytest.approx(running)
    assert out[0, 1].item() == 100.0 and out_sizes.tolist() == [[3.0, 1.0]]
    weights = merge_weights(plan, torch.ones(1, 4), "pairwise")
    assert weights[0, :3].sum().item() == pytest.approx(1.0)


def test_fastv_plan_drops_lowest_attention_visual_tokens_only():
    visual = torch.tensor([[False, True, True, True, True, False]])
    scores = torch.tensor([[0.0, 0.4, 0.1, 0.3, 0.2, 0.0]])
    plan = make_plan("fastv", torch.randn(1, 6, 4), visual, 0.5, scores)
    assert plan.keep.tolist() == [[0, 1, 3, 5]] and (plan.target == -1).all()


def test_holitom_plan_merges_into_most_similar_kept_token():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [5.0, 5.0]]])
    visual = torch.tensor([[True, True, True, True, False]])
    scores = torch.tensor([[0.5, 0.4, 0.05, 0.05, 0.0]])
    plan = make_plan("holitom", hidden, visual, 0.5, scores)
    assert plan.keep.tolist() == [[0, 1, 4]]
    assert plan.target.tolist() == [[-1, -1, 0, 1, -1]]


def test_bipartite_plan_removes_exactly_n_and_points_at_survivors():
    torch.manual_seed(0)
    hidden = torch.randn(2, 30, 8)
    visual = torch.zeros(2, 30, dtype=torch.bool)
    visual[:, 5:25] = True
    for n in (3, 10, 15):  # 15 > |A| = 10 needs a second round
        target = bipartite_plan(hidden, visual, n)
        assert ((target >= 0).sum(1) == n).all()
        merged = target >= 0
        assert not merged[~visual].any()
        survivors = target[merged]
        rows = merged.nonzero()[:, 0]
        assert (target[rows, survivors] == -1).all()  # chains resolved
        assert visual[rows, survivors].all()


def test_validation():
    assert validate(InnerConfig(mode="holitom"), 28) == 18 and default_layer(24) == 15
    assert InnerConfig().proportional and not InnerConfig().merging and InnerConfig(mode="fastv").merging
    for bad in (InnerConfig(mode="holitom", layer=0), InnerConfig(mode="holitom", layer=28),
                InnerConfig(mode="holitom", ratio=1.0), InnerConfig(mode="holitom", ratio=-0.1),
                InnerConfig(mode="nope"), InnerConfig(mode="holitom", merge="max")):
        with pytest.raises(ConfigError):
            validate(bad, 28)


# ---------------------------------------------------------------- on real decoders

STEPS = 6


def batch_inputs(model, batch: int, seed: int = 0):
    """Left-padded batch: rows of different text lengths around a 40-token visual span."""
    gen = torch.Generator().manual_seed(seed)
    width = model.get_input_embeddings().weight.shape[1]
    lengths = [60, 54][:batch]
    total = max(lengths)
    embeds = torch.randn(batch, total, width, generator=gen) * 0.5
    mask = torch.zeros(batch, total, dtype=torch.long)
    visual = torch.zeros(batch, total, dtype=torch.bool)
    sizes = torch.ones(batch, total)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
        start = total - n + 8
        visual[row, start:start + 40] = True
        sizes[row, start:start + 40] = torch.randint(1, 6, (40,), generator=gen).float()
    return embeds, mask, visual, sizes


def cached_greedy(model, embeds, mask):
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, 1)


def nocache_logits(model, embeds, mask, tokens):
    """Recompute every step from scratch with use_cache=False, feeding the cached run's tokens."""
    steps = []
    for t in range(STEPS):
        seq = torch.cat([embeds, model.get_input_embeddings()(tokens[:, :t])], 1)
        m = torch.cat([mask, torch.ones(mask.shape[0], t, dtype=mask.dtype)], 1)
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
        with torch.no_grad():
            steps.append(model(inputs_embeds=seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1])
    return torch.stack(steps, 1)


@pytest.mark.parametrize("batch", [1, 2])
def test_ratio_zero_is_identical_to_the_unmodified_model(decoder_model, batch):
    model, decoder = decoder_model
    embeds, mask, visual, sizes = batch_inputs(model, batch)
    ref_tokens, ref_logits = cached_greedy(model, embeds, mask)
    stage = InnerStage(decoder, InnerConfig(mode="holitom", ratio=0.0, layer=3, proportional=False))
    stage.prepare(visual, sizes)
    with stage.installed():
        tokens, logits = cached_greedy(model, embeds, mask)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


def test_proportional_attention_with_unit_sizes_changes_nothing(decoder_model):
    """log(1) = 0: with no merged token the bias is zero (up to the masked kernel's rounding)."""
    model, decoder = decoder_model
    embeds, mask, visual, _ = batch_inputs(model, 2)
    _, ref_logits = cached_greedy(model, embeds, mask)
    stage = InnerStage(decoder, InnerConfig(mode="none", proportional=True))
    stage.prepare(visual, torch.ones(visual.shape))
    with stage.installed():
        _, logits = cached_greedy(model, embeds, mask)
    assert torch.allclose(logits, ref_logits, atol=1e-4)


@pytest.mark.parametrize("mode", ["holitom", "similarity", "fastv"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_decode_equals_nocache_recomputation(decoder_model, mode, batch):
    model, decoder = decoder_model
    embeds, mask, visual, sizes = batch_inputs(model, batch, seed=1)
    ref_tokens, _ = cached_greedy(model, embeds, mask)
    stage = InnerStage(decoder, InnerConfig(mode=mode, ratio=0.5, layer=3, proportional=False))
    stage.prepare(visual, sizes)
    with stage.installed():
        tokens, logits = cached_greedy(model, embeds, mask)
        assert stage.tokens_after == embeds.shape[1] - 20
        stage.freeze = True  # replay the prefill's plan on every full-sequence forward
        recomputed = nocache_logits(model, embeds, mask, tokens)
    # fp32 rounding differs between the cached and the full-sequence shapes (the unreduced model alone differs
    # by ~3e-5 at logits of ~10, merged rows by up to 2e-4 on an AMD EPYC); a wrong mask or position is ≫ 1e-2
    assert torch.allclose(logits, recomputed, atol=5e-4, rtol=1e-4), (logits - recomputed).abs().max()
    assert torch.equal(logits.argmax(-1), tokens)
    assert not torch.allclose(logits[:, 0], nocache_logits(model, embeds, mask, ref_tokens)[:, 0])  # it did act


def test_proportional_attention_cached_equals_nocache(decoder_model):
    model, decoder = decoder_model
    embeds, mask, visual, sizes = batch_inputs(model, 2, seed=2)
    stage = InnerStage(decoder, InnerConfig(mode="holitom", ratio=0.5, layer=3, proportional=True))
    stage.prepare(visual, sizes)
    with stage.installed():
        tokens, logits = cached_greedy(model, embeds, mask)
        stage.freeze = True
        recomputed = nocache_logits(model, embeds, mask, tokens)
    assert torch.allclose(logits, recomputed, atol=1e-4, rtol=1e-4)


def test_cache_lengths_per_layer(decoder_model):
    model, decoder = decoder_model
    embeds, mask, visual, sizes = batch_inputs(model, 1)
    stage = InnerStage(decoder, InnerConfig(mode="fastv", ratio=0.5, layer=2, proportional=False))
    stage.prepare(visual, sizes)
    with stage.installed(), torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    lengths = [layer.keys.shape[2] for layer in output_cache(out).layers]
    n = embeds.shape[1]
    assert lengths == [n] * 2 + [n - 20] * (len(lengths) - 2)
