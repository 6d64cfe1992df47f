"""The static-cache decode behind `--compile` answers exactly what the model's own generate answers: with
reduced inputs, proportional attention and cuts inside the LLM, on every model family. Its step traces to one
graph (what CUDA graphs need); the compiled run itself is in tests/gpu/."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamprune.errors import ConfigError
from streamprune.models import load_video_llm
from streamprune.models.generation import (
    StaticDecoder,
    _decode_step,
    cache_length,
    check_compilable,
    generate_static,
    layer_groups,
)
from streamprune.reduce import reduce_tokens
from streamprune.reduce.inner_cuts import InnerConfig

STEPS = 10


def _prompt(adapter, frames: int = 8):
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8)
    clip[frames // 2:] = clip[frames // 2]  # a static half, so HoliTom merges over time (sizes > 1)
    prompt = adapter.prepare(clip, "What happens?", np.arange(frames) / 4.0)
    return prompt, adapter.encode(prompt)


_adapters: dict[str, object] = {}


def _adapter(name: str):
    """One loaded tiny model per name for the module (random weights: compare full-length answers)."""
    if name not in _adapters:
        _adapters[name] = load_video_llm(name, device="cpu").adapter
        _adapters[name].model.generation_config.eos_token_id = None
    return _adapters[name]


INNER = {
    "unreduced": (1.0, InnerConfig(proportional=False)),
    "holitom, proportional": (0.25, InnerConfig()),
    "holitom + inner holitom merge": (0.25, InnerConfig(mode="holitom", ratio=0.5)),
    "fastv cut, no proportional": (0.5, InnerConfig(mode="fastv", ratio=0.5, proportional=False)),
}


# every setting on LLaVA-OneVision; on the other families (their own positions, DeepStack, layouts) the
# unreduced model and the hardest setting (outer merge, proportional attention and a cut inside)
CASES = [("tiny", s) for s in INNER] + [(m, s) for m in ("tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-smolvlm2",
                                                          "tiny-llava-video")
                                         for s in ("unreduced", "holitom + inner holitom merge")]


@pytest.mark.parametrize(("model", "setting"), CASES)
def test_static_decode_equals_generate(model, setting):
    adapter = _adapter(model)
    retain, inner = INNER[setting]
    prompt, encoded = _prompt(adapter)
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, retain)
    inputs = adapter.reduced_inputs(prompt, tokens, encoded)
    with adapter.inner_stage(inputs, inner) as stage:
        expected = adapter.generate(inputs, STEPS)
    with adapter.inner_stage(inputs, inner) as stage:
        got = generate_static(adapter, inputs, STEPS, stage=stage)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] == STEPS


def test_a_second_cut_gets_its_own_layer_group():
    adapter = _adapter("tiny")
    prompt, encoded = _prompt(adapter)
    tokens = reduce_tokens("aim", encoded.features, encoded.attention, encoded.grid_hw, 0.25)
    inputs = adapter.reduced_inputs(prompt, tokens, encoded)
    from streamprune.reduce import get_method
    from streamprune.reduce.inner_cuts import method_inner

    inner = method_inner(get_method("aim"), 0.25, InnerConfig(), adapter.config.text_config.num_hidden_layers)
    with adapter.inner_stage(inputs, inner) as stage:
        expected = adapter.generate(inputs, STEPS)
    with adapter.inner_stage(inputs, inner) as stage:
        got = generate_static(adapter, inputs, STEPS, stage=stage)
        groups = layer_groups(len(adapter.language_model.layers), inputs.inputs_embeds.shape[1], stage)
    assert len(groups) == 1 + len(stage.cuts) >= 2
    assert [g.fill for g in groups] == sorted((g.fill for g in groups), reverse=True)
    assert got.tolist() == expected.tolist()


def test_decode_step_traces_to_one_graph():
    """torch.compile's dynamo sees the whole step, the per-layer mask hooks included, as one graph with no
    break: the condition for capturing it in a CUDA graph. (The eager backend: no code generation here.)"""
    torch._dynamo.reset()
    adapter = _adapter("tiny")
    prompt, encoded = _prompt(adapter, 4)
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.5)
    inputs = adapter.reduced_inputs(prompt, tokens, encoded)
    inner = InnerConfig(mode="fastv", layer=2, ratio=0.5)
    with adapter.inner_stage(inputs, inner) as stage:
        expected = adapter.generate(inputs, 6)
    step = torch.compile(_decode_step, backend="eager", fullgraph=True)
    original = StaticDecoder.__init__

    def compiled_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._step = lambda token, index: step(self, token, index)

    StaticDecoder.__init__ = compiled_init
    try:
        with adapter.inner_stage(inputs, inner) as stage:
            got = generate_static(adapter, inputs, 6, stage=stage)
    finally:
        StaticDecoder.__init__ = original
    assert got.tolist() == expected.tolist()


def test_cache_lengths_come_in_buckets():
    assert cache_length(700, 64) == 768 and cache_length(704, 64) == 768 and cache_length(705, 64) == 1024


def test_compile_refuses_what_it_cannot_serve():
    with pytest.raises(ConfigError, match="CUDA"):
        check_compilable(torch.device("cpu"), "sdpa", False)
    with pytest.raises(ConfigError, match="flash_attention_2"):
        check_compilable(torch.device("cuda"), "flash_attention_2", False)
    with pytest.raises(ConfigError, match="DyCoke"):
        check_compilable(torch.device("cuda"), "sdpa", True)
