"""The fidelity harness and the inner-LLM flags end to end on the tiny LLaVA-OneVision."""

from __future__ import annotations

import json

import pytest

from streamprune.fidelity import compare
from streamprune.models import load_video_llm
from streamprune.reduce.inner_cuts import InnerConfig
from streamprune.sources import read_video
from tests.test_summarize import run_cli


@pytest.fixture(scope="module")
def encoded_sample(sample_video):
    adapter = load_video_llm("tiny").adapter
    clip = read_video(sample_video, num_frames=8)
    prompt = adapter.prepare(clip.frames, "Summarize the video.")
    return adapter, prompt, adapter.encode(prompt)


def test_no_reduction_is_perfect_fidelity(encoded_sample):
    result = compare(*encoded_sample, method="none", retain=1.0, steps=8)
    assert result.kl_first_token == pytest.approx(0.0, abs=1e-6) and result.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert result.teacher_forced_agreement == 1.0 and result.greedy_agreement == 1.0
    assert result.hidden_cosine == pytest.approx(1.0, abs=1e-5)
    assert result.llm_input_tokens == result.llm_input_tokens_unreduced == 8 * 196 + 1


def test_reduction_moves_the_output(encoded_sample):
    outer = compare(*encoded_sample, method="holitom", retain=0.1, steps=8)
    proportional = compare(*encoded_sample, method="holitom", retain=0.1, steps=8, inner=InnerConfig())
    inner = compare(*encoded_sample, method="holitom", retain=0.1, steps=8,
                    inner=InnerConfig(mode="fastv", ratio=0.9, layer=1, proportional=False))
    assert outer.kl_first_token > 0 and outer.hidden_cosine < 1 and not outer.inner_installed
    assert outer.llm_input_tokens == round(0.1 * 8 * 196) + 1
    # the stage acted on the teacher-forced pass
    assert proportional.inner_installed and proportional.kl_first_token != outer.kl_first_token
    assert inner.inner_installed and inner.kl_first_token != outer.kl_first_token


def test_cli_summarize_with_inner_stage(sample_video):
    base = json.loads(run_cli("summarize", str(sample_video), "--frames", "8", "--retain", "0.25",
                              "--max-new-tokens", "3", "--json", "--no-proportional-attention").stdout)
    res = run_cli("summarize", str(sample_video), "--frames", "8", "--retain", "0.25", "--max-new-tokens", "3",
                  "--inner", "similarity", "--inner-ratio", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    visual = report["tokens"]["llm_input"]
    assert report["tokens"]["after_inner"] == report["tokens"]["prompt"] - round(0.5 * visual)
    assert report["inner"] == {"mode": "similarity", "layer": 4, "ratio": 0.5, "merge": "mean", "steps": [],
                               "kv": None, "proportional": True}
    assert report["flops"]["prefill"] < base["flops"]["prefill"]
    assert base["tokens"]["after_inner"] == base["tokens"]["prompt"]
    assert base["inner"] == {"mode": "none", "layer": None, "ratio": 0.0, "merge": None, "steps": [], "kv": None,
                             "proportional": False}
    # layers ≥ K cache only the survivors
    assert report["kv_cache_bytes"] < base["kv_cache_bytes"]


def test_cli_fidelity_json(sample_video):
    res = run_cli("fidelity", str(sample_video), "--frames", "8", "--retain", "0.25", "--inner", "holitom",
                  "--steps", "4", "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    for key in ("kl_first_token", "kl_mean", "teacher_forced_agreement", "greedy_agreement", "hidden_cosine"):
        assert isinstance(result[key], float)
    assert result["steps"] == 4 and result["inner"]["mode"] == "holitom" and "proxy" in result["metrics"]


@pytest.mark.parametrize("args,message", [
    (["--inner", "holitom", "--inner-layer", "6"], "--inner-layer must be in [1, 5]"),
    (["--inner", "holitom", "--inner-layer", "0"], "--inner-layer must be in [1, 5]"),
    (["--inner", "fastv", "--inner-ratio", "1.0"], "--inner-ratio must be in [0, 1)"),
    (["--inner", "fastv", "--inner-ratio", "-0.2"], "--inner-ratio must be in [0, 1)"),
])
def test_cli_bad_inner_flags(sample_video, args, message):
    for command in ("summarize", "fidelity"):
        res = run_cli(command, str(sample_video), "--frames", "2", *args)
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
