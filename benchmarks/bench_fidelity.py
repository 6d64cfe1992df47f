"""Fidelity proxies of outer-only vs outer + inner reduction, and FastV at equal FLOPs.

Run by hand (`make bench-fidelity`); ~3 minutes. Uses the tiny random-weight LLaVA-OneVision: its
decoder is initialised wide enough that its output depends on the video, so the proxies (KL of the
first answer token, top-1 agreement, hidden-state cosine vs the unreduced model) move with what
reduction removes. These are mechanics-level comparisons on an untrained model, not task accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from streamprune.fidelity import compare
from streamprune.flops import prefill_flops
from streamprune.models import load_video_llm
from streamprune.reduce.holitom import default_tau
from streamprune.reduce.inner_cuts import InnerConfig, default_layer
from streamprune.sources import list_sample_videos, read_video

FASTV_LAYER = 1


def cost_model(num_layers: int):
    """FLOPs are matched at LLaVA-OV-0.5B widths (the tiny model's widths would make attention dominate
    and no FastV ratio could match), with the tiny model's depth so K means the same layer."""
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                       num_hidden_layers=num_layers, vocab_size=151936)


MAX_FASTV_RATIO = 0.99


def fastv_ratio_at_equal_flops(text_config, target_flops: float, full_len: int, visual: int) -> tuple[float, float]:
    """Ratio r for FastV at layer FASTV_LAYER (no outer reduction) whose prefill FLOPs equal the target,
    capped at MAX_FASTV_RATIO. Returns (r, FastV FLOPs / target): above 1 when even r = 0.99 costs more
    (at 6 layers, one unreduced layer is a large share of the budget)."""
    layers = text_config.num_hidden_layers

    def flops(r: float) -> float:
        after = full_len - round(r * visual)
        return prefill_flops(text_config, [full_len] * FASTV_LAYER + [after] * (layers - FASTV_LAYER))

    if flops(MAX_FASTV_RATIO) > target_flops:
        return MAX_FASTV_RATIO, flops(MAX_FASTV_RATIO) / target_flops
    lo, hi = 0.0, MAX_FASTV_RATIO
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops(mid) > target_flops else (lo, mid)
    return hi, flops(hi) / target_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--retain", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--out", default="benchmarks/results/fidelity_tiny.json")
    args = parser.parse_args()

    adapter = load_video_llm("tiny").adapter
    k = default_layer(adapter.config.text_config.num_hidden_layers)
    text_config = cost_model(adapter.config.text_config.num_hidden_layers)
    rows: dict[str, list[dict]] = {}
    for name, path in sorted(list_sample_videos().items()):
        clip = read_video(path, num_frames=args.frames)
        prompt = adapter.prepare(clip.frames, "Describe what happens in this video in a few sentences.")
        encoded = adapter.encode(prompt)
        full_len = prompt.input_ids.shape[1]
        visual = encoded.features.shape[0] * encoded.features.shape[1] + 1
        for retain in args.retain:
            tau = default_tau(retain)
            configs = {f"outer {retain:g}": None,
                       f"outer {retain:g} + proportional": InnerConfig(mode="holitom", layer=k, ratio=0.0,
                                                                      proportional=True)}
            for mode, merge in (("holitom", "mean"), ("holitom", "pairwise"), ("similarity", "mean"), ("fastv", "mean")):
                configs[f"outer {retain:g} + inner {mode} ({merge})"] = InnerConfig(mode=mode, layer=k, ratio=0.5,
                                                                                    merge=merge)
            configs[f"outer {retain:g} + inner holitom (mean) + proportional"] = InnerConfig(
                mode="holitom", layer=k, ratio=0.5, proportional=True)
            for label, inner in configs.items():
                result = compare(adapter, prompt, encoded, "holitom", retain, inner, steps=args.steps, tau=tau)
                rows.setdefault(label, []).append({"video": name, **result.to_dict()})
                print(f"{name:<20} {label:<50} KL1 {result.kl_first_token:.4f}", flush=True)

            # FastV alone (no outer reduction) with the FLOPs of outer + inner holitom
            outer_len = full_len - visual + rows[f"outer {retain:g}"][-1]["llm_input_tokens"]
            after = outer_len - round(0.5 * rows[f"outer {retain:g}"][-1]["llm_input_tokens"])
            target = prefill_flops(text_config, [outer_len] * k + [after] * (text_config.num_hidden_layers - k))
            ratio, flops_ratio = fastv_ratio_at_equal_flops(text_config, target, full_len, visual)
            label = f"fastv K={FASTV_LAYER} at FLOPs of outer {retain:g} + inner"
            result = compare(adapter, prompt, encoded, "none", 1.0,
                             InnerConfig(mode="fastv", layer=FASTV_LAYER, ratio=ratio), steps=args.steps)
            rows.setdefault(label, []).append({"video": name, "fastv_ratio": round(ratio, 4),
                                               "flops_vs_holitom": round(flops_ratio, 3), **result.to_dict()})
            print(f"{name:<20} {label:<50} KL1 {result.kl_first_token:.4f} (r={ratio:.3f}, "
                  f"FLOPs ×{flops_ratio:.3f} of HoliTom's)", flush=True)

    summary = {}
    for label, results in rows.items():
        summary[label] = {metric: round(statistics.mean(r[metric] for r in results), 4)
                          for metric in ("kl_first_token", "kl_mean", "teacher_forced_agreement",
                                         "greedy_agreement", "hidden_cosine")}
        summary[label]["videos"] = len(results)
    report = {"model": "tiny random-weight LLaVA-OneVision (configs/models/tiny-llava-onevision.yaml)",
              "equal_flops": "FastV ratio solved for equal prefill FLOPs at 0.5B widths and the tiny depth",
              "frames": args.frames, "steps": args.steps, "inner_layer": k, "metrics": "proxies vs unreduced model",
              "mean_over_videos": summary, "per_video": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
