"""Encoder-side reduction at the real LLaVA-OneVision-0.5B dimensions (random weights): vision-tower time, time
to first token with HoliTom at retain 0.1 after it, and feature fidelity, side by side with the unreduced
model in the same process; downstream fidelity proxies on the tiny model.

Run by hand (`make bench-encoder`; ~2.5 h on 2 cores for the four sample videos and the default configurations). Per video (32 frames):
- every encoder configuration runs the vision tower on the same frames (configurations interleaved, the
  order reversed from one video to the next); vision time includes the projector and 2×2 pooling;
- HoliTom at retain 0.1 (τ 0.65, the authors' setting) reduces the result and the LLM prefill is timed;
  TTFT = vision + reduction + prefill. The unreduced row is the unmodified tower and the full prefill
  (6,332 tokens); "holitom only" is the unmodified tower plus HoliTom, today's path;
- feature fidelity: cosine of the tower's output (the 27×27 grid the projector reads) with the unmodified
  tower's, per patch, mean and 5th percentile; for scale, the cosine of a floor that replaces every patch
  by its frame's mean feature.
Downstream (tiny model, random weights, all four videos): KL of the first answer token, teacher-forced top-1
agreement and visual-token cosine against the unreduced model, for each configuration alone (retain 1.0)
and with HoliTom at 0.1. Proxies, not task accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_summarize import build_model, time_prefill
from benchmarks.machine import describe
from streamprune.encoder import parse_encoder
from streamprune.fidelity import compare
from streamprune.models import load_video_llm
from streamprune.reduce import reduce_tokens
from streamprune.reduce.holitom import default_tau
from streamprune.sources import list_sample_videos, read_video
from streamprune.tokens import VisualTokens

# label → parse_encoder arguments
CONFIGS = {
    "none": {"spec": "none"},
    "reuse": {"spec": "reuse"},
    "reuse halo 0": {"spec": "reuse", "halo": 0},
    "reuse-alone": {"spec": "reuse-alone"},
    "tome 0.5": {"spec": "tome:0.5"},
    "tome 0.9": {"spec": "tome:0.9"},
    "tome 0.9 decreasing": {"spec": "tome:0.9", "schedule": "decreasing"},
    "zero-tprune 0.5": {"spec": "zero-tprune:0.5"},
    "gtp 0.5": {"spec": "gtp:0.5"},
    "token-transforming 0.5": {"spec": "token-transforming:0.5"},
    "reuse + tome 0.9 decreasing": {"spec": "reuse+tome:0.9", "schedule": "decreasing"},
    # the attention-reading methods at ToMe's fastest setting (`--configs` these for a second run)
    "zero-tprune 0.9 decreasing": {"spec": "zero-tprune:0.9", "schedule": "decreasing"},
    "gtp 0.9 decreasing": {"spec": "gtp:0.9", "schedule": "decreasing"},
    "token-transforming 0.9 decreasing": {"spec": "token-transforming:0.9", "schedule": "decreasing"},
}
DEFAULT_CONFIGS = list(CONFIGS)[:11]
RETAIN = 0.1
PROMPT = "Describe what happens in this video in a few sentences."


class TowerTap:
    """Collects the projector's input — the tower output grid [T, 729, C] — whichever path produced it."""

    def __init__(self, projector: torch.nn.Module) -> None:
        self.parts: list[torch.Tensor] = []
        self.handle = projector.register_forward_pre_hook(lambda m, args: self.parts.append(args[0].detach()))

    def take(self) -> torch.Tensor:
        out, self.parts = torch.cat(self.parts), []
        return out


def cosine_stats(features: torch.Tensor, reference: torch.Tensor) -> dict:
    cos = F.cosine_similarity(features.float(), reference.float(), -1).flatten()
    return {"mean": round(float(cos.mean()), 4), "p5": round(float(cos.quantile(0.05)), 4)}


def speed(adapter, videos: dict, labels: list[str], frames: int, done=lambda results: None) -> dict:
    """Per video and configuration: times, token counts and feature cosine; `done(results)` after each video
    so an interrupted run keeps what it measured."""
    tap = TowerTap(adapter.model.model.multi_modal_projector)
    results = {}
    for v, (name, path) in enumerate(videos.items()):
        clip = read_video(path, num_frames=frames)
        prompt = adapter.prepare(clip.frames, PROMPT)
        rows, towers = {}, {}
        for label in (labels if v % 2 == 0 else list(reversed(labels))):
            config = parse_encoder(**CONFIGS[label])
            encoder = adapter.vision_encoder(config) if config.active else None
            t0 = time.perf_counter()
            encoded = adapter.encode(prompt, encoder=encoder)
            vision_s = time.perf_counter() - t0
            towers[label] = tap.take()
            t0 = time.perf_counter()
            tokens = reduce_tokens("holitom", encoded.features, encoded.attention, encoded.grid_hw, RETAIN,
                                   tau=default_tau(RETAIN))
            reduce_s = time.perf_counter() - t0
            prefill_s, _ = time_prefill(adapter, adapter.reduced_inputs(prompt, tokens))
            rows[label] = {"vision_s": round(vision_s, 2), "reduce_s": round(reduce_s, 3),
                           "prefill_s": round(prefill_s, 2), "ttft_s": round(vision_s + reduce_s + prefill_s, 2),
                           "tokens_into_llm": len(tokens) + 1, "segments": len(tokens.segments),
                           "patches_computed": encoded.encoder.computed_fraction,
                           "keyframes": encoded.encoder.keyframes,
                           "vision_flops_ratio": round(encoded.encoder.flops / encoded.encoder.flops_full, 4)}
            if label == "none":  # the unreduced model: the whole sequence into the LLM
                full = adapter.reduced_inputs(prompt, VisualTokens.unreduced(encoded.features, encoded.grid_hw))
                full_prefill, _ = time_prefill(adapter, full)
                rows["unreduced"] = {"vision_s": rows[label]["vision_s"], "prefill_s": round(full_prefill, 2),
                                     "ttft_s": round(vision_s + full_prefill, 2),
                                     "tokens_into_llm": int(full.visual_mask.sum())}
                print(f"{name:<20} {'unreduced':<28} vision {vision_s:7.1f} s  ttft "
                      f"{rows['unreduced']['ttft_s']:7.1f} s", flush=True)
            print(f"{name:<20} {label:<28} vision {vision_s:7.1f} s  ttft {rows[label]['ttft_s']:7.1f} s  "
                  f"computed {rows[label]['patches_computed']:.2f}", flush=True)
        reference = towers["none"]
        floor = reference.mean(1, keepdim=True).expand_as(reference)
        base = rows["unreduced"]
        for label in labels:
            row = rows[label]
            row["feature_cosine"] = cosine_stats(towers[label], reference)
            row["vision_speedup"] = round(base["vision_s"] / row["vision_s"], 2)
            row["ttft_speedup"] = round(base["ttft_s"] / row["ttft_s"], 2)
        rows["floor_cosine_frame_mean"] = cosine_stats(floor, reference)
        results[name] = rows
        print(f"{name}: feature cosine " + ", ".join(f"{label} {rows[label]['feature_cosine']['mean']:.4f}"
                                                   for label in labels), flush=True)
        done(results)
    tap.handle.remove()
    return results


def downstream(videos: dict, labels: list[str], frames: int) -> dict:
    """Fidelity proxies on the tiny model: each configuration alone and with HoliTom at 0.1."""
    adapter = load_video_llm("tiny").adapter
    out = {}
    for name, path in videos.items():
        clip = read_video(path, num_frames=frames)
        prompt = adapter.prepare(clip.frames, PROMPT)
        full = adapter.encode(prompt)
        rows = {}
        for label in labels:
            config = parse_encoder(**CONFIGS[label])
            encoded = adapter.encode(prompt,
                                     encoder=adapter.vision_encoder(config) if config.active else None)
            for retain in (1.0, RETAIN):
                tau = {"tau": default_tau(retain)} if retain < 1 else {}
                result = compare(adapter, prompt, encoded, "holitom", retain, steps=16, reference_encode=full, **tau)
                rows[f"{label} @ retain {retain:g}"] = {
                    "kl_first_token": round(result.kl_first_token, 4), "kl_mean": round(result.kl_mean, 4),
                    "teacher_forced_agreement": round(result.teacher_forced_agreement, 3),
                    "vision_feature_cosine": round(result.vision_feature_cosine, 4)}
        out[name] = rows
        print(f"downstream {name}: done", flush=True)
    return out


def summary_table(results: dict, labels: list[str]) -> dict:
    """Medians over videos of the per-video ratios."""
    table = {}
    for label in ["unreduced", *labels]:
        rows = [r[label] for r in results.values()]
        entry = {key: round(statistics.median(r[key] for r in rows), 3)
                 for key in ("vision_speedup", "ttft_speedup") if key in rows[0]}
        if "feature_cosine" in rows[0]:
            entry["feature_cosine_mean"] = round(statistics.median(r["feature_cosine"]["mean"] for r in rows), 4)
            entry["patches_computed"] = round(statistics.median(r["patches_computed"] for r in rows), 3)
        table[label] = entry
    return table


def plot(results: dict, labels: list[str], path: Path, frames: int) -> None:
    """TTFT speed-up vs feature cosine, one point per configuration and video."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^v<>pP*X"
    for i, label in enumerate(labels):
        xs = [r[label]["feature_cosine"]["mean"] for r in results.values()]
        ys = [r[label]["ttft_speedup"] for r in results.values()]
        shown = "none (HoliTom only)" if label == "none" else label
        ax.scatter(xs, ys, marker=markers[i % len(markers)], label=shown, s=45)
    ax.axhline(3.0, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(0.95, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("tower output cosine vs full encode (random weights: a proxy)")
    ax.set_ylabel("TTFT speed-up vs unreduced (HoliTom 0.1 after the encoder)")
    ax.set_title(f"LLaVA-OneVision-0.5B dims, {frames} frames, one point per sample video")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--videos", nargs="+", default=None, help="sample names [all]")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--skip-downstream", action="store_true")
    parser.add_argument("--downstream-only", action="store_true",
                        help="add the downstream proxies to an existing --out report (its videos and configs)")
    parser.add_argument("--out", default="benchmarks/results/encoder_0.5b.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    labels = args.configs if "none" in args.configs else ["none", *args.configs]
    samples = list_sample_videos()
    videos = {name: samples[name] for name in (args.videos or samples)}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.downstream_only:  # e.g. after a speed run stopped early: no timing, so any load is fine
        report = json.loads(out.read_text())
        names = list(report["videos"]) if args.videos is None else args.videos
        report["downstream_tiny"] = downstream({n: samples[n] for n in names}, list(report["configs"]), args.frames)
        out.write_text(json.dumps(report, indent=2))
        return
    report = {"machine": describe(), "model": "LLaVA-OneVision-0.5B dimensions (SigLIP-so400m 26 layers, Qwen2-0.5B), "
              "random weights, fp32", "frames": args.frames, "outer": f"holitom retain {RETAIN}",
              "protocol": " ".join(__doc__.split("Per video (32 frames):")[1].split()),
              "configs": {label: CONFIGS[label] for label in labels}}

    def write(results: dict) -> None:  # after every video, so a stopped run keeps what it measured
        report.update(summary_median_over_videos=summary_table(results, labels), videos=results)
        out.write_text(json.dumps(report, indent=2))
        plot(results, labels, out.with_suffix(".png"), args.frames)

    t0 = time.perf_counter()
    adapter = build_model()
    print(f"built random-weight LLaVA-OV-0.5B dims in {time.perf_counter() - t0:.0f} s", flush=True)
    results = speed(adapter, videos, labels, args.frames, done=write)
    del adapter
    if not args.skip_downstream:
        report["downstream_tiny"] = downstream(videos, labels, args.frames)
        write(results)
    print(json.dumps(report["summary_median_over_videos"], indent=2))


if __name__ == "__main__":
    main()
