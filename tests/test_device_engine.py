"""The streaming engine, the importance state, VLA-Pruner's selection and the fidelity harness keep their
inputs' device and dtype: run on CPU bf16 inputs with meta as the default device they give exactly what a normal
run gives (see tests/device_checks.py), so no tensor is made without a device."""

from __future__ import annotations

import pytest
import torch

from streamprune.engine import StreamConfig, StreamEngine
from streamprune.fidelity import compare, proxy_metrics
from streamprune.importance import ImportanceState, carry_over
from streamprune.models import load_video_llm
from streamprune.reduce.vla import dual_level_select, max_min_diversity, select_tokens
from tests.device_checks import (
    assert_on,
    assert_same,
    bf16_exact,
    check_device_discipline,
    meta_default_device,
)
from tests.test_engine import moving_box


def twice(fn):
    """fn() normally and with meta as the default device: (normal, meta) outputs."""
    expected = fn()
    with meta_default_device():
        got = fn()
    return expected, got


# ---------------------------------------------------------------- streaming engine


@pytest.fixture(scope="module")
def bf16_adapter():
    return load_video_llm("tiny", device="cpu", dtype="bfloat16").adapter


def engine_run(adapter, budget: int | None) -> dict:
    """A short stream with a question in the middle (it feeds the importance that protects positions) and a
    cache budget small enough to merge and evict segments."""
    engine = StreamEngine(adapter, StreamConfig(retain=0.25, lookahead=2, max_segment=3, importance_window=1,
                                                max_context_tokens=budget))
    frames = moving_box(9, size=48)
    records = []
    for i, image in enumerate(frames[:5]):
        records += engine.push(image, i / 10)
    first = engine.ask("What moves?", max_new_tokens=3)
    for i, image in enumerate(frames[5:], start=5):
        records += engine.push(image, i / 10)
    engine.push(frames[-1], 1.0)  # a repeat: skipped
    records += engine.flush()
    second = engine.ask("What moved?", max_new_tokens=3)
    return {"host": ([r.to_dict() for r in records], first, second, engine.last_answer_ids, engine.evicted,
                     {k: v for k, v in engine.stats().items() if k not in ("fps", "ms_per_frame")}),
            "values": (engine.entry_embed, engine.cache.layers[0].keys, engine.cache.layers[-1].values),
            "bookkeeping": (engine.entry_segment, engine.entry_frame, engine.entry_pos),
            "scores": (engine.entry_size, engine.importance.value()),
            "view": engine.last_view[1]}


@pytest.mark.parametrize("budget", [None, 300])
def test_engine_push_and_ask_make_no_tensor_without_a_device(bf16_adapter, budget):
    expected, got = twice(lambda: engine_run(bf16_adapter, budget))
    assert expected["host"] == got["host"]
    assert_on(got["values"], "cpu", torch.bfloat16)
    assert_on(got["bookkeeping"], "cpu")
    assert_on(got["scores"], "cpu", torch.float32)
    for key in ("values", "bookkeeping", "scores"):
        assert_same(expected[key], got[key], what=key)
    assert (expected["view"] == got["view"]).all()
    if budget is not None:  # the budget path ran: merged, then evicted
        assert expected["host"][5]["merged_kv_tokens"] > 0 and expected["host"][4]


# ---------------------------------------------------------------- importance


def test_importance_state_follows_the_scores_device_and_smooths_in_fp32():
    gen = torch.Generator().manual_seed(0)
    steps = [bf16_exact(torch.rand(2, 16, generator=gen)) for _ in range(4)]
    observed = [torch.rand(2, 16, generator=gen) > 0.3 for _ in range(4)]

    def run(dtype: torch.dtype):
        state = ImportanceState(16, window=3, decay=0.8)
        empty = state.top(4)
        for s, o in zip(steps, observed, strict=True):
            state.update(s.to(dtype), observed=o)
        ema = ImportanceState(16, mode="ema")
        ema.update(steps[0].to(dtype))
        return empty, state.value(), state.latest(), state.weights(), state.top(4), ema.value()

    half = check_device_discipline(lambda: run(torch.bfloat16), "cpu")
    assert_on(half[1:4], "cpu", torch.float32)
    assert_same(half, run(torch.float32))  # bf16-exact scores: the fp32 run's state exactly


def test_carry_over_without_host_sync_matches_both_cases():
    previous = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    scores = torch.tensor([[0.2, 0.5, 0.6, 0.7]])
    everything = torch.ones(1, 4, dtype=torch.bool)
    some = torch.tensor([[True, False, True, False]])
    assert torch.equal(carry_over(scores, everything, previous), scores)  # fully observed: taken as it is
    torch.testing.assert_close(carry_over(scores, some, previous), torch.tensor([[0.15, 0.3, 0.45, 0.1]]))


# ---------------------------------------------------------------- VLA-Pruner selection


def vla_inputs(dtype: torch.dtype, batch: int = 3, m: int = 64, d: int = 24):
    gen = torch.Generator().manual_seed(1)
    features = bf16_exact(torch.randn(batch, m, d, generator=gen)).to(dtype)
    semantic, action = torch.rand(batch, m, generator=gen), torch.rand(batch, m, generator=gen)
    return features, semantic, action


@pytest.mark.parametrize("selection", ["vla_pruner", "semantic", "action", "random"])
def test_batched_selection_makes_no_tensor_without_a_device(selection):
    half = vla_inputs(torch.bfloat16)

    def run():
        return select_tokens(selection, *half, 16, torch.Generator(device="cpu").manual_seed(0))

    kept = check_device_discipline(run, "cpu", what=selection)
    assert kept.shape == (3, 16) and torch.equal(kept, kept.sort(-1).values)
    features, semantic, action = vla_inputs(torch.float32)
    assert torch.equal(kept, select_tokens(selection, features, semantic, action, 16,
                                           torch.Generator().manual_seed(0)))  # bf16 selects what fp32 selects
    generator = torch.Generator().manual_seed(0)
    for b in range(3):  # each image of the batch as selected alone (random: draws in batch order)
        alone = select_tokens(selection, features[b], semantic[b], action[b], 16, generator)
        assert torch.equal(kept[b], alone), b


def test_diversity_ties_go_to_the_lower_index():
    # mirror images: 0 and 1 are equally isolated (from 3 and 2), an exact tie
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.72], [0.72, 0.7]])
    assert max_min_diversity(features, 1).tolist() == [0]
    assert max_min_diversity(features.flip(0), 1).tolist() == [2]
    assert sorted(max_min_diversity(features, 3).tolist()) == [0, 1, 2]
    union_of_k = dual_level_select(features, torch.tensor([4.0, 3, 2, 1]), torch.tensor([4.0, 3, 1, 2]), 2)
    assert union_of_k.tolist() == [0, 1]  # the union fits the budget: kept whole


# ---------------------------------------------------------------- fidelity


def test_proxy_metrics_make_no_tensor_without_a_device():
    gen = torch.Generator().manual_seed(2)
    ref_logp = torch.randn(4, 50, generator=gen).log_softmax(-1)
    red_logp = torch.randn(4, 50, generator=gen).log_softmax(-1)
    answer = ref_logp.argmax(-1)[None]
    free = answer[:, :2]  # a free answer that stopped after two (matching) tokens
    hidden = bf16_exact(torch.randn(2, 32, generator=gen)).to(torch.bfloat16)

    def run():
        return proxy_metrics(ref_logp, red_logp, answer, free, hidden[0], hidden[1], steps=4)

    expected, got = twice(run)
    assert expected == got and all(isinstance(v, float) for v in got.values())
    assert got["teacher_forced_agreement"] < 1 and got["greedy_agreement"] == 0.5


def test_fidelity_compare_on_bf16_model(bf16_adapter, sample_video):
    from streamprune.sources import read_video

    clip = read_video(sample_video, num_frames=2)
    prompt = bf16_adapter.prepare(clip.frames, "Summarize.")
    encoded = bf16_adapter.encode(prompt)
    expected, got = twice(lambda: compare(bf16_adapter, prompt, encoded, "holitom", 0.25, steps=2).to_dict())
    assert expected == got and expected["llm_input_tokens"] < expected["llm_input_tokens_unreduced"]
