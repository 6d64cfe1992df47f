"""Pruned pi0 at the released dimensions (random weights, ~3.5 B parameters, ~14 GB fp32): per-chunk latency.

Run by hand (`make bench-vla-pi0`); ~10 minutes on 2 cores. Only one copy fits in memory here, so one
`pi0_pruned` instance (cut "before") is measured at retain 1.0 — which runs exactly the unmodified policy
(tested) — and at 0.5 / 0.25 / 0.125 by changing its budget between interleaved chunks, after the W = 3
warm-up chunks that fill its importance window.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench_vla import WARMUP, chunk, observations
from policies.pi0_pruned import PI0PrunedConfig, PI0PrunedPolicy
from policies.tiny_pi0 import build_tiny_pi0
from streamprune.models.tiny import CONFIG_DIR

RETAINS = (1.0, 0.5, 0.25, 0.125)


def breakdown(policy, pre, batch, noise) -> dict[str, float]:
    """Seconds in the vision tower (embed_image), the denoising steps, and the rest (prefix pass) of a chunk."""
    spent = {"vision": 0.0, "denoise": 0.0}
    model = policy.model

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - t0
            return out
        return wrapper

    embed, denoise = model.paligemma_with_expert.embed_image, model.denoise_step
    model.paligemma_with_expert.embed_image = timed("vision", embed)
    model.denoise_step = timed("denoise", denoise)
    try:
        _, total = chunk(policy, pre, batch, noise)
    finally:
        del model.paligemma_with_expert.embed_image, model.denoise_step
    return {"chunk_s": round(total, 2), "vision_s": round(spent["vision"], 2), "denoise_s": round(spent["denoise"], 2),
            "prefix_and_rest_s": round(total - spent["vision"] - spent["denoise"], 2)}


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
    policy.pruner.options = replace(options, retain=1.0)
    split = breakdown(policy, pre, steps[WARMUP], noise)
    base = statistics.median(times[1.0])
    report = {"policy": "pi0 (gemma_2b VLM + gemma_300m expert, SigLIP so400m), random weights, fp32, 1 camera",
              "cut": "before", "breakdown_unpruned": split,
              "latency": {f"{r:g}": {"chunk_s": round(statistics.median(v), 2), "speedup": round(base / statistics.median(v), 3),
                                    "visual_tokens": tokens[r]} for r, v in times.items()}}
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/vla_pi0.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
