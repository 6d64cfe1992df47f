"""`streamprune bench`: reduction methods × retain ratios on videos and a model, each side by side with the
unreduced model in the same run.

Per video the frames are decoded and the vision tower runs `repeats` times (its median time is shared by every
method: none of them changes the tower). Then per method, `repeats` rounds each time the unreduced model and
the method at every ratio, in that order, so both sides see the same machine state; times are medians.
Reported per (video, method, retain):
- tokens: visual tokens into the LLM and visual tokens left after the method's last cut inside it;
- estimated prefill FLOPs (`streamprune.flops`, per-layer token counts) and the KV-cache bytes the prefill left;
- times: reduction (before the LLM, with the layout), LLM prefill, time to first token = vision + reduction +
  LLM until the first token, and the unreduced model's prefill and TTFT next to them;
- fidelity proxies against the unreduced model (`streamprune.fidelity`): KL of the answer distribution and
  greedy / teacher-forced token agreement. On random weights these are proxies, not task accuracy.
Outputs in `out/`: bench.json (every row + per-method means over videos), bench.md (the table), bench.png
(fidelity vs FLOPs, one line per method). They are rewritten after each video, so an interrupted run keeps
what it finished.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from streamprune.errors import ConfigError
from streamprune.extras import has_extra
from streamprune.fidelity import against, reference
from streamprune.flops import prefill_flops
from streamprune.models.base import LLMInputs, VideoLLMAdapter
from streamprune.paths import check_output_dir
from streamprune.reduce import METHODS, check_retain, get_method, reduce_tokens
from streamprune.reduce.inner_cuts import InnerConfig, method_inner
from streamprune.runtime import Runtime
from streamprune.sources import read_video, resolve_video_arg
from streamprune.summarize import (
    DEFAULT_PROMPT,
    PrefillProbe,
    SummarizeOptions,
    reduction_options,
    synchronize,
)
from streamprune.tokens import VisualTokens

# progress(stage, done, total)
ProgressFn = Callable[[str, int, int], None]


@dataclass
class BenchOptions:
    videos: list[str]
    model: str = "tiny"
    methods: list[str] | None = None  # None: every registered method but `none` (the reference itself)
    retains: list[float] = field(default_factory=lambda: [0.25, 0.1])
    frames: int = 16
    repeats: int = 3
    steps: int = 8  # answer tokens the fidelity proxies compare
    prompt: str = DEFAULT_PROMPT
    out: str = "out/bench"
    method_options: dict[str, dict] = field(default_factory=dict)  # per method, e.g. from configs/methods/
    device: str = "auto"  # where the model runs (streamprune.runtime)
    dtype: str = "auto"
    attn_implementation: str = "sdpa"

    def method_names(self) -> list[str]:
        return self.methods if self.methods else [m for m in METHODS if m != "none"]

    def validate(self) -> None:
        for name in self.method_names():
            get_method(name)
        if not self.videos:
            raise ConfigError("give at least one video (a path or sample:NAME)")
        for r in self.retains:
            check_retain(r)
        for name, value in (("--frames", self.frames), ("--repeats", self.repeats), ("--steps", self.steps)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        check_output_dir(self.out, "--out")


@dataclass
class FirstToken:
    """One timed run up to the first generated token."""

    prefill_s: float
    llm_s: float  # from entering generate to the first token chosen
    kv_bytes: int
    tokens_by_layer: list[int]


@torch.no_grad()
def time_first_token(adapter: VideoLLMAdapter, inputs: LLMInputs, inner: InnerConfig | None) -> FirstToken:
    probe = PrefillProbe(adapter.language_model)
    num_layers = adapter.config.text_config.num_hidden_layers
    seq_len = inputs.inputs_embeds.shape[1]
    synchronize(inputs.inputs_embeds)
    t0 = time.perf_counter()
    with adapter.inner_stage(inputs, inner) as stage, probe.installed():
        adapter.generate(inputs, 1, logits_processor=[probe])
    llm_s = (probe.first_token_at or time.perf_counter()) - t0
    by_layer = stage.tokens_by_layer(num_layers, seq_len) if stage else [seq_len] * num_layers
    return FirstToken(probe.prefill_s or 0.0, llm_s, probe.kv_cache_bytes, by_layer)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def run_bench(opts: BenchOptions, adapter: VideoLLMAdapter | None = None, model_name: str | None = None,
              random_weights: bool | None = None, progress: ProgressFn | None = None,
              machine: str | None = None) -> dict:
    """Run the sweep; returns the result dict and writes bench.json / bench.md / bench.png under opts.out.
    `adapter`: an already built model (benchmarks pass random-weight real-size ones); else `opts.model` loads."""
    opts.validate()
    clips = [(v, read_video(resolve_video_arg(v), num_frames=opts.frames)) for v in opts.videos]  # fail before work
    if adapter is None:
        from streamprune.models import load_video_llm

        loaded = load_video_llm(opts.model, opts.device, opts.dtype, opts.attn_implementation)
        adapter, model_name, random_weights, runtime = loaded.adapter, loaded.name, loaded.random_weights, loaded.runtime
    else:  # a model built by the caller: where it is
        runtime = Runtime(adapter.model.device, adapter.model.dtype, opts.attn_implementation)
    text_config = adapter.config.text_config
    num_layers = text_config.num_hidden_layers
    names = opts.method_names()
    result = {"model": model_name or opts.model, "random_weights": bool(random_weights), "machine": machine,
              "runtime": runtime.describe(),
              "settings": {**asdict(opts), "methods": names},
              "metrics": "fidelity columns are proxies (agreement with the unreduced model), not task accuracy",
              "methods": {n: {"paper": METHODS[n].paper, "cuts": list(METHODS[n].cuts), "criterion": METHODS[n].criterion}
                          for n in names},
              "rows": [], "summary": []}
    total = len(clips) * len(names) * len(opts.retains)
    done = 0
    text = adapter.text_embeddings(opts.prompt) if any(get_method(n).uses_text for n in names) else None
    for video, clip in clips:
        prompt = adapter.prepare(clip.frames, opts.prompt, clip.timestamps)
        vision_times = []
        for _ in range(opts.repeats):
            runtime.synchronize()
            t0 = time.perf_counter()
            encoded = adapter.encode(prompt)
            runtime.synchronize()
            vision_times.append(time.perf_counter() - t0)
        vision_s = _median(vision_times)
        full = adapter.reduced_inputs(prompt, VisualTokens.unreduced(encoded.features, encoded.grid_hw), encoded)
        ref = reference(adapter, full, opts.steps)
        full_len = full.inputs_embeds.shape[1]
        for name in names:
            spec = get_method(name)
            plans = []
            for retain in opts.retains:
                options = reduction_options(SummarizeOptions(video="", method=name, retain=retain,
                                                             method_options=opts.method_options.get(name, {})))
                inner = method_inner(spec, retain, InnerConfig(), num_layers, **options)
                plans.append((retain, options, inner))
            runs_full: list[FirstToken] = []
            runs: dict[float, list[tuple[float, FirstToken]]] = {r: [] for r in opts.retains}
            reduced_inputs: dict[float, LLMInputs] = {}
            kept: dict[float, int] = {}
            for _ in range(opts.repeats):
                runs_full.append(time_first_token(adapter, full, None))
                for retain, options, inner in plans:
                    runtime.synchronize()
                    t0 = time.perf_counter()
                    tokens = reduce_tokens(name, encoded.features, encoded.attention, encoded.grid_hw, retain,
                                           text=text, **options)
                    inputs = adapter.reduced_inputs(prompt, tokens, encoded)
                    runtime.synchronize()
                    reduce_s = time.perf_counter() - t0
                    runs[retain].append((reduce_s, time_first_token(adapter, inputs, inner)))
                    reduced_inputs[retain], kept[retain] = inputs, len(tokens)
            full_prefill = _median([r.prefill_s for r in runs_full])
            full_ttft = vision_s + _median([r.llm_s for r in runs_full])
            for retain, _, inner in plans:
                inputs = reduced_inputs[retain]
                first = runs[retain][0][1]
                reduce_s = _median([r for r, _ in runs[retain]])
                prefill_s = _median([f.prefill_s for _, f in runs[retain]])
                ttft_s = vision_s + reduce_s + _median([f.llm_s for _, f in runs[retain]])
                visual_in = int(inputs.visual_mask.sum())
                text_tokens = inputs.inputs_embeds.shape[1] - visual_in
                fidelity = against(adapter, ref, inputs, inner, opts.steps)
                flops, flops_full = prefill_flops(text_config, first.tokens_by_layer), prefill_flops(text_config, full_len)
                result["rows"].append({
                    "video": video, "method": name, "retain": retain, "cuts": list(spec.cuts),
                    "kept_before_llm": kept[retain], "llm_visual_tokens": visual_in,
                    "visual_after_cuts": first.tokens_by_layer[-1] - text_tokens,
                    "llm_visual_tokens_unreduced": int(full.visual_mask.sum()),
                    "prefill_flops": flops, "prefill_flops_unreduced": flops_full, "flops_ratio": flops / flops_full,
                    "kv_bytes": first.kv_bytes, "kv_bytes_unreduced": runs_full[0].kv_bytes,
                    "vision_s": vision_s, "reduce_s": reduce_s, "prefill_s": prefill_s, "ttft_s": ttft_s,
                    "prefill_s_unreduced": full_prefill, "ttft_s_unreduced": full_ttft,
                    "prefill_speedup": full_prefill / max(prefill_s, 1e-9), "ttft_speedup": full_ttft / max(ttft_s, 1e-9),
                    **fidelity,
                })
                done += 1
                if progress:
                    progress("bench", done, total)
        result["summary"] = summarize_rows(result["rows"])
        write_outputs(result, Path(opts.out))
    return result


MEAN_FIELDS = ("kept_before_llm", "llm_visual_tokens", "visual_after_cuts", "prefill_flops", "flops_ratio", "kv_bytes",
               "kv_bytes_unreduced", "reduce_s", "prefill_s", "ttft_s", "prefill_s_unreduced", "ttft_s_unreduced",
               "prefill_speedup", "ttft_speedup", "kl_first_token", "kl_mean", "greedy_agreement",
               "teacher_forced_agreement", "hidden_cosine")


def summarize_rows(rows: list[dict]) -> list[dict]:
    """Means over videos per (method, retain), in first-seen order."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["retain"]), []).append(row)
    return [{"method": m, "retain": r, "cuts": g[0]["cuts"], "videos": len(g),
             **{f: sum(x[f] for x in g) / len(g) for f in MEAN_FIELDS}} for (m, r), g in groups.items()]


def markdown_table(result: dict) -> str:
    """The summary as a Markdown table, with the setting and the proxy caveat above it."""
    s = result["settings"]
    head = (f"Model `{result['model']}`{' (random weights)' if result['random_weights'] else ''}, "
            f"{len(s['videos'])} video(s) × {s['frames']} frames, {s['repeats']} repeats (medians), fidelity over "
            f"{s['steps']} answer tokens" + (f"; machine: {result['machine']}" if result.get("machine") else "")
            + (f"; {_runtime_text(result['runtime'])}" if result.get("runtime") else "") + ".\n"
            "Speedups are against the unreduced model measured in the same run. KL and agreement are fidelity "
            "proxies against the unreduced model" + (", on random weights: not task accuracy" if result["random_weights"]
                                                     else "") + ".\n\n")
    cols = ["method", "cuts", "retain", "LLM visual in", "visual after cuts", "prefill FLOPs", "KV cache",
            "reduce ms", "prefill ×", "TTFT ×", "KL first", "KL mean", "greedy agree", "TF agree"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["summary"]:
        lines.append("| " + " | ".join([
            r["method"], "+".join(r["cuts"]) or "—", f"{r['retain']:g}", f"{r['llm_visual_tokens']:.0f}",
            f"{r['visual_after_cuts']:.0f}", f"{r['flops_ratio']:.3f}",
            f"{r['kv_bytes'] / max(r['kv_bytes_unreduced'], 1):.3f}", f"{1000 * r['reduce_s']:.1f}",
            f"{r['prefill_speedup']:.2f}", f"{r['ttft_speedup']:.2f}", f"{r['kl_first_token']:.4f}",
            f"{r['kl_mean']:.4f}", f"{r['greedy_agreement']:.2f}", f"{r['teacher_forced_agreement']:.2f}"]) + " |")
    notes = "\n\nprefill FLOPs and KV cache are ratios to the unreduced model (1.000 = unchanged)."
    return head + "\n".join(lines) + notes + "\n"


def _runtime_text(runtime: dict) -> str:
    return ", ".join(x for x in (runtime.get("gpu") or runtime["device"], runtime["dtype"], runtime["attn_implementation"])
                     if x)


def plot_fidelity(result: dict, path: Path) -> None:
    """Fidelity vs prefill FLOPs, one line per method across its retain ratios: KL (left), agreement (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    colours = plt.get_cmap("tab20")
    by_method: dict[str, list[dict]] = {}
    for r in result["summary"]:
        by_method.setdefault(r["method"], []).append(r)
    for i, (method, rows) in enumerate(by_method.items()):
        rows = sorted(rows, key=lambda r: r["flops_ratio"])
        x = [r["flops_ratio"] for r in rows]
        style = dict(color=colours(i % 20), marker="os^Dv<>ph*"[i % 10], label=method)
        kl = [max(r["kl_mean"], 1e-6) for r in rows]
        agree = [r["teacher_forced_agreement"] for r in rows]
        left.plot(x, kl, **style)
        right.plot(x, agree, **style)
        for r, xi, k, a in zip(rows, x, kl, agree, strict=True):  # which point is which ratio
            left.annotate(f"{r['retain']:g}", (xi, k), fontsize=6, xytext=(3, 3), textcoords="offset points")
            right.annotate(f"{r['retain']:g}", (xi, a), fontsize=6, xytext=(3, 3), textcoords="offset points")
    left.set_yscale("log")
    left.set_ylabel("KL vs unreduced, mean over answer (nats, lower is better)")
    right.set_ylabel("top-1 agreement with unreduced, teacher-forced (higher is better)")
    for ax in (left, right):
        ax.set_xlabel("prefill FLOPs / unreduced")
        ax.grid(alpha=0.3)
    right.legend(fontsize=8, ncol=2, loc="lower right")
    proxy = " — random weights: fidelity is a proxy, not accuracy" if result["random_weights"] else ""
    fig.suptitle(f"{result['model']}: fidelity vs prefill FLOPs, retain {', '.join(f'{r:g}' for r in result['settings']['retains'])}{proxy}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["markdown"].write_text(markdown_table(result))
    if has_extra("plot"):
        plot_fidelity(result, paths["plot"])
    else:  # the table and the JSON hold every figure; the picture is optional
        del paths["plot"]
        result["plot_skipped"] = "matplotlib is not installed: pip install 'streamprune[plot]'"
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    return result["outputs"]
