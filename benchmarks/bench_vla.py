"""Pruned SmolVLA at real dimensions (random weights): per-chunk latency and where a chunk's time goes.

Run by hand (`make bench-vla`); ~5 minutes on 2 cores. One process, one set of weights shared by every
variant (state_dict copy), the same observation and flow-matching noise for all: per-chunk time
(`predict_action_chunk`) unpruned vs retain 0.5 / 0.25 / 0.125 for both cuts, interleaved repeats,
medians; and the split of an unpruned chunk into vision tower, VLM prefix pass and denoising steps, from
hooks. Action fidelity is `bench_vla_fidelity.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.machine import describe
from policies.smolvla_pruned import SmolVLAPrunedConfig, SmolVLAPrunedPolicy
from policies.tiny_smolvla import build_tiny_smolvla
from streamprune.models.tiny import CONFIG_DIR

RETAINS = (0.5, 0.25, 0.125)
WARMUP = 3  # VLA-Pruner's W: chunks that run unpruned at the start of an episode


def observations(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A drifting scene: each step's image is the previous plus a little change (like a moving robot)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 96, 96, generator=gen)
    batches = []
    for _ in range(steps):
        image = (image + 0.05 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
        batches.append({"observation.image": image.clone(), "observation.state": torch.randn(1, 2, generator=gen),
                        "task": ["push the T into the target"]})
    return batches


def build(retain: float | None, cut: str = "before", selection: str = "vla_pruner", state: dict | None = None):
    """Unpruned (retain None) or pruned SmolVLA at SmolVLM2-500M dims; pruned ones load `state`."""
    backbone = CONFIG_DIR / "smolvlm-500m-dims.yaml"
    if retain is None:
        return build_tiny_smolvla(backbone=backbone)
    policy, pre, post = build_tiny_smolvla(SmolVLAPrunedPolicy, SmolVLAPrunedConfig, backbone=backbone,
                                           retain=retain, cut=cut, selection=selection)
    policy.load_state_dict(state)
    return policy, pre, post


@torch.no_grad()
def chunk(policy, pre, batch: dict, noise: torch.Tensor) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    actions = policy.predict_action_chunk(pre(batch), noise=noise)
    return actions, time.perf_counter() - t0


def time_breakdown(policy, pre, batch: dict, noise: torch.Tensor, backbone: str = "vlm_with_expert") -> dict[str, float]:
    """Seconds in the vision tower (`<backbone>.embed_image`), the denoising steps, and the rest (the VLM
    prefix pass) of one chunk. backbone: the model attribute holding embed_image (pi0: paligemma_with_expert)."""
    spent = {"vision": 0.0, "denoise": 0.0}
    model = policy.model
    owner = getattr(model, backbone)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - t0
            return out
        return wrapper

    owner.embed_image = timed("vision", owner.embed_image)
    model.denoise_step = timed("denoise", model.denoise_step)
    try:
        _, total = chunk(policy, pre, batch, noise)
    finally:
        del owner.embed_image, model.denoise_step  # back to the class methods
    return {"chunk_s": round(total, 3), "vision_s": round(spent["vision"], 3),
            "denoise_s": round(spent["denoise"], 3),
            "prefix_and_rest_s": round(total - spent["vision"] - spent["denoise"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/vla_smolvla.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    base, pre, _ = build(None)
    state = base.state_dict()
    steps = observations(WARMUP + 1)
    chunk_size, action_dim = base.config.chunk_size, base.config.max_action_dim
    noise = torch.randn(1, chunk_size, action_dim, generator=torch.Generator().manual_seed(1))
    print("breakdown (unpruned):", time_breakdown(base, pre, steps[0], noise), flush=True)

    variants = {"unpruned": (base, pre)}
    for cut in ("before", "inside"):
        for retain in RETAINS:
            policy, p, _ = build(retain, cut, state=state)
            for batch in steps[:WARMUP]:  # fill the importance window so pruning is on
                chunk(policy, p, batch, noise)
            variants[f"{cut} {retain:g}"] = (policy, p)

    latency = {k: [] for k in variants}
    tokens = {}
    for rep in range(args.repeats):
        for key in (list(variants) if rep % 2 == 0 else list(reversed(variants))):
            policy, p = variants[key]
            _, seconds = chunk(policy, p, steps[WARMUP], noise)
            latency[key].append(seconds)
            tokens[key] = getattr(policy, "tokens_kept", 64)
            print(f"  {key:<14} {seconds:6.2f} s  tokens {tokens[key]}", flush=True)
    base_s = statistics.median(latency["unpruned"])
    latency_table = {k: {"chunk_s": round(statistics.median(v), 3), "speedup": round(base_s / statistics.median(v), 3),
                         "visual_tokens": tokens[k]} for k, v in latency.items()}

    report = {"policy": "SmolVLA, SmolVLM2-500M dims (16 VLM layers), random weights, fp32, 1 camera 64 tokens",
              "machine": describe(), "breakdown_unpruned": time_breakdown(base, pre, steps[0], noise),
              "latency": latency_table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
