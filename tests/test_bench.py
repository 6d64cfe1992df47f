"""`streamprune bench` end to end on the tiny model and a real sample video, and the method-zoo CLI."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from streamprune.bench import BenchOptions, run_bench
from streamprune.models import load_video_llm
from streamprune.reduce import METHODS
from tests.test_summarize import run_cli

# one of each kind: merge before, prune inside, before + KV cache, before + progressive inside, reads the question
BENCH_METHODS = ["holitom", "fastv", "dycoke", "aim", "mmtok"]


@pytest.fixture(scope="module")
def bench_result(sample_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    loaded = load_video_llm("tiny")
    opts = BenchOptions(videos=[str(sample_video)], methods=BENCH_METHODS, retains=[0.25, 0.1], frames=4, repeats=2,
                        steps=3, out=str(out))
    return run_bench(opts, loaded.adapter, loaded.name, loaded.random_weights), out


def test_bench_writes_json_markdown_and_plot(bench_result):
    result, out = bench_result
    on_disk = json.loads((out / "bench.json").read_text())
    assert len(on_disk["rows"]) == len(BENCH_METHODS) * 2 and len(on_disk["summary"]) == len(BENCH_METHODS) * 2
    table = (out / "bench.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    for column in ("prefill FLOPs", "KV cache", "TTFT ×", "KL mean", "greedy agree"):
        assert column in header
    assert all(f"| {m} |" in table for m in BENCH_METHODS) and "not task accuracy" in table
    with Image.open(out / "bench.png") as image:
        assert image.format == "PNG" and image.size[0] > 800


def test_bench_rows_measure_each_method_against_the_unreduced_model(bench_result):
    result, _ = bench_result
    rows = {(r["method"], r["retain"]): r for r in result["rows"]}
    for r in rows.values():
        assert r["flops_ratio"] < 1.0 and r["prefill_flops_unreduced"] > r["prefill_flops"]
        assert r["llm_visual_tokens_unreduced"] == 4 * 196 + 1  # 4 frames, one newline token
        assert r["ttft_s"] > r["vision_s"] > 0 and r["ttft_s_unreduced"] > r["vision_s"]
        assert 0.0 <= r["greedy_agreement"] <= 1.0 and r["kl_mean"] >= 0.0
    # before the LLM: fewer tokens in and a smaller KV cache; FastV: every token in, the cut inside shrinks the cache
    assert rows[("holitom", 0.1)]["llm_visual_tokens"] == round(0.1 * 784) + 1
    assert rows[("holitom", 0.1)]["kv_bytes"] < rows[("holitom", 0.1)]["kv_bytes_unreduced"]
    fastv = rows[("fastv", 0.25)]
    assert fastv["llm_visual_tokens"] == 785 and fastv["visual_after_cuts"] == round(0.25 * 785)
    assert fastv["kv_bytes"] < fastv["kv_bytes_unreduced"]
    # AIM's progressive pruning ends with no visual token; a lower ratio costs fewer FLOPs for every method
    assert rows[("aim", 0.25)]["visual_after_cuts"] == 0
    for method in BENCH_METHODS:
        assert rows[(method, 0.1)]["prefill_flops"] < rows[(method, 0.25)]["prefill_flops"]


def test_cli_bench_and_methods(sample_video, tmp_path):
    res = run_cli("bench", str(sample_video), "--methods", "uniform,configs/methods/feather.yaml", "--retain", "0.25",
                  "--frames", "2", "--repeats", "1", "--steps", "2", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "| uniform |" in res.stdout and "| feather |" in res.stdout
    assert all((tmp_path / f).exists() for f in ("bench.json", "bench.md", "bench.png"))
    listing = run_cli("methods")
    assert listing.returncode == 0 and all(name in listing.stdout for name in METHODS)


@pytest.mark.parametrize("args,message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--retain", "0.25,2"], "--retain"),
    (["--retain", "a,b"], "not a comma-separated list"),
    (["--repeats", "0"], "--repeats"),
])
def test_cli_bench_bad_input_is_one_line(sample_video, args, message):
    res = run_cli("bench", str(sample_video), *args)
    assert res.returncode == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_cli_bench_missing_video_fails_before_loading_a_model(tmp_path):
    res = run_cli("bench", str(tmp_path / "missing.mp4"))
    assert res.returncode == 2 and res.stderr.strip().startswith("error: video not found")
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["fastv", "configs/methods/todre.yaml", "dycoke"])
def test_summarize_runs_a_method_with_cuts_inside(sample_video, method):
    res = run_cli("summarize", str(sample_video), "--method", method, "--frames", "4", "--retain", "0.25",
                  "--max-new-tokens", "3", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["inner"]["steps"] or report["inner"]["kv"]
    assert report["flops"]["prefill"] < report["flops"]["prefill_unreduced"] or method == "dycoke"
