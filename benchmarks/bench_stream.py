"""Streaming engine over long streams: ingest throughput, memory, time-to-answer vs stream length.

Run by hand (`make bench-stream`); ~20 minutes on 2 cores. `--model` picks any streaming model (default the
tiny LLaVA-OneVision; e.g. `--model tiny-qwen2.5-vl` for 3-D M-RoPE positions over frame pairs): at real
dimensions the vision tower costs seconds per frame on this CPU, so the number that carries over is how
many frames reach the tower (frame skip) and whether answer time and memory stay flat.

Streams:
- `looped video`: bigbuckbunny looped for 60 minutes of stream time, sampled at 2 frames/s (as video
  LLMs sample), with `max_context_tokens`; answers timed at 1, 10 and 60 minutes; with and without skip;
- `still camera`: a fixed scene with sensor-like noise at 25 frames/s for 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from streamprune.engine import StreamConfig, StreamEngine
from streamprune.machine import describe
from streamprune.models import load_video_llm
from streamprune.sources import FileSource, SyntheticSource, sample_video_path

QUESTION = "What is happening right now?"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _timed_answer(engine: StreamEngine) -> float:
    t0 = time.perf_counter()
    engine.ask(QUESTION, max_new_tokens=16)
    return time.perf_counter() - t0


def run(engine: StreamEngine, frames, checkpoints_min: list[float], noise: float = 0.0) -> dict:
    """Push frames until the last checkpoint; at each checkpoint time an answer and read memory."""
    rng = np.random.default_rng(0)
    marks = sorted(checkpoints_min)
    points = []
    started = time.perf_counter()
    pushed = 0
    for frame in frames:
        image = frame.image
        if noise:
            image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
        engine.push(image, frame.timestamp)
        pushed += 1
        if frame.timestamp >= marks[0] * 60:
            answer_s = statistics.median(_timed_answer(engine) for _ in range(3))  # asks leave no trace
            stats = engine.stats()
            points.append({"stream_min": marks.pop(0), "time_to_answer_s": round(answer_s, 3),
                           "kv_tokens": stats["kv_tokens"], "kv_mib": round(stats["kv_bytes"] / 2**20, 2),
                           "rss_mib": round(rss_mib(), 1), "frames_in": stats["frames_in"],
                           "vision_calls": stats["frames_encoded"], "evicted_segments": stats["evicted_segments"]})
            print("   ", json.dumps(points[-1]), flush=True)
            if not marks:
                break
    wall = time.perf_counter() - started
    stats = engine.stats()
    return {"frames": pushed, "wall_s": round(wall, 1), "ingest_fps": round(pushed / wall, 1),
            "vision_calls": stats["frames_encoded"], "frames_per_vision_call": round(pushed / max(stats["frames_encoded"], 1), 2),
            "segments": stats["segments"], "evicted_segments": stats["evicted_segments"],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "checkpoints": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    parser.add_argument("--max-context-tokens", type=int, default=4096)
    parser.add_argument("--model", default="tiny", help="any streaming model: tiny, tiny-qwen2.5-vl, ... [tiny]")
    parser.add_argument("--streams", nargs="+", choices=["skip", "no-skip", "still"], default=["skip", "no-skip", "still"],
                        help="which streams to run: looped video with / without frame skip, still camera [all]")
    parser.add_argument("--threads", type=int, help="torch threads [torch's default]")
    parser.add_argument("--out", help="JSON report [benchmarks/results/stream_<model>.json]")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    loaded = load_video_llm(args.model)
    adapter = loaded.adapter
    video = sample_video_path("bigbuckbunny")
    results = {}
    runs = [(label, skip) for label, skip, key in (("looped video, frame skip", 6.0, "skip"),
                                                   ("looped video, no skip", 0.0, "no-skip")) if key in args.streams]
    for label, skip in runs:
        print(label, flush=True)
        engine = StreamEngine(adapter, StreamConfig(retain=0.1, skip_threshold=skip,
                                                    max_context_tokens=args.max_context_tokens))
        minutes = args.minutes if skip else [m for m in args.minutes if m <= 10]  # the no-skip run is the slow one
        results[label] = run(engine, FileSource(video, loop=True, max_fps=2.0), minutes)
    if "still" in args.streams:
        print("still camera", flush=True)
        engine = StreamEngine(adapter, StreamConfig(retain=0.1, max_context_tokens=args.max_context_tokens))
        results["still camera (noise σ=2), 25 fps"] = run(engine, SyntheticSource(pattern="static", fps=25.0),
                                                          [1, 10], noise=2.0)
    report = {"model": f"{args.model} ({adapter.model_type}, random weights: {loaded.random_weights})",
              "machine": describe(), "retain": 0.1, "max_context_tokens": args.max_context_tokens,
              "streams": results}
    out = Path(args.out or f"benchmarks/results/stream_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: {kk: v[kk] for kk in v if kk != "checkpoints"} for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
