"""Command line: `streamprune summarize | fidelity | batch | bench | methods | stream | policy eval`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings

import torch

from streamprune.encoder import ENCODER_METHODS, parse_encoder
from streamprune.errors import ConfigError, StreamPruneError
from streamprune.extras import require_extra
from streamprune.fidelity import run_fidelity
from streamprune.live import LIVE_CONTEXT_TOKENS, LiveOptions, run_stream
from streamprune.policy_eval import (
    CUTS,
    POLICIES,
    SELECTIONS,
    WARMUP_CHUNKS,
    PolicyEvalOptions,
    run_policy_eval,
)
from streamprune.reduce import METHODS
from streamprune.reduce.inner_cuts import InnerConfig
from streamprune.reduce.presets import resolve_method
from streamprune.runtime import out_of_memory
from streamprune.summarize import DEFAULT_PROMPT, SummarizeOptions, SummaryReport, summarize


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), like every other user error here."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    """Encoder-side reduction flags, shared by every command that runs a vision tower."""
    p.add_argument("--encoder", default="none", metavar="SPEC",
                   help=f"reduction inside the vision tower: {'|'.join(ENCODER_METHODS)}, or reuse+METHOD, each "
                        "with an optional :RATIO (e.g. reuse:0.9+tome:0.5) [none]")
    p.add_argument("--encoder-ratio", type=_ratio, default=None,
                   help="work the encoder skips: most patches reused per frame (reuse, in [0, 1]), or tokens merged "
                        "away by the last layer (merging, in [0, 1)) [reuse 1, merging 0.5]")
    p.add_argument("--reuse-threshold", type=_ratio, default=None,
                   help="a patch is recomputed when its pixels moved by more than this (mean, 0-255 levels) [8]")
    p.add_argument("--reuse-halo", type=int, default=None, help="also recompute patches this close to a changed one [1]")
    p.add_argument("--merge-schedule", default=None, metavar="SHAPE",
                   help="tokens merged per layer: constant (ToMe's default) or decreasing (more in early layers) "
                        "[constant]")


def _add_runtime_args(p: argparse.ArgumentParser, compile_flag: bool = False) -> None:
    """Where the model runs: device, dtype, attention kernels (every command that loads a model)."""
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="where the model runs: auto = a CUDA GPU when one is visible, else the CPU [auto]")
    p.add_argument("--dtype", default="auto", metavar="auto|bfloat16|float16|float32",
                   help="weights and activations: auto = bfloat16 on a GPU, float32 on the CPU [auto]")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"],
                   help="the model's attention kernels [sdpa]")
    if compile_flag:
        p.add_argument("--compile", action="store_true",
                       help="decode with a static KV cache and a torch.compile'd step (CUDA; the first call compiles, "
                            "later ones in the same process reuse it)")


def _runtime(args: argparse.Namespace) -> dict:
    return {"device": args.device, "dtype": args.dtype, "attn_implementation": args.attn_implementation}


def _encoder(args: argparse.Namespace):
    return parse_encoder(args.encoder, args.encoder_ratio, args.reuse_threshold, args.reuse_halo, args.merge_schedule)


def _add_video_and_reduction_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `summarize` and `fidelity`: input, model, outer and inner reduction."""
    p.add_argument("video", metavar="VIDEO", help="video file, or sample:NAME for a bundled sample (sample:bigbuckbunny)")
    _add_reduction_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def _add_reduction_args(p: argparse.ArgumentParser) -> None:
    """Model, sampling, outer and inner reduction, encoder flags (`summarize`, `fidelity`, `batch`)."""
    p.add_argument("--model", default="tiny", help="hub ID, local folder, or a tiny offline model: tiny (LLaVA-OneVision), "
                        "tiny-llava-video, tiny-qwen2.5-vl, tiny-qwen3-vl, tiny-smolvlm2 (random weights) [tiny]")
    p.add_argument("--method", default="holitom", metavar="METHOD",
                   help="reduction method (see `streamprune methods`), or a preset: a name in configs/methods/ or a "
                        ".yaml path [holitom]")
    p.add_argument("--retain", type=_ratio, default=0.1, help="fraction of visual tokens kept, in (0, 1] [0.1]")
    p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly [32]")
    p.add_argument("--fps", type=_ratio, default=None, help="sample at this rate instead (capped at --frames)")
    p.add_argument("--tau", type=_ratio, default=None, help="static-token similarity threshold [0.8; 0.65 at retain ≤ 0.1]")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="instruction given with the video")
    p.add_argument("--inner", default="none", choices=["holitom", "similarity", "fastv", "none"],
                   help="merging inside the LLM at layer K [none]")
    p.add_argument("--inner-layer", type=int, default=None,
                   help="K; default: HoliTom's 18 of 28 layers, scaled to the model's depth")
    p.add_argument("--inner-ratio", type=_ratio, default=0.5, help="fraction of visual tokens removed at K [0.5]")
    p.add_argument("--inner-merge", default="mean", choices=["mean", "pairwise"],
                   help="merged value: size-weighted mean, or HoliTom's running pairwise average [mean]")
    p.add_argument("--no-proportional-attention", dest="proportional_attention", action="store_false",
                   help="do not add log(size) to the attention logits of merged tokens (ToMe's proportional "
                        "attention, on by default)")
    _add_encoder_args(p)
    _add_runtime_args(p, compile_flag=True)


class _SimEnvNames:
    """`--env` choices: the names of `envs.sim.ENVS`, imported only when `policy eval` parses or prints help
    (importing lerobot would add ~2 s to every other command)."""

    def _names(self) -> list[str]:
        require_extra("vla", "policy eval")
        from envs.sim import ENVS

        return list(ENVS)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _version() -> str:
    """streamprune's version and the stack it runs on (what a bug report needs)."""
    import transformers

    from streamprune import __version__

    return f"streamprune {__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamprune", description="Token reduction for video LLMs and robot policies.",
                     epilog="exit status: 0 done; 1 `batch` with failed videos; 2 bad input (one `error:` line); "
                            "130 interrupted (Ctrl-C)")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="summarize a video with a compressed visual context",
                       description="Summarize a video: sample frames, reduce visual tokens (HoliTom), generate.")
    _add_video_and_reduction_args(s)
    s.add_argument("--max-new-tokens", type=int, default=64, help="length limit of the summary [64]")
    s.add_argument("--save-viz", metavar="PATH",
                   help="write an image of segments and kept/merged/dropped tokens, in the format its suffix "
                        "names: .png, .jpg/.jpeg or .webp (any other suffix is refused)")
    f = sub.add_parser("fidelity", help="how far a reduction moves the model's output (proxy metrics)",
                       description="Compare a reduced model with the unreduced one on the same video and prompt: "
                                   "KL of the first answer token, token agreement, hidden-state cosine.")
    _add_video_and_reduction_args(f)
    f.add_argument("--steps", type=int, default=32, help="answer tokens compared [32]")
    ba = sub.add_parser("batch", help="summarize many videos (Ray Data, or in-process), resumable",
                        description="Summarize a folder, glob or list of videos into one JSON line per video: decoding "
                                    "as Ray Data tasks, the vision tower and the LLM in an actor pool. Rerunning with "
                                    "the same --out skips videos already done and retries those that failed. Exit "
                                    "status: 0 when every video was summarized, 1 when any failed (each failure is "
                                    "a row with `error`), 2 for bad input (a missing source, an unusable --out).")
    ba.add_argument("sources", nargs="+", metavar="SOURCE", help="folders, globs, .txt/.csv lists of paths, or videos")
    ba.add_argument("--out", required=True, help="JSON-lines file the rows are appended to (not a folder)")
    ba.add_argument("--skip-failed", action="store_true",
                    help="on a rerun, also skip videos whose recorded row is an error (default: retry them)")
    _add_reduction_args(ba)
    ba.add_argument("--max-new-tokens", type=int, default=64, help="length limit of each summary [64]")
    ba.add_argument("--ray", default="auto", metavar="auto|local|none|ADDRESS",
                    help="Ray cluster: auto (a local one when Ray is installed, else in-process), local, none "
                         "(in-process), or a cluster address (HOST:6379, ray://HOST:10001) [auto]")
    ba.add_argument("--workers", type=int, default=1, help="model actors (each loads the model once) [1]")
    b = sub.add_parser("bench", help="compare reduction methods side by side on videos and a model",
                       description="Sweep methods × retain ratios: tokens, prefill FLOPs, KV bytes, reduction / prefill / "
                                   "TTFT times against the unreduced model in the same run, and fidelity proxies. "
                                   "Writes bench.json, bench.md and bench.png.")
    b.add_argument("videos", nargs="+", metavar="VIDEO", help="video files or sample:NAME")
    b.add_argument("--model", default="tiny", help="hub ID, local folder, or a tiny offline model [tiny]")
    b.add_argument("--methods", default=None, metavar="A,B,...",
                   help="methods or presets to compare [every registered method]")
    b.add_argument("--retain", default="0.25,0.1", metavar="R1,R2,...", help="retain ratios [0.25,0.1]")
    b.add_argument("--frames", type=int, default=16, help="frames sampled per video [16]")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported [3]")
    b.add_argument("--steps", type=int, default=8, help="answer tokens the fidelity proxies compare [8]")
    b.add_argument("--prompt", default=DEFAULT_PROMPT, help="instruction given with each video")
    b.add_argument("--out", default="out/bench", help="output folder, created if missing (not a file) [out/bench]")
    b.add_argument("--json", action="store_true", help="print the result JSON instead of the table")
    _add_runtime_args(b)
    sub.add_parser("methods", help="list the reduction methods: paper, where each cuts, criterion")
    st = sub.add_parser("stream", help="watch a live source with live token counts",
                        description="Stream a webcam, network stream, file or test pattern through the streaming "
                                    "engine: online segmentation, merging and incremental prefill.")
    st.add_argument("source", metavar="SOURCE",
                    help="file, sample:NAME, webcam[:N] or /dev/videoN, rtsp:// http(s):// udp:// tcp:// URL, "
                         "or synthetic[:static|moving-box]")
    st.add_argument("--model", default="tiny", help="hub ID, local folder, or a tiny offline model: tiny (LLaVA-OneVision), "
                    "tiny-llava-video, tiny-qwen2.5-vl, tiny-qwen3-vl, tiny-smolvlm2 (random weights) [tiny]")
    st.add_argument("--retain", type=_ratio, default=0.1, help="fraction of each segment's tokens kept [0.1]")
    st.add_argument("--ask", metavar="TEXT", help="question to answer from the stream")
    st.add_argument("--every", type=_ratio, metavar="SECONDS", help="ask every SECONDS of stream time once the first segment is cached (else once at the "
                         "end); each answer is printed in every view")
    st.add_argument("--max-context-tokens", type=_context_tokens, default="auto", metavar="N|none",
                    help="KV-cache budget in tokens; older segments are merged, then evicted; none: unbounded "
                         f"[{LIVE_CONTEXT_TOKENS} for a webcam, network URL or test pattern; unbounded for a file]")
    st.add_argument("--lookahead", type=int, default=8, help="token grids (frames; frame pairs on Qwen-VL) that must follow a segment "
                    "before it closes [8]")
    st.add_argument("--ui", choices=["terminal", "web", "none"], default=None,
                    help="live view [terminal on a TTY, else none]")
    st.add_argument("--port", type=int, default=0, help="web view port on 127.0.0.1 [any free]")
    st.add_argument("--json-lines", action="store_true", help="one JSON object per segment and answer on stdout")
    st.add_argument("--max-frames", type=int, help="stop after this many frames")
    st.add_argument("--realtime", action="store_true", help="pace a file or test pattern at its frame rate")
    _add_encoder_args(st)
    _add_runtime_args(st)
    pol = sub.add_parser("policy", help="pruned vision-language-action policies in simulation")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    ev = pol_sub.add_parser("eval", help="run a pruned VLA policy in a simulated environment",
                            description="Run a pruned lerobot policy (VLA-Pruner) in PushT, ALOHA or LIBERO: success rate, "
                                        "reward, per-chunk latency, tokens kept, and a video with kept tokens.")
    ev.add_argument("--policy", required=True, choices=POLICIES)
    ev.add_argument("--policy-path", default="tiny", help="hub ID, local folder, or 'tiny' (random weights) [tiny]")
    # a metavar, so that argparse lists the choices only when printing help
    ev.add_argument("--env", required=True, choices=_SimEnvNames(), metavar="ENV", help="simulated environment: %(choices)s")
    ev.add_argument("--episodes", type=int, default=1, help="episodes to run, seeds SEED, SEED+1, ... [1]")
    ev.add_argument("--retain", type=_ratio, default=0.25, help="fraction of visual tokens kept [0.25]")
    ev.add_argument("--cut", default="before", choices=CUTS,
                    help="prune before the VLM (prefix) or inside it at layer K [before]")
    ev.add_argument("--selection", default="vla_pruner", choices=SELECTIONS,
                    help="token selection: VLA-Pruner's dual-level, the semantic (FastV-style) or random baselines, "
                         "or action-only (ablation) [vla_pruner]")
    ev.add_argument("--warmup-chunks", type=int, default=WARMUP_CHUNKS, metavar="N",
                    help="the first N action chunks of each episode run unpruned while the action importance fills "
                         "its window (VLA-Pruner's W, also the smoothing window); reported apart [%(default)s]")
    ev.add_argument("--seed", type=int, default=0, help="seed of the first episode [0]")
    ev.add_argument("--max-steps", type=int, help="cap each episode at this many control steps [the env's episode length]")
    ev.add_argument("--n-action-steps", type=int,
                    help="actions executed per predicted chunk [the policy config's: 50 for SmolVLA, pi0, pi05]")
    ev.add_argument("--task-id", type=int, help="LIBERO only: the task of the suite [0]")
    ev.add_argument("--video", metavar="PATH", help="write the first episode as an mp4 with kept tokens overlaid")
    _add_encoder_args(ev)
    _add_runtime_args(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _context_tokens(text: str) -> int | str | None:
    """`stream --max-context-tokens`: a token count, "none" for an unbounded context, or "auto" (the default:
    bounded for a live source, see LiveOptions.context_budget)."""
    if text.lower() in ("none", "auto"):
        return None if text.lower() == "none" else "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or none, got {text!r}") from None


def _options(args: argparse.Namespace) -> SummarizeOptions:
    method, method_options, _ = resolve_method(args.method)
    return SummarizeOptions(video=getattr(args, "video", ""), model=args.model, method=method, method_options=method_options,
                            retain=args.retain,
                            frames=args.frames, fps=args.fps, prompt=args.prompt,
                            max_new_tokens=getattr(args, "max_new_tokens", 64), tau=args.tau,
                            save_viz=getattr(args, "save_viz", None),
                            inner=InnerConfig(mode=args.inner, layer=args.inner_layer, ratio=args.inner_ratio,
                                              merge=args.inner_merge, proportional=args.proportional_attention),
                            encoder=_encoder(args), compile=args.compile, **_runtime(args))


def _progress_bars(console):
    """A rich progress display and the (stage, done, total) callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(TextColumn("{task.description:<13}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)  # off a terminal, a
    # stopped bar still prints an empty line, which would precede an `error:` line
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    return bars, update


def print_report(report: SummaryReport, console) -> None:
    from rich.panel import Panel
    from rich.table import Table

    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    # untrained models emit arbitrary bytes: show control characters as · rather than garble the terminal
    shown = "".join(c if (c.isprintable() and c != "\ufffd") or c == "\n" else "·" for c in report.summary)
    console.print(Panel(shown or "(empty)", title="summary", expand=False), markup=False)
    tok, fl, tm = report.tokens, report.flops, report.timing_s
    reduction = "no reduction" if report.method == "none" else f"retain {report.retain:g}"
    title = f"{report.method} · {reduction}" + (f" · τ {report.tau:g}" if report.tau else "")
    if report.inner.get("proportional"):
        title += " · proportional attention"
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_column("", justify="left", style="dim")
    table.add_row("frames", str(report.frames), f"{len(report.segments)} segment{'s' * (len(report.segments) != 1)}")
    enc = report.encoder
    if enc["spec"] != "none":
        table.add_row("vision tower", f"{enc['spec']}",
                      f"{enc['computed_fraction']:.0%} of patches computed, {enc['keyframes']} of {enc['frames']} "
                      f"frames whole, {fl['vision'] / fl['vision_unreduced']:.0%} of the tower's FLOPs")
    per = "frame pair" if tok["token_grids"] < report.frames else "frame"
    table.add_row("vision tokens", f"{tok['vision']:,}", f"{tok['vision'] // max(tok['token_grids'], 1)} per {per}")
    table.add_row("after temporal merge", f"{tok['after_temporal_merge']:,}", f"{tok['after_temporal_merge'] / tok['vision']:.1%}")
    layout = f" (+{tok['layout']} newline{'s' * (tok['layout'] != 1)})" if tok["layout"] else ""
    table.add_row("into the LLM", f"{tok['llm_input']:,}", f"{tok['kept'] / tok['vision']:.1%}{layout}")
    table.add_row("prompt length", f"{tok['prompt']:,}", f"unreduced {tok['prompt_unreduced']:,}")
    if report.inner.get("mode", "none") != "none":
        inner = report.inner
        table.add_row(f"after layer {inner['layer']}", f"{tok['after_inner']:,}",
                      f"inner {inner['mode']}, ratio {inner['ratio']:g}")
    table.add_row("prefill FLOPs", f"{fl['prefill']:.3g}",
                  f"{fl['prefill'] / fl['prefill_unreduced']:.1%} of {fl['prefill_unreduced']:.3g} "
                  f"(papers' formula: {fl['prefill_fastv_formula'] / fl['prefill_unreduced_fastv_formula']:.1%})")
    table.add_row("KV cache", f"{report.kv_cache_bytes / 2**20:.2f} MiB",
                  f"unreduced {report.kv_cache_bytes_unreduced / 2**20:.2f} MiB")
    for key in ("decode_video", "vision", "reduce", "prefill", "ttft", "generate"):
        table.add_row(f"time {key.replace('_', ' ')}", f"{tm[key]:.3f} s",
                      {"ttft": "vision + reduce + prefill", "vision": f"{tm['vision'] / max(tm['ttft'], 1e-9):.0%} of ttft"}.get(key, ""))
    if "decode_per_token" in tm:
        table.add_row("time per answer token", f"{1000 * tm['decode_per_token']:.1f} ms",
                      "compiled decode, static KV cache" if report.runtime.get("compile") else "")
    table.add_row("generated", f"{report.generated_tokens} tokens", "")
    rt = report.runtime
    if rt:
        table.add_row("device", rt["device"], ", ".join(x for x in (rt.get("gpu"), rt["dtype"], rt["attn_implementation"]) if x))
    console.print(table)
    if report.viz:
        console.print(f"visualization: {report.viz}")
    if report.viz_encoder:
        console.print(f"recomputed patches: {report.viz_encoder}")


def _run_batch(args: argparse.Namespace, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from streamprune.batch import BatchOptions, run_batch

    opts = BatchOptions(sources=args.sources, out=args.out, summarize=_options(args), ray=args.ray,
                        workers=args.workers, skip_failed=args.skip_failed)
    columns = (TextColumn("videos"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("videos", total=None, status="")
        started = time.perf_counter()

        def update(done: int, failed: int, total: int, skipped: int) -> None:
            rate = 60 * (done + failed) / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=done + failed, total=total,
                       status=f"{failed} failed, {skipped} skipped, {rate:.1f}/min")

        return run_batch(opts, progress=update)


def _list(text: str, convert=str) -> list:
    try:
        return [convert(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"not a comma-separated list of numbers: {text!r}") from None


def _bench_options(args: argparse.Namespace):
    from streamprune.bench import BenchOptions

    methods, options = [], {}
    for value in _list(args.methods) if args.methods else []:
        name, method_options, _ = resolve_method(value)
        methods.append(name)
        options[name] = method_options
    return BenchOptions(videos=args.videos, model=args.model, methods=methods or None, retains=_list(args.retain, float),
                        frames=args.frames, repeats=args.repeats, steps=args.steps, prompt=args.prompt, out=args.out,
                        method_options=options, **_runtime(args))


def run_bench(opts, progress=None) -> dict:
    from streamprune.bench import run_bench as bench
    from streamprune.machine import describe

    return bench(opts, progress=progress, machine=describe())


def print_methods(console) -> None:
    from rich.table import Table

    table = Table(title="reduction methods (--method NAME)", show_lines=True)
    for col in ("method", "cuts", "criterion", "paper"):
        table.add_column(col, overflow="fold")
    for name in sorted(METHODS):
        m = METHODS[name]
        table.add_row(name, "+".join(m.cuts) or "—", m.criterion, m.paper)
    console.print(table)


def print_fidelity(result: dict, console) -> None:
    from rich.table import Table

    if result["random_weights"]:
        console.print("[yellow]note:[/] random weights: these numbers show how far reduction moves an untrained "
                      "model, a mechanics check rather than a quality estimate")
    inner = result["inner"]
    title = (f"encoder {result['encoder']['spec']} + " if result["encoder"]["spec"] != "none" else "") + \
        f"{result['method']} retain {result['retain']:g}" + (
        f" + inner {inner['mode']} (K={inner['layer']}, r={inner['ratio']:g})" if inner["mode"] != "none" else "")
    table = Table(title=f"fidelity vs unreduced: {title}", show_header=False)
    table.add_row("visual tokens into the LLM", f"{result['llm_input_tokens']:,} of {result['llm_input_tokens_unreduced']:,}")
    table.add_row("KL, first answer token", f"{result['kl_first_token']:.4g} nats")
    table.add_row(f"KL, mean over {result['steps']} tokens", f"{result['kl_mean']:.4g} nats")
    table.add_row("top-1 agreement (teacher-forced)", f"{result['teacher_forced_agreement']:.1%}")
    table.add_row("greedy agreement (free-running)", f"{result['greedy_agreement']:.1%}")
    table.add_row("final hidden-state cosine", f"{result['hidden_cosine']:.4f}")
    if result["encoder"]["spec"] != "none":
        table.add_row(f"visual-token cosine ({result['encoder']['spec']})", f"{result['vision_feature_cosine']:.4f}")
    console.print(table)
    console.print(f"[dim]{result['metrics']}[/]")


def print_policy_eval(result: dict, console) -> None:
    from rich.table import Table

    if result["random_weights"]:
        console.print("[yellow]note:[/] random weights: success and reward are meaningless; latency and tokens are real")
    applied = "" if not result.get("pruning_note") else " (never applied)"
    table = Table(title=f"{result['policy']} on {result['env']} · retain {result['retain']:g}{applied} · "
                        f"cut {result['cut']}", show_header=False)
    table.add_row("episodes", str(result["n_episodes"]))
    table.add_row("success rate", f"{result['success_rate']:.1%}")
    table.add_row("avg sum reward", f"{result['avg_sum_reward']:.3f}")
    for row in _phase_rows(result.get("phases")):
        table.add_row(*row)
    if result.get("mean_patches_computed") is not None:
        table.add_row("vision tower", f"{result['encoder']['spec']}",
                      f"{result['mean_patches_computed']:.0%} of image patches computed per chunk")
    if result.get("video_path"):
        table.add_row("video", str(result["video_path"]))
    console.print(table)
    if result.get("pruning_note"):
        console.print(f"[yellow]note:[/] {result['pruning_note']}")
    for episode in result["episodes"]:
        if episode.get("simulation_error"):
            console.print(f"[yellow]note:[/] episode with seed {episode['seed']} stopped by the simulator at "
                          f"{episode['simulation_error']} (counted as a failure)")


def _phase_rows(phases: dict | None) -> list[tuple[str, str]]:
    """Table rows for `policy eval`'s chunk phases: latency of pruned and warm-up chunks apart, and tokens
    as "16.0 of 64 (pruned chunks), 3 warm-up chunks at 64"."""
    if not phases:
        return []
    pruned, warmup = phases["pruned"], phases["warmup"]

    def chunks(n: int) -> str:
        return f"{n} chunk{'' if n == 1 else 's'}"

    rows = []
    for name, phase in (("pruned", pruned), ("warm-up", warmup)):
        if phase["latency_p50_s"] is not None:
            rows.append((f"chunk latency, {name} ({chunks(phase['chunks'])})",
                         f"p50 {phase['latency_p50_s'] * 1000:.0f} ms · p95 {phase['latency_p95_s'] * 1000:.0f} ms"))
    if warmup["mean_tokens_kept"] is not None:
        at = f"{chunks(warmup['chunks']).replace('chunk', 'warm-up chunk')} at {warmup['mean_tokens_kept']:.0f}"
        tokens = (f"none pruned; {at}" if pruned["mean_tokens_kept"] is None else
                  f"{pruned['mean_tokens_kept']:.1f} of {pruned['mean_tokens_total']:.0f} (pruned chunks), {at}")
        rows.append(("visual tokens per chunk", tokens))
    return rows


def main(argv: list[str] | None = None) -> int:
    # simulator packages import pkg_resources, which warns on every run; nothing a user can act on
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    try:
        args = build_parser().parse_args(argv)
    except StreamPruneError as exc:  # e.g. policy eval's --env choices without the [vla] extra
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    from rich.console import Console

    err = Console(stderr=True)
    try:
        bars, update = _progress_bars(err)
        if args.command == "summarize":
            with bars:
                report = summarize(_options(args), progress=update)
            if args.json:
                print(json.dumps(report.to_dict()))
            else:
                print_report(report, Console())
        elif args.command == "stream":
            ui = args.ui or ("terminal" if sys.stderr.isatty() and not args.json_lines else "none")
            run_stream(LiveOptions(source=args.source, model=args.model, retain=args.retain, ask=args.ask,
                                   every=args.every, max_context_tokens=args.max_context_tokens,
                                   lookahead=args.lookahead, ui=ui, json_lines=args.json_lines,
                                   max_frames=args.max_frames, realtime=args.realtime, port=args.port,
                                   encoder=_encoder(args), **_runtime(args)))
        elif args.command == "policy":
            opts = PolicyEvalOptions(policy=args.policy, env=args.env, policy_path=args.policy_path,
                                     episodes=args.episodes, retain=args.retain, cut=args.cut,
                                     selection=args.selection, seed=args.seed, max_steps=args.max_steps,
                                     n_action_steps=args.n_action_steps, warmup_chunks=args.warmup_chunks,
                                     task_id=args.task_id, video=args.video,
                                     encoder=_encoder(args), **_runtime(args))
            # lerobot and the simulators print to stdout; keep stdout for our report alone
            with bars, contextlib.redirect_stdout(sys.stderr):
                result = run_policy_eval(opts, progress=lambda done, total: update("steps", done, total))
            if args.json:
                print(json.dumps(result))
            else:
                print_policy_eval(result, Console())
        elif args.command == "batch":
            report = _run_batch(args, err)
            print(f"{report.done} summarized, {report.failed} failed, {report.skipped} skipped (already in {report.out}) "
                  f"of {report.total} videos in {report.seconds:.1f} s, {report.videos_per_minute:.1f} videos/min "
                  f"[{report.engine}]" + (f"; exit 1: {report.failed} failed (see their `error` rows)"
                                          if report.failed else ""))
            return 1 if report.failed else 0
        elif args.command == "bench":
            opts = _bench_options(args)
            with bars:
                result = run_bench(opts, progress=update)
            if args.json:
                print(json.dumps(result))
            else:
                from streamprune.bench import markdown_table

                print(markdown_table(result))
                print(f"wrote {', '.join(result['outputs'].values())}")
        elif args.command == "methods":
            print_methods(Console())
        elif args.command == "fidelity":
            if args.steps < 1:
                raise ConfigError(f"--steps must be at least 1, got {args.steps}")
            with bars:
                result = run_fidelity(_options(args), steps=args.steps, progress=update)
            if args.json:
                print(json.dumps(result))
            else:
                print_fidelity(result, Console())
        return 0
    except StreamPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except torch.OutOfMemoryError as exc:
        oom = out_of_memory(exc, f"`{args.command}` run")
        print(f"error: {oom}", file=sys.stderr)
        return oom.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
