"""The method zoo side by side at the real LLaVA-OneVision-0.5B dimensions (random weights): `streamprune bench`
on the sample videos at retain 0.25 / 0.1.

Run by hand (`make bench-methods`); ~30 minutes on 2 cores for two videos × 8 frames × every method. Speed does
not depend on weight values, so the times and FLOPs are what the real checkpoint would spend; the fidelity
columns (KL, agreement vs the unreduced model) on random weights are proxies of how far a method moves the
model's output, not task accuracy. Writes benchmarks/results/methods_0.5b/bench.{json,md,png}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.bench_summarize import build_model
from benchmarks.machine import describe
from streamprune.bench import BenchOptions, run_bench

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", nargs="+", default=["sample:bigbuckbunny", "sample:bikes"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--retain", nargs="+", type=float, default=[0.25, 0.1])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "methods_0.5b"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    adapter = build_model()
    print(f"built random-weight LLaVA-OV-0.5B dims in {time.perf_counter() - t0:.0f} s", flush=True)
    opts = BenchOptions(videos=args.videos, methods=args.methods, retains=args.retain, frames=args.frames,
                        repeats=args.repeats, steps=args.steps, out=args.out)

    def progress(stage: str, done: int, total: int) -> None:
        print(f"{stage} {done}/{total} ({time.perf_counter() - t0:.0f} s)", flush=True)

    result = run_bench(opts, adapter, "llava-onevision-0.5b dims", True, progress, machine=describe())
    print((Path(args.out) / "bench.md").read_text())
    print(f"done in {time.perf_counter() - t0:.0f} s; {len(result['rows'])} rows")


if __name__ == "__main__":
    main()
