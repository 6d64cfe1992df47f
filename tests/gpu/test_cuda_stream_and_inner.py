"""The inner stage (every criterion, DyCoke's KV pruning) and the streaming engine on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamprune.engine import StreamConfig, StreamEngine
from streamprune.models import load_video_llm
from streamprune.models.inner_stage import InnerStage
from streamprune.reduce.inner import InnerStep
from streamprune.reduce.inner_cuts import InnerConfig, KVPrune
from tests.conftest import tiny_llama

CRITERIA = ["last", "text", "received", "last-norope", "transition"]


@pytest.fixture(scope="module")
def llama():
    model, decoder = tiny_llama()
    return model.cuda().bfloat16(), decoder


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("action", ["drop", "merge"])
def test_inner_cut_on_cuda(llama, criterion, action):
    model, decoder = llama
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 300, (1, 40), device="cuda", generator=gen)
    visual = torch.zeros(1, 40, dtype=torch.bool, device="cuda")
    visual[:, 5:30] = True
    sizes = torch.ones(1, 40, device="cuda")
    sizes[:, 5:30] = torch.randint(1, 4, (25,), device="cuda", generator=gen).float()
    stage = InnerStage(decoder, InnerConfig(steps=(InnerStep(layer=3, ratio=0.5, criterion=criterion, action=action),)))
    stage.prepare(visual, sizes)
    with stage.installed():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.is_cuda and stage.tokens_after < 40


def test_dycoke_kv_pruning_on_cuda(llama):
    model, decoder = llama
    ids = torch.randint(0, 300, (1, 40), device="cuda")
    visual = torch.zeros(1, 40, dtype=torch.bool, device="cuda")
    visual[:, 5:30] = True
    stage = InnerStage(decoder, InnerConfig(kv=KVPrune(layer=2, ratio=0.7), proportional=False))
    stage.prepare(visual)
    with stage.installed():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.is_cuda and out.shape[1] == 46


def test_stream_engine_on_cuda():
    adapter = load_video_llm("tiny", device="cuda", dtype="bfloat16").adapter
    engine = StreamEngine(adapter, StreamConfig(retain=0.25, lookahead=2))
    rng = np.random.default_rng(0)
    for i in range(8):
        engine.push(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), i / 4)
    answer = engine.ask("What happens?", max_new_tokens=4)
    assert isinstance(answer, str)
    assert engine.stats()["kv_tokens"] > 0
