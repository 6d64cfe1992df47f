"""Device and dtype discipline of the cuts inside the LLM and DyCoke's KV pruning, proved on the CPU: a bf16
decoder with the stage installed runs a prefill and cached decode steps identically with `meta` as the default
device (a tensor made without `device=` would land there and fail or read garbage), and keeps bf16. Also the
M-RoPE path (Qwen2.5-VL's text decoder: cos/sin [3, B, L, d] up to transformers 5.16, [B, L, d] from 5.17)."""

from __future__ import annotations

import copy

import pytest
import torch

from streamprune.models import load_video_llm
from streamprune.models.cache_compat import cache_kwargs
from streamprune.models.inner_stage import InnerStage, _gather_seq, _size_bias
from streamprune.reduce.inner import InnerStep
from streamprune.reduce.inner_cuts import InnerConfig, KVPrune
from tests.conftest import tiny_llama
from tests.device_checks import check_device_discipline
from tests.test_inner import batch_inputs

BF16 = torch.bfloat16
STEPS = 3

CONFIGS = {
    **{f"{c}-merge-drop": InnerConfig(steps=(InnerStep(2, 0.5, c, "merge", uniform=0.25), InnerStep(4, 0.5, c, "drop")))
       for c in ("last", "text", "received", "last-norope", "transition")},
    "similarity-pairwise": InnerConfig(mode="similarity", ratio=0.5, layer=3, merge="pairwise"),
    "holitom-pairwise": InnerConfig(mode="holitom", ratio=0.5, layer=3, merge="pairwise"),
    "proportional-only": InnerConfig(mode="none"),
    "dycoke": InnerConfig(kv=KVPrune(layer=2, ratio=0.5, refresh=0.9), proportional=False),
    "dycoke-proportional": InnerConfig(kv=KVPrune(layer=3, ratio=0.75, refresh=0.99)),
}


@pytest.fixture(scope="module", params=["llama", "qwen2-llava-onevision"])
def bf16_model(request):
    """A tiny decoder cast to bf16, its weights on the CPU: (model, decoder)."""
    if request.param == "llama":
        model, _ = tiny_llama()
    else:
        model = load_video_llm("tiny").adapter.model
    model = model.to(BF16)
    decoder = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return model, decoder


def staged_generate(model, decoder, config: InnerConfig, embeds, mask, visual, sizes):
    """A closure: prefill + cached greedy steps with the stage installed; returns the generated ids and the
    lm_head's logits of every forward (in the model's dtype)."""
    def run():
        logits = []
        handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: logits.append(out))
        stage = InnerStage(decoder, config)
        stage.prepare(visual, sizes)
        try:
            with stage.installed(), torch.no_grad():
                out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=STEPS,
                                     do_sample=False, return_dict_in_generate=True)
        finally:
            handle.remove()
        return out.sequences, logits
    return run


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inner_stage_keeps_the_device_and_bf16(bf16_model, name):
    model, decoder = bf16_model
    embeds, mask, visual, sizes = batch_inputs(model, 2, seed=7)  # left-padded rows, sizes 1..5
    embeds = embeds.to(BF16)
    if name == "dycoke":
        sizes = None  # prepare makes the unit sizes itself
    run = staged_generate(model, decoder, CONFIGS[name], embeds, mask, visual, sizes)
    ids, logits = check_device_discipline(run, "cpu", BF16, what=name)
    assert ids.shape == (2, STEPS) and len(logits) == STEPS


def test_size_bias_is_in_the_hidden_dtype_with_log_sizes_on_allowed_keys():
    sizes = torch.tensor([[1.0, 4.0, 2.0]])
    for mask in (None, torch.tensor([[[[True, True, False]]]]), torch.zeros(1, 1, 1, 3, dtype=BF16)):
        bias = _size_bias(mask, sizes, 1, BF16)
        assert bias.dtype == BF16 and bias.shape == (1, 1, 1, 3)
        assert torch.equal(bias[0, 0, 0, :2], sizes[0, :2].log().to(BF16))
    assert bias[0, 0, 0, 2] == torch.tensor(2.0).log().to(BF16)  # additive mask: the bias added
    assert _size_bias(torch.tensor([[[[True, True, False]]]]), sizes, 1, BF16)[0, 0, 0, 2] == torch.finfo(BF16).min
    causal = _size_bias(None, torch.ones(2, 4), 2, torch.float32)  # queries are the last 2 of 4 keys
    assert causal.shape == (2, 1, 2, 4) and (causal[:, :, 0, 3] == torch.finfo(torch.float32).min).all()
    assert (causal[:, :, 0, :3] == 0).all() and (causal[:, :, 1] == 0).all()


def test_gather_seq_indexes_the_sequence_on_dim_minus_two():
    keep = torch.tensor([[0, 2], [1, 3]])
    cos = torch.arange(2 * 4 * 3.0).view(2, 4, 3)  # [B, L, d]
    mrope = torch.stack([cos, cos + 100, cos + 200])  # [3, B, L, d]
    assert torch.equal(_gather_seq(cos, keep), torch.stack([cos[0, [0, 2]], cos[1, [1, 3]]]))
    assert torch.equal(_gather_seq(mrope, keep), torch.stack([_gather_seq(m, keep) for m in mrope]))
    assert torch.equal(_gather_seq(cos[:1], keep), torch.stack([cos[0, [0, 2]], cos[0, [1, 3]]]))  # batch 1
    assert torch.equal(_gather_seq(torch.arange(4)[None], keep), keep)  # position ids [1, L]


# ---------------------------------------------------------------- M-RoPE (Qwen2.5-VL's text decoder)


@pytest.fixture(scope="module")
def mrope_decoder():
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    torch.manual_seed(0)
    config = Qwen2_5_VLTextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [2, 3, 3]})
    return Qwen2_5_VLTextModel(config).eval()


def mrope_inputs(batch: int = 2, length: int = 40, dtype=torch.float32):
    """Embeddings, 3-D positions [3, B, L] (a 4×6 grid of visual tokens at 5..28) and next-token embeddings."""
    gen = torch.Generator().manual_seed(3)
    embeds = (torch.randn(batch, length + STEPS, 64, generator=gen) * 0.5).to(dtype)
    pos = torch.arange(length).expand(3, batch, -1).clone()
    grid = torch.arange(24)
    pos[0, :, 5:29], pos[1, :, 5:29], pos[2, :, 5:29] = 5, 5 + grid // 6, 5 + grid % 6
    pos[:, :, 29:] = torch.arange(11, 11 + length - 29)
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[:, 5:29] = True
    sizes = torch.ones(batch, length)
    sizes[:, 5:29] = torch.randint(1, 4, (24,), generator=gen).float()
    return embeds, pos, visual, sizes


def mrope_decode(decoder, embeds, pos, steps: int = STEPS):
    """Prefill, then cached steps fed the next embeddings: the last hidden state of each forward."""
    from transformers import DynamicCache

    length = pos.shape[-1]
    cache, outs = DynamicCache(config=decoder.config), []
    with torch.no_grad():
        out = decoder(inputs_embeds=embeds[:, :length], position_ids=pos, use_cache=True, **cache_kwargs(decoder, cache))
        outs.append(out.last_hidden_state[:, -1])
        for t in range(steps - 1):
            step_pos = (pos.max() + 1 + t).expand(3, embeds.shape[0], 1)
            out = decoder(inputs_embeds=embeds[:, length + t:length + t + 1], position_ids=step_pos,
                          use_cache=True, **cache_kwargs(decoder, cache))
            outs.append(out.last_hidden_state[:, -1])
    return torch.stack(outs, 1)


def mrope_nocache(decoder, embeds, pos, steps: int = STEPS):
    outs = []
    with torch.no_grad():
        for t in range(steps):
            tail = pos.max() + 1 + torch.arange(t)
            full = torch.cat([pos, tail.expand(3, pos.shape[1], -1)], -1)
            out = decoder(inputs_embeds=embeds[:, :full.shape[-1]], position_ids=full, use_cache=False)
            outs.append(out.last_hidden_state[:, -1])
    return torch.stack(outs, 1)


@pytest.mark.parametrize("criterion", ["last", "text"])
def test_mrope_cached_decode_equals_nocache(mrope_decoder, criterion):
    embeds, pos, visual, sizes = mrope_inputs()
    config = InnerConfig(steps=(InnerStep(1, 0.5, criterion, "merge"), InnerStep(3, 0.5, criterion, "drop")))
    stage = InnerStage(mrope_decoder, config)
    stage.prepare(visual, sizes)
    with stage.installed():
        cached = mrope_decode(mrope_decoder, embeds, pos)
        assert stage.tokens_after == 40 - 18
        stage.freeze = True
        recomputed = mrope_nocache(mrope_decoder, embeds, pos)
    assert torch.allclose(cached, recomputed, atol=1e-4, rtol=1e-4), (cached - recomputed).abs().max()
    plain = mrope_decode(mrope_decoder, embeds, pos)
    assert not torch.allclose(cached[:, 0], plain[:, 0], atol=1e-3)  # it did act


def test_mrope_stage_keeps_the_device_and_bf16(mrope_decoder):
    decoder = copy.deepcopy(mrope_decoder).to(BF16)
    embeds, pos, visual, sizes = mrope_inputs(dtype=BF16)
    config = InnerConfig(steps=(InnerStep(1, 0.5, "text", "merge"), InnerStep(3, 0.5, "received", "drop")))

    def run():
        stage = InnerStage(decoder, config)
        stage.prepare(visual, sizes)
        with stage.installed():
            return mrope_decode(decoder, embeds, pos)
    out = check_device_discipline(run, "cpu", BF16, what="mrope")
    assert out.shape == (2, STEPS, 64)
