"""Every method's cut before the LLM keeps its input's device and dtype (proved on the CPU with meta as the
default device, see tests/device_checks.py), and bf16 inputs give the fp32 selection within bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from streamprune.reduce import METHODS, reduce_tokens
from streamprune.tokens import VisualTokens
from tests.device_checks import assert_on, bf16_exact, check_device_discipline

PRE_LLM_METHODS = sorted(name for name, m in METHODS.items() if m.reduce is not None)
T, GRID, D = 6, (14, 14), 48


def _inputs(dtype: torch.dtype, seed: int = 0):
    """A short video with static stretches (so temporal methods merge), values exact in bf16."""
    gen = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    base = torch.randn(2, n, D, generator=gen)
    frames = torch.stack([base[0]] * 3 + [base[1]] * 3) + 0.05 * torch.randn(T, n, D, generator=gen)
    frames[:, : n // 3] = base[0, : n // 3] + 0.01 * torch.randn(T, n // 3, D, generator=gen)  # a static region
    attention = torch.rand(T, n, generator=gen).softmax(-1)
    text = torch.randn(5, D, generator=gen)
    return bf16_exact(frames).to(dtype), bf16_exact(attention), bf16_exact(text).to(dtype)


def _reduce(name: str, retain: float, dtype: torch.dtype) -> VisualTokens:
    features, attention, text = _inputs(dtype)
    return reduce_tokens(name, features, attention, GRID, retain, text=text)


def _reduction(name: str, retain: float, dtype: torch.dtype):
    """The reduction as a closure over inputs made here, on the CPU (outside any meta context)."""
    features, attention, text = _inputs(dtype)
    return lambda: reduce_tokens(name, features, attention, GRID, retain, text=text)


def test_every_pre_llm_method_is_checked():
    assert len(PRE_LLM_METHODS) >= 16 and "holitom" in PRE_LLM_METHODS


@pytest.mark.parametrize("retain", [0.25, 0.1])
@pytest.mark.parametrize("name", PRE_LLM_METHODS)
def test_method_makes_no_tensor_without_a_device(name, retain):
    tokens = check_device_discipline(_reduction(name, retain, torch.bfloat16), "cpu", what=name)
    assert tokens.features.dtype == torch.bfloat16
    assert int(tokens.size.sum()) == T * GRID[0] * GRID[1]


@pytest.mark.parametrize("name", PRE_LLM_METHODS)
def test_bf16_selects_what_fp32_selects(name):
    """Methods score in fp32 whatever the input dtype, so inputs that are exact in bf16 give the same tokens;
    only the merged values differ, by bf16 rounding."""
    full, half = _reduce(name, 0.25, torch.float32), _reduce(name, 0.25, torch.bfloat16)
    assert_on(full, "cpu", torch.float32)
    assert_on(half, "cpu", torch.bfloat16)
    for field in ("frame", "position", "fate", "origin", "size"):
        assert torch.equal(getattr(full, field), getattr(half, field)), f"{name}: {field} differs"
    torch.testing.assert_close(half.features.float(), full.features, atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("name", PRE_LLM_METHODS)
def test_attribution_waits_until_read(name):
    """Which kept token a dropped token resembles is report bookkeeping: not computed by the reduction itself
    when the method leaves it open, and the same whenever it is read."""
    tokens = _reduce(name, 0.1, torch.float32)
    features = tokens.features.clone()
    size = tokens.size
    assert tokens.attributed and torch.equal(tokens.features, features)
    assert int(size.sum()) == T * GRID[0] * GRID[1]
    assert bool((tokens.origin >= 0).all()) and bool((tokens.origin < len(tokens)).all())
