"""Every method, on CUDA: outputs stay on the GPU in the input's dtype, and pick what the CPU picks."""

from __future__ import annotations

import pytest
import torch

from streamprune.reduce import METHODS, reduce_tokens
from tests.device_checks import assert_on
from tests.test_device_methods import GRID, PRE_LLM_METHODS, T, _inputs


@pytest.mark.parametrize("retain", [0.25, 0.1])
@pytest.mark.parametrize("name", PRE_LLM_METHODS)
def test_method_on_cuda_matches_cpu(name, retain):
    features, attention, text = _inputs(torch.float32)
    cpu = reduce_tokens(name, features, attention, GRID, retain, text=text)
    gpu = reduce_tokens(name, features.cuda().bfloat16(), attention.cuda(), GRID, retain, text=text.cuda().bfloat16())
    assert_on(gpu, "cuda", torch.bfloat16)
    assert int(gpu.size.sum()) == T * GRID[0] * GRID[1]
    # fp32 reductions on the GPU round differently from the CPU: near-ties may flip, nothing more
    same = (cpu.fate == gpu.fate.cpu()).float().mean()
    assert same >= 0.97, f"{name}: only {same:.1%} of the token fates agree with the CPU"


def test_every_method_at_real_sizes_on_cuda():
    """At LLaVA-OV-7B sizes (32 frames × 196 tokens × 3584, bf16) every method runs on the GPU, keeps bf16 and
    accounts for every original token. Its time is the benchmark's (`make bench-gpu`), not a test's."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    features = torch.randn(32, 196, 3584, device="cuda", generator=gen).bfloat16()
    attention = torch.rand(32, 196, device="cuda", generator=gen)
    text = torch.randn(12, 3584, device="cuda", generator=gen).bfloat16()
    for name in PRE_LLM_METHODS:
        tokens = reduce_tokens(name, features, attention, (14, 14), 0.1, text=text)
        assert_on(tokens, "cuda", torch.bfloat16)
        assert int(tokens.size.sum()) == 32 * 196, name
    assert len(PRE_LLM_METHODS) + sum(m.reduce is None for m in METHODS.values()) == len(METHODS)
