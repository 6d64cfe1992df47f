"""Pruned pi0 at the released dimensions (random weights, 4 B parameters, 16 GB fp32): per-chunk latency.

Run by hand (`make bench-vla-pi0`); ~20 minutes on 2 cores. Only one copy fits in memory here, so one
`pi0_pruned` instance serves every variant (`configure_pruning` between chunks; a test shows a switched
instance acts exactly as one built that way; retain 1.0 is the unmodified policy, also tested):
per-chunk time for retain 1.0 / 0.5 / 0.25 / 0.125 with each cut, interleaved repeats after the W = 3
warm-up chunks, medians; and where an unpruned chunk's time goes (vision tower, VLM prefix pass,
denoising steps). Action fidelity is `bench_vla_fidelity.py --policy pi0`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_vla import WARMUP, chunk, observations, time_breakdown
from benchmarks.machine import describe
from policies.pi0_pruned import PI0PrunedConfig, PI0PrunedPolicy
from policies.tiny_pi0 import build_tiny_pi0
from streamprune.models.tiny import CONFIG_DIR

RETAINS = (0.5, 0.25, 0.125)
VARIANTS = [("unpruned", "before", 1.0)] + [(f"{cut} {r:g}", cut, r) for cut in ("before", "inside") for r in RETAINS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds per variant (a shared VM is noisy)")
    parser.add_argument("--out", default="benchmarks/results/vla_pi0.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    policy, pre, _ = build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, spec_path=CONFIG_DIR / "pi0-dims.yaml",
                                    retain=1.0)
    print(f"built in {time.perf_counter() - t0:.0f} s, {sum(p.numel() for p in policy.parameters()) / 1e9:.2f} B params",
          flush=True)
    steps = observations(WARMUP + 1)
    noise = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim,
                        generator=torch.Generator().manual_seed(1))
    for batch in steps[:WARMUP]:  # fill the importance window: the history is kept across reconfigurations
        _, seconds = chunk(policy, pre, batch, noise)
        print(f"  warm-up chunk {seconds:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    tokens = {}
    for rep in range(args.repeats):
        for name, cut, retain in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
            policy.configure_pruning(cut=cut, retain=retain)
            _, seconds = chunk(policy, pre, steps[WARMUP], noise)
            times[name].append(seconds)
            tokens[name] = policy.tokens_kept
            print(f"  {name:<14} {seconds:6.1f} s  tokens {tokens[name]}", flush=True)
    policy.configure_pruning(cut="before", retain=1.0)
    split = time_breakdown(policy, pre, steps[WARMUP], noise, backbone="paligemma_with_expert")
    base = statistics.median(times["unpruned"])
    report = {"policy": "pi0 (gemma_2b VLM + gemma_300m expert, SigLIP so400m), random weights, fp32, 1 camera",
              "machine": describe(), "breakdown_unpruned": split,
              "latency": {name: {"chunk_s": round(statistics.median(v), 2),
                                 "speedup": round(base / statistics.median(v), 3), "visual_tokens": tokens[name]}
                          for name, v in times.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
