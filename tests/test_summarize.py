"""End to end on the tiny random-weight LLaVA-OneVision: equivalence with the unmodified model, the
report, the CLI (text and --json) and its errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from streamprune.models import load_video_llm
from streamprune.reduce import reduce_tokens
from streamprune.sources import read_video
from streamprune.summarize import SummarizeOptions, summarize

FRAMES = 8
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny():
    return load_video_llm("tiny")


@pytest.fixture(scope="module")
def prompt_inputs(tiny, sample_video):
    clip = read_video(sample_video, num_frames=FRAMES)
    return tiny.adapter.prepare(clip.frames, "Summarize the video.")


@pytest.fixture(scope="module")
def reference_tokens(tiny, prompt_inputs):
    """What the unmodified model generates from the same frames: its own vision path and placeholders."""
    with torch.no_grad():
        out = tiny.adapter.model.generate(input_ids=prompt_inputs.input_ids, attention_mask=prompt_inputs.attention_mask,
                                          pixel_values_videos=prompt_inputs.pixel_values_videos,
                                          max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, prompt_inputs.input_ids.shape[1]:]


@pytest.mark.parametrize("method,retain", [("none", 0.1), ("holitom", 1.0), ("none", 1.0)])
def test_reduction_off_generates_exactly_what_the_unmodified_model_does(tiny, prompt_inputs, reference_tokens,
                                                                         method, retain):
    adapter = tiny.adapter
    encoded = adapter.encode(prompt_inputs, frames_per_batch=3)  # batching must not matter
    tokens = reduce_tokens(method, encoded.features, encoded.attention, encoded.grid_hw, retain)
    inputs = adapter.reduced_inputs(prompt_inputs, tokens)
    assert inputs.inputs_embeds.shape[1] == prompt_inputs.input_ids.shape[1]
    ours = adapter.generate(inputs, NEW_TOKENS)
    assert ours.tolist() == reference_tokens.tolist()


def test_tiny_model_output_depends_on_the_video(tiny, prompt_inputs, reference_tokens):
    """Guards the equivalence test: a model that ignored its input would pass it trivially."""
    adapter = tiny.adapter
    encoded = adapter.encode(prompt_inputs)
    tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, 0.1)
    inputs = adapter.reduced_inputs(prompt_inputs, tokens)
    assert inputs.inputs_embeds.shape[1] == prompt_inputs.input_ids.shape[1] - (FRAMES * 196 - len(tokens))
    assert inputs.visual_mask.sum() == len(tokens) + 1  # + the newline token
    assert inputs.sizes[inputs.visual_mask].sum() == FRAMES * 196 + 1
    assert adapter.generate(inputs, NEW_TOKENS).tolist() != reference_tokens.tolist()


def test_vision_attention_is_a_distribution_per_frame(tiny, prompt_inputs):
    encoded = tiny.adapter.encode(prompt_inputs)
    assert encoded.features.shape == (FRAMES, 196, tiny.adapter.config.text_config.hidden_size)
    assert encoded.attention.shape == (FRAMES, 196)
    assert (encoded.attention > 0).all()
    # mean received attention over 729 patches sums to 1 per frame; bilinear pooling to 14×14 keeps the mean
    assert torch.allclose(encoded.attention.mean(1), torch.full((FRAMES,), 1 / 729), rtol=0.05)


def test_summarize_report(sample_video, tmp_path):
    viz = tmp_path / "viz.png"
    report = summarize(SummarizeOptions(video=str(sample_video), frames=16, retain=0.1, max_new_tokens=5,
                                        save_viz=str(viz)))
    tok = report.tokens
    assert report.random_weights and report.notes
    assert report.frames == 16 and tok["vision"] == 16 * 196
    assert tok["vision"] >= tok["after_temporal_merge"] >= tok["llm_input"] - 1
    assert abs((tok["llm_input"] - 1) - round(0.1 * 16 * 196)) <= 0.02 * 0.1 * 16 * 196
    assert tok["prompt_unreduced"] - tok["prompt"] == tok["vision"] - (tok["llm_input"] - 1)
    assert report.segments[0][0] == 0 and report.segments[-1][1] == 15
    assert report.flops["prefill"] < 0.2 * report.flops["prefill_unreduced"]
    assert 0 < report.kv_cache_bytes < report.kv_cache_bytes_unreduced
    cfg = load_video_llm("tiny").adapter.config.text_config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert report.kv_cache_bytes == per_token * tok["prompt"]  # cache right after prefill
    assert report.generated_tokens == 5
    t = report.timing_s
    assert t["ttft"] >= t["vision"] + t["reduce"] + t["prefill"] > 0
    assert viz.stat().st_size > 0 and report.viz == str(viz)


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "streamprune", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_text_report(sample_video):
    res = run_cli("summarize", str(sample_video), "--frames", "8", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    for expected in ("random weights", "summary", "vision tokens", "into the LLM", "prefill FLOPs", "KV cache",
                     "time ttft", "1,568"):
        assert expected in res.stdout


def test_cli_json(sample_video):
    res = run_cli("summarize", str(sample_video), "--frames", "8", "--retain", "0.25", "--max-new-tokens", "3",
                  "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["frames"] == 8
    assert report["tokens"]["vision"] == 8 * 196 and report["tokens"]["llm_input"] == 392 + 1
    assert all(len(seg) == 2 for seg in report["segments"])
    for key in ("prefill", "prefill_unreduced"):
        assert report["flops"][key] > 0
    for key in ("vision", "reduce", "prefill", "ttft"):
        assert report["timing_s"][key] >= 0
    assert report["kv_cache_bytes"] > 0 and isinstance(report["summary"], str)
    assert report["tau"] == 0.8


@pytest.mark.parametrize("name", ["missing", "directory", "empty", "random_bytes", "text", "audio_only", "truncated"])
def test_cli_bad_video_is_one_line_exit_2(bad_video_files, name):
    res = run_cli("summarize", str(bad_video_files[name]))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr


@pytest.mark.parametrize("args,message", [
    (["--retain", "0"], "--retain"),
    (["--retain", "1.5"], "--retain"),
    (["--frames", "0"], "--frames"),
    (["--model", "not-a-model"], "model not found"),
    (["--model", "someorg/some-model"], "hf download someorg/some-model"),
])
def test_cli_bad_flags(sample_video, args, message):
    res = run_cli("summarize", str(sample_video), *args)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_unsupported_model_type(tmp_path, sample_video):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    res = run_cli("summarize", str(sample_video), "--model", str(tmp_path))
    assert res.returncode == 2 and "unsupported model type 'bert'" in res.stderr
