"""ImportanceState on hand-made sequences of attention vectors: weights, window, EMA, reset, warm-up."""

import pytest
import torch

from streamprune import ConfigError
from streamprune.importance import ImportanceState, carry_over


def test_window_weights_newest_step_weighs_most():
    state = ImportanceState(3, window=3, decay=0.8)
    steps = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])]
    for s in steps:
        state.update(s)
    total = 0.64 + 0.8 + 1.0
    assert torch.allclose(state.weights(), torch.tensor([0.64, 0.8, 1.0]) / total)
    assert torch.allclose(state.value(), torch.tensor([0.64, 0.8, 1.0]) / total)
    assert state.top(1).tolist() == [2]  # the newest step's favourite


def test_window_forgets_steps_older_than_w():
    state = ImportanceState(2, window=2, decay=0.5)
    for s in ([10.0, 0.0], [0.0, 1.0], [1.0, 0.0]):
        state.update(torch.tensor(s))
    # only the last two steps: 0.5·[0,1] + 1·[1,0], normalised by 1.5
    assert torch.allclose(state.value(), torch.tensor([1.0, 0.5]) / 1.5)


def test_ema_mode():
    state = ImportanceState(2, mode="ema", decay=0.8)
    state.update(torch.tensor([1.0, 0.0]))
    state.update(torch.tensor([0.0, 1.0]))
    assert torch.allclose(state.value(), torch.tensor([0.8, 0.2]))


def test_warmup_and_reset():
    state = ImportanceState(4, window=3)
    assert state.value() is None and not state.ready and state.top(2).numel() == 0
    for step in range(3):
        assert state.ready is (step >= 3)
        state.update(torch.rand(4))
    assert state.ready and state.steps == 3
    state.reset()
    assert state.value() is None and not state.ready and state.steps == 0


def test_bad_arguments():
    with pytest.raises(ConfigError):
        ImportanceState(4, mode="mean")
    with pytest.raises(ConfigError):
        ImportanceState(4, window=0)
    with pytest.raises(ConfigError):
        ImportanceState(4, decay=1.5)
    with pytest.raises(ValueError):
        ImportanceState(4).update(torch.rand(5))


def test_carry_over_keeps_unseen_scores_and_rescales_seen_ones():
    previous = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    observed = torch.tensor([[True, False, True, False]])
    scores = torch.tensor([[0.2, float("nan"), 0.6, float("nan")]])  # attention over fewer keys: larger per key
    torch.testing.assert_close(carry_over(scores, observed, previous), torch.tensor([[0.15, 0.3, 0.45, 0.1]]))
    torch.testing.assert_close(carry_over(scores, observed, None), torch.tensor([[0.2, 0.0, 0.6, 0.0]]))


def test_partly_observed_steps_and_batched_histories():
    state = ImportanceState(4, window=2, decay=0.5)
    state.update(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))  # [B=2, N=4]: one history per row
    state.update(torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]]),
                 observed=torch.tensor([[True, False, True, False], [False, True, False, False]]))
    assert torch.allclose(state.latest(), torch.tensor([[0.3, 0.3, 0.3, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    assert torch.allclose(state.value(), (0.5 * torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
                                          + state.latest()) / 1.5)
    with pytest.raises(ValueError, match="reset first"):
        state.update(torch.ones(4))
    state.reset()
    state.update(torch.ones(4))
    assert state.value().shape == (4,)
