"""`streamprune summarize`: video → vision tower → outer-LLM reduction → LLM → summary and report."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamprune.encoder import EncoderConfig
from streamprune.errors import ConfigError
from streamprune.flops import fastv_prefill_flops, kv_cache_bytes_per_token, prefill_flops
from streamprune.models import LoadedModel, load_video_llm
from streamprune.models.base import EncodedVideo, LLMInputs, PromptInputs
from streamprune.models.cache_compat import output_cache
from streamprune.models.generation import check_compilable
from streamprune.paths import IMAGE_SUFFIXES, check_output_file
from streamprune.reduce import METHODS, get_method, reduce_tokens
from streamprune.reduce.holitom import default_tau
from streamprune.reduce.inner_cuts import InnerConfig, method_inner, validate
from streamprune.runtime import resolve_runtime
from streamprune.sources import VideoClip, read_video, resolve_video_arg
from streamprune.tokens import VisualTokens

DEFAULT_PROMPT = "Describe what happens in this video in a few sentences."

# progress(stage, done, total): the CLI draws bars from it; None runs silently
ProgressFn = Callable[[str, int, int], None]


@dataclass
class SummarizeOptions:
    video: str
    model: str = "tiny"
    method: str = "holitom"
    retain: float = 0.1
    frames: int = 32
    fps: float | None = None
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 64
    tau: float | None = None
    save_viz: str | None = None
    inner: InnerConfig = field(default_factory=InnerConfig)
    method_options: dict = field(default_factory=dict)  # the method's own options (configs/methods/*.yaml)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # encoder-side reduction (parse_encoder)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: a visible GPU, else the CPU)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (auto: bf16 on a GPU, fp32 on the CPU)
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 | eager
    compile: bool = False  # decode over a static KV cache with a compiled step (CUDA)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not 0.0 < self.retain <= 1.0:
            raise ConfigError(f"--retain must be in (0, 1], got {self.retain}")
        if self.frames < 1:
            raise ConfigError(f"--frames must be at least 1, got {self.frames}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.tau is not None and not -1.0 <= self.tau <= 1.0:
            raise ConfigError(f"--tau is a cosine similarity threshold in [-1, 1], got {self.tau}")
        resolve_runtime(self.device, self.dtype, self.attn_implementation)  # a bad value fails before any work
        if self.save_viz:  # before decoding: a bad path must not cost the run
            check_output_file(self.save_viz, "--save-viz", IMAGE_SUFFIXES)


@dataclass
class SummaryReport:
    video: str
    model: str
    random_weights: bool
    method: str
    retain: float
    tau: float | None
    frames: int
    timestamps: list[float]
    segments: list[list[int]]
    tokens: dict[str, int]
    flops: dict[str, float]
    inner: dict
    encoder: dict
    timing_s: dict[str, float]
    kv_cache_bytes: int
    kv_cache_bytes_unreduced: int
    summary: str
    generated_tokens: int
    viz: str | None = None
    viz_encoder: str | None = None  # with temporal reuse: which patches the vision tower recomputed
    notes: list[str] = field(default_factory=list)
    runtime: dict = field(default_factory=dict)  # device, dtype, GPU, attention implementation, compiled decode

    def to_dict(self) -> dict:
        return asdict(self)


class PrefillProbe:
    """Times the LLM's first forward (the prefill) and measures the KV cache it leaves, from hooks on
    the language model; `first_token` is stamped by a logits processor when the first token is chosen."""

    def __init__(self, language_model: torch.nn.Module) -> None:
        self.language_model = language_model
        self.prefill_s: float | None = None
        self.kv_cache_bytes = 0
        self.first_token_at: float | None = None
        self.steps = 0
        self.on_step: Callable[[int], None] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # a LogitsProcessor
        if self.first_token_at is None:
            synchronize(scores)
            self.first_token_at = time.perf_counter()
        self.steps += 1
        if self.on_step:
            self.on_step(self.steps)
        return scores

    @contextmanager
    def installed(self):
        started: list[float] = []

        def before(module, args, kwargs):
            if self.prefill_s is None:
                synchronize(*args, *kwargs.values())
                started.append(time.perf_counter())

        def after(module, args, kwargs, output):
            if self.prefill_s is None:
                synchronize(output.last_hidden_state)
                self.prefill_s = time.perf_counter() - started[0]
                self.kv_cache_bytes = cache_bytes(output_cache(output))

        handles = [self.language_model.register_forward_pre_hook(before, with_kwargs=True),
                   self.language_model.register_forward_hook(after, with_kwargs=True)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def synchronize(*values: object) -> None:
    """Wait for the GPU work queued on the first CUDA tensor among `values`, so that a host clock read next
    times it (device work is asynchronous); nothing on the CPU."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.is_cuda:
                torch.cuda.synchronize(value.device)
            return


def cache_bytes(cache) -> int:
    """Bytes held by a transformers KV cache (all layers, keys and values)."""
    if cache is None:
        return 0
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


@dataclass
class EncodedRun:
    """Everything up to the reduction: the sampled clip, the loaded model, the prompt and vision output."""

    clip: VideoClip
    loaded: LoadedModel
    prompt: PromptInputs
    encoded: EncodedVideo
    inner_layer: int
    timing: dict[str, float]
    inner: InnerConfig  # the user's inner config with the method's own cuts inside the LLM


def decode_clip(opts: SummarizeOptions, progress: ProgressFn | None = None) -> tuple[VideoClip, dict[str, float]]:
    """Validate the options and decode the video's sampled frames. Returns the clip and its timing."""
    opts.validate()
    video_path = resolve_video_arg(opts.video)
    t0 = time.perf_counter()
    clip = read_video(video_path, num_frames=opts.frames, fps=opts.fps, progress=_stage(progress, "decode video"))
    return clip, {"decode_video": time.perf_counter() - t0}


def encode_clip(opts: SummarizeOptions, clip: VideoClip, timing: dict[str, float], loaded: LoadedModel | None = None,
                progress: ProgressFn | None = None) -> EncodedRun:
    """Load the model (unless `loaded` is given: a server or a batch worker reuses one), format the prompt and
    run the vision tower on a decoded clip."""
    loaded = loaded or load_video_llm(opts.model, opts.device, opts.dtype, opts.attn_implementation)
    num_layers = loaded.adapter.config.text_config.num_hidden_layers
    inner = method_inner(get_method(opts.method), opts.retain, opts.inner, num_layers, **opts.method_options)
    inner_layer = validate(inner, num_layers)
    prompt = loaded.adapter.prepare(clip.frames, opts.prompt, clip.timestamps)
    encoder = loaded.adapter.vision_encoder(opts.encoder) if opts.encoder.active else None
    if opts.compile:
        check_compilable(loaded.runtime.device, loaded.runtime.attn_implementation, inner.kv is not None)
    synchronize(prompt.pixel_values_videos)
    t0 = time.perf_counter()
    encoded = loaded.adapter.encode(prompt, progress=_stage(progress, "vision tower"), encoder=encoder)
    synchronize(encoded.features)
    timing = {**timing, "vision": time.perf_counter() - t0}
    return EncodedRun(clip, loaded, prompt, encoded, inner_layer, timing, inner)


def encode_video(opts: SummarizeOptions, progress: ProgressFn | None = None,
                 loaded: LoadedModel | None = None) -> EncodedRun:
    """Decode the video, load the model (unless given), format the prompt and run the vision tower."""
    clip, timing = decode_clip(opts, progress)
    return encode_clip(opts, clip, timing, loaded, progress)


def reduction_options(opts: SummarizeOptions, adapter=None) -> dict:
    """Options for `reduce_tokens`: the method's own options, HoliTom's τ (the authors' default for the ratio
    unless given), and the question's embeddings for methods that read it (given the model's `adapter`)."""
    options = dict(opts.method_options)
    if opts.method == "holitom" and opts.retain < 1.0:
        options["tau"] = opts.tau if opts.tau is not None else options.get("tau", default_tau(opts.retain))
    if adapter is not None and get_method(opts.method).uses_text:
        options["text"] = adapter.text_embeddings(opts.prompt)
    return options


def inner_summary(inner: InnerConfig, layer: int, installed: bool) -> dict:
    """What the inner stage did, for reports: cuts at K (one or a schedule), KV pruning, proportional attention."""
    merging = installed and inner.merging
    steps = [{"layer": st.layer, "ratio": round(st.ratio, 4), "criterion": st.criterion, "action": st.action}
             for st in (inner.steps if merging else ())]
    mode = "schedule" if steps else inner.mode if merging else "none"
    return {"mode": mode, "layer": layer if merging else None,
            "ratio": (steps[0]["ratio"] if steps else inner.ratio) if merging else 0.0,
            # fastv prunes: it has no merge mode to report
            "merge": inner.merge if merging and not steps and inner.mode != "fastv" else None, "steps": steps,
            "kv": ({"layer": inner.kv.layer, "ratio": inner.kv.ratio, "refresh": inner.kv.refresh}
                   if installed and inner.kv else None),
            "proportional": installed and inner.proportional}


def _stage(progress: ProgressFn | None, stage: str):
    return (lambda done, total: progress(stage, done, total)) if progress else None


def summarize(opts: SummarizeOptions, progress: ProgressFn | None = None,
              loaded: LoadedModel | None = None) -> SummaryReport:
    """Run the whole pipeline once and report what each stage did and cost (on `loaded`, if given)."""
    return finish(opts, encode_video(opts, progress, loaded), progress)


def finish(opts: SummarizeOptions, run: EncodedRun, progress: ProgressFn | None = None) -> SummaryReport:
    """After the vision tower: reduce, generate, and report (and draw `--save-viz`)."""
    clip, loaded, prompt, encoded, inner_layer, timing = (run.clip, run.loaded, run.prompt, run.encoded,
                                                          run.inner_layer, run.timing)
    adapter = loaded.adapter

    t0 = time.perf_counter()
    options = reduction_options(opts, adapter)
    tau = options.get("tau")
    tokens = reduce_tokens(opts.method, encoded.features, encoded.attention, encoded.grid_hw, opts.retain, **options)
    synchronize(tokens.features)
    timing["reduce"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs = adapter.reduced_inputs(prompt, tokens, encoded)
    probe = PrefillProbe(adapter.language_model)
    if progress:
        probe.on_step = lambda n: progress("generate", n, opts.max_new_tokens)
    with adapter.inner_stage(inputs, run.inner) as stage, probe.installed():
        new_ids = adapter.generate(inputs, opts.max_new_tokens, logits_processor=[probe], compile=opts.compile,
                                   stage=stage)
    synchronize(new_ids)
    timing["prefill"] = probe.prefill_s or 0.0
    timing["ttft"] = timing["vision"] + timing["reduce"] + ((probe.first_token_at or time.perf_counter()) - t0)
    timing["generate"] = time.perf_counter() - t0
    decode_tokens = new_ids.shape[1] - 1
    if decode_tokens > 0 and probe.first_token_at is not None:
        timing["decode_per_token"] = (t0 + timing["generate"] - probe.first_token_at) / decode_tokens

    seq_len = inputs.inputs_embeds.shape[1]
    num_layers = adapter.config.text_config.num_hidden_layers
    per_layer = stage.tokens_by_layer(num_layers, seq_len) if stage else [seq_len] * num_layers
    inner = inner_summary(run.inner, inner_layer, installed=stage is not None)
    report = _report(opts, loaded, clip, tokens, inputs, prompt.input_ids.shape[1], per_layer, tau, inner, timing,
                     probe.kv_cache_bytes, adapter.decode(new_ids), new_ids.shape[1], encoded)
    if opts.save_viz:
        from streamprune.viz import render_reduction

        reduction = "no reduction" if opts.method == "none" else f"retain {opts.retain:g}"
        title = f"{Path(clip.path).name} · {opts.method} {reduction}" + (f" τ={tau:g}" if tau else "")
        step = adapter.frames_per_grid  # one picture per token grid (its first frame)
        render_reduction(clip.frames[::step], tokens, timestamps=clip.timestamps[::step], title=title,
                         path=opts.save_viz, newlines=report.tokens["layout"])
        report.viz = str(opts.save_viz)
        if opts.encoder.reuse is not None and encoded.recomputed is not None:
            from streamprune.viz import render_recomputed

            path = Path(opts.save_viz)
            report.viz_encoder = str(path.with_name(path.stem + "_encoder" + path.suffix))
            # one row per token grid (a frame pair on Qwen): shown on each of its frames
            recomputed = np.repeat(encoded.recomputed.cpu().numpy(), adapter.frames_per_grid, 0)[:len(clip.frames)]
            grid = getattr(adapter, "patch_grid", None) or (adapter.patch_side, adapter.patch_side)
            render_recomputed(clip.frames, recomputed, grid,
                              title=f"{Path(clip.path).name} · vision tower with --encoder {opts.encoder.name}",
                              path=report.viz_encoder)
    return report


def _report(opts: SummarizeOptions, loaded, clip, tokens: VisualTokens, inputs: LLMInputs, full_len: int,
            per_layer: list[int], tau: float | None, inner: dict, timing: dict[str, float], kv_bytes: int,
            summary: str, generated: int, encoded: EncodedVideo) -> SummaryReport:
    text_config = loaded.adapter.config.text_config
    vision_tokens = tokens.num_frames * tokens.tokens_per_frame
    notes = []
    if loaded.random_weights:
        notes.append("random weights: the model is untrained, so the summary text is noise; "
                     "token counts, FLOPs and timing ratios are real")
    return SummaryReport(
        video=str(clip.path),
        model=loaded.name,
        random_weights=loaded.random_weights,
        method=opts.method if opts.retain < 1.0 else "none",
        retain=opts.retain,
        tau=tau,
        frames=len(clip.frames),
        timestamps=[round(float(t), 3) for t in clip.timestamps],
        segments=[[s, e] for s, e in tokens.segments],
        tokens={
            "vision": vision_tokens,
            "after_temporal_merge": tokens.after_temporal,
            "token_grids": tokens.num_frames,  # frames, or frame pairs for Qwen2.5-VL
            "kept": len(tokens),
            "llm_input": int(inputs.visual_mask.sum()),  # the kept tokens plus layout tokens (newlines)
            "layout": int(inputs.visual_mask.sum()) - len(tokens),
            "prompt": per_layer[0],
            "after_inner": per_layer[-1],  # sequence length from the inner-merge layer on
            "prompt_unreduced": full_len,
        },
        flops={
            "prefill": prefill_flops(text_config, per_layer),
            "prefill_unreduced": prefill_flops(text_config, full_len),
            "prefill_fastv_formula": fastv_prefill_flops(text_config, per_layer),
            "prefill_unreduced_fastv_formula": fastv_prefill_flops(text_config, full_len),
            "vision": encoded.encoder.flops,
            "vision_unreduced": encoded.encoder.flops_full,
        },
        inner=inner,
        encoder={**opts.encoder.summary(), **encoded.encoder.to_dict()},
        timing_s={k: round(v, 4) for k, v in timing.items()},
        kv_cache_bytes=kv_bytes,
        kv_cache_bytes_unreduced=kv_cache_bytes_per_token(text_config) * full_len,
        summary=summary,
        generated_tokens=generated,
        notes=notes,
        runtime={**loaded.runtime.describe(), "compile": opts.compile},
    )
