"""Pruned pi0 at the released dimensions (random weights, 4 B parameters, 16 GB fp32): chunk latency, fidelity.

Run by hand (`make bench-vla-pi0`); ~25 minutes on 2 cores. Only one copy fits in memory here, so one
`pi0_pruned` instance (cut "before") serves every variant: retain 1.0 runs exactly the unmodified policy
(tested), and budget and selection are changed between chunks (both are read per chunk).
- latency: retain 1.0 / 0.5 / 0.25 / 0.125 in interleaved chunks after the W = 3 warm-up chunks;
- fidelity: MSE and cosine of actions vs retain 1.0 on the same drifting observations and noise, for
  VLA-Pruner, semantic-only and random selection, each from a fresh episode (reset, W warm-up chunks).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_vla import WARMUP, chunk, observations, time_breakdown
from policies.pi0_pruned import PI0PrunedConfig, PI0PrunedPolicy
from policies.tiny_pi0 import build_tiny_pi0
from streamprune.models.tiny import CONFIG_DIR

RETAINS = (1.0, 0.5, 0.25, 0.125)


def episode_actions(policy, pre, batches, noise) -> list[torch.Tensor]:
    policy.reset()
    return [chunk(policy, pre, b, noise)[0] for b in batches]


def action_fidelity(policy, pre, options, noise, steps: int = 6) -> dict:
    batches = observations(WARMUP + steps, seed=2)
    policy.pruner.options = replace(options, retain=1.0)
    reference = episode_actions(policy, pre, batches, noise)
    results = {}
    for retain in RETAINS[1:]:
        for selection in ("vla_pruner", "semantic", "random"):
            policy.pruner.options = replace(options, retain=retain, selection=selection)
            pairs = list(zip(episode_actions(policy, pre, batches, noise), reference, strict=True))[WARMUP:]
            results[f"{selection} {retain:g}"] = {
                "mse": round(statistics.mean(float(F.mse_loss(a, r)) for a, r in pairs), 6),
                "cosine": round(statistics.mean(float(F.cosine_similarity(a.flatten(), r.flatten(), 0))
                                                for a, r in pairs), 4)}
            print(f"  fidelity {selection:<10} {retain:<6} {results[f'{selection} {retain:g}']}", flush=True)
    return results


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    policy, pre, _ = build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, spec_path=CONFIG_DIR / "pi0-dims.yaml",
                                    retain=0.25, cut="before")
    print(f"built in {time.perf_counter() - t0:.0f} s, {sum(p.numel() for p in policy.parameters()) / 1e9:.2f} B params",
          flush=True)
    steps = observations(WARMUP + 2)
    noise = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim,
                        generator=torch.Generator().manual_seed(1))
    for batch in steps[:WARMUP]:
        _, seconds = chunk(policy, pre, batch, noise)
        print(f"  warm-up chunk {seconds:.1f} s (tokens {policy.tokens_kept})", flush=True)
    options = policy.pruner.options
    times = {r: [] for r in RETAINS}
    tokens = {}
    for rep in range(2):
        for retain in (RETAINS if rep % 2 == 0 else tuple(reversed(RETAINS))):
            policy.pruner.options = replace(options, retain=retain)
            _, seconds = chunk(policy, pre, steps[WARMUP], noise)
            times[retain].append(seconds)
            tokens[retain] = policy.tokens_kept
            print(f"  retain {retain:<6} {seconds:6.1f} s  tokens {tokens[retain]}", flush=True)
    fidelity = action_fidelity(policy, pre, options, noise)
    policy.pruner.options = replace(options, retain=1.0)
    split = time_breakdown(policy, pre, steps[WARMUP], noise, backbone="paligemma_with_expert")
    base = statistics.median(times[1.0])
    report = {"policy": "pi0 (gemma_2b VLM + gemma_300m expert, SigLIP so400m), random weights, fp32, 1 camera",
              "cut": "before", "breakdown_unpruned": split,
              "latency": {f"{r:g}": {"chunk_s": round(statistics.median(v), 2), "speedup": round(base / statistics.median(v), 3),
                                    "visual_tokens": tokens[r]} for r, v in times.items()},
              "action_fidelity_vs_unpruned": fidelity}
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/vla_pi0.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
