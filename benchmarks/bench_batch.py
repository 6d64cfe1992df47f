"""`streamprune batch` throughput: 8 copies of a sample video with the tiny model, in-process vs Ray Data with
2 workers, in the same run; time to the first row (start-up), the rate after it, and peak RSS per worker
process.

Run by hand (`make bench-batch`), a few minutes on 2 cores. Writes benchmarks/results/batch_tiny_COPIES.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.machine import describe
from streamprune.batch import BatchOptions, run_batch
from streamprune.sources import sample_video_path
from streamprune.summarize import SummarizeOptions

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    settings = SummarizeOptions(video="", frames=args.frames, retain=0.1, max_new_tokens=16)
    results = {"machine": describe(), "copies": args.copies, "frames": args.frames, "model": "tiny", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        for i in range(args.copies):
            shutil.copy(sample_video_path("bigbuckbunny"), folder / f"copy{i}.mp4")
        for engine, ray in (("in-process", "none"), (f"ray, {args.workers} workers", "local")):
            out = Path(tmp) / f"{ray}.jsonl"
            arrivals: list[float] = []  # seconds from the start at which each row reached --out
            t0 = time.perf_counter()

            def progress(done, failed, total, skipped, arrivals=arrivals, t0=t0):
                if done + failed > len(arrivals):
                    arrivals.append(time.perf_counter() - t0)

            report = run_batch(BatchOptions(sources=[str(folder)], out=str(out), summarize=settings, ray=ray,
                                            workers=args.workers), progress=progress)
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            rss = {}
            for row in rows:
                rss[row["worker"]["pid"]] = max(rss.get(row["worker"]["pid"], 0), row["worker"]["peak_rss_mb"])
            results["runs"][engine] = {
                "videos": report.done + report.failed, "failed": report.failed, "seconds": round(report.seconds, 2),
                "videos_per_minute": round(report.videos_per_minute, 2),
                # start-up (Ray: cluster, worker processes, imports, model load per actor) until the first row
                "first_row_s": round(arrivals[0], 2),
                # the rate once running: rows after the first, over the time after the first
                "steady_videos_per_minute": round(60 * (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), 2),
                "peak_rss_mb_per_worker": sorted(rss.values()),
                "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
            print(engine, results["runs"][engine], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"batch_tiny_{args.copies}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
