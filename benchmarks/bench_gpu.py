"""streamprune on one GPU at real 7B dimensions (random weights, bf16): where the time to first token goes,
what each reduction saves, and how fast answers decode.

Run by hand on a machine with a CUDA GPU: `make bench-gpu` (under 8 minutes on one H200). Speed does not depend
on weight values, so random weights at the checkpoints' dimensions measure what the real models spend.

Models: LLaVA-OneVision-7B (SigLIP-so400m + Qwen2-7B) and Qwen2.5-VL-7B (32-block windowed ViT + Qwen2-7B
text), both built from configs/models/*-7b-dims.yaml. Frames come pre-decoded from a .npz (no video decoder
needed on the GPU machine; `--make-frames` writes one from a sample video where PyAV is installed).

Per model and frame count (32, 64), in one process, after a warm-up, medians of `--repeats` interleaved runs:
- vision tower, reduction (the method, then the prompt layout), LLM prefill and time to first token (vision +
  reduction + prefill up to the first token), unreduced and with HoliTom at retain 0.25 / 0.1, speed-ups against
  unreduced measured side by side;
- decode ms per answer token: the transformers `generate` default (dynamic cache) and, for LLaVA-OV-7B at
  32 frames, `--compile` (static cache, compiled step, CUDA graphs);
- peak GPU memory of each setting;
- every registered method at retain 0.25 / 0.1 on the LLaVA-OV-7B 32-frame features: its reduce time on the GPU,
  prefill and TTFT;
- the encoder modes on the SigLIP model (reuse, tome:0.9 with the decreasing schedule, both), each followed by
  HoliTom at 0.1.
Writes benchmarks/results/gpu/bench_gpu.{json,md}, rewritten after each section, so a stopped run keeps what it
measured. Times use `torch.cuda.synchronize()` around host clocks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

from streamprune.encoder import parse_encoder
from streamprune.models.base import LLMInputs, VideoLLMAdapter
from streamprune.models.generation import generate_static
from streamprune.models.tiny import CONFIG_DIR
from streamprune.reduce import METHODS, get_method, reduce_tokens
from streamprune.reduce.holitom import default_tau
from streamprune.reduce.inner_cuts import InnerConfig, method_inner
from streamprune.runtime import resolve_runtime
from streamprune.summarize import DEFAULT_PROMPT, PrefillProbe
from streamprune.tokens import VisualTokens

RESULTS = Path(__file__).parent / "results" / "gpu"
FRAMES_FILE = Path("out") / "bench_gpu_frames.npz"
SIDE = 256  # stored frame side: the processors resize to 384 / 448 (keeps the carried file small)


# ------------------------------------------------------------------------------------------------ models
@contextmanager
def default_device(device: torch.device, dtype: torch.dtype):
    """Build modules directly on the GPU in the run's dtype (a 7B model in fp32 on the host takes minutes)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


SMOKE = {  # --smoke: the same script at toy widths (real geometry), to check it on a CPU before a GPU run
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 512},
    "llava_onevision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "qwen2_5_vl": {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                   "fullatt_block_indexes": [1, 3]},
}


def load_spec(spec_path: Path, smoke: bool) -> Path:
    """The spec file to build from; with `smoke`, a copy at toy widths (same geometry and layout)."""
    if not smoke:
        return spec_path
    spec = yaml.safe_load(spec_path.read_text())
    spec["text_config"].update(SMOKE["text_config"])
    if "mrope_section" in str(spec["text_config"].get("rope_parameters")):
        spec["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 3]  # head_dim 16
    spec["vision_config"].update(SMOKE[spec["model_type"]])
    path = Path("out") / f"smoke-{spec_path.name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def build_llava_onevision(spec_path: Path, device: torch.device, dtype: torch.dtype) -> VideoLLMAdapter:
    from transformers import AutoProcessor, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from streamprune.models.llava_onevision import LlavaOnevisionAdapter
    from streamprune.models.tiny import tiny_model_dir

    spec = yaml.safe_load(spec_path.read_text())
    processor = AutoProcessor.from_pretrained(tiny_model_dir())  # same geometry, byte-level tokenizer
    tok = processor.tokenizer
    config = LlavaOnevisionConfig(text_config=spec["text_config"], vision_config=spec["vision_config"],
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  tie_word_embeddings=spec["text_config"].get("tie_word_embeddings", False))
    torch.manual_seed(spec.get("seed", 0))
    with default_device(device, dtype):
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # random weights: answers run to max_new_tokens
    return LlavaOnevisionAdapter(model, processor)


def build_qwen(spec_path: Path, device: torch.device, dtype: torch.dtype) -> VideoLLMAdapter:
    from streamprune.models.qwen2_5_vl import Qwen2_5_VLAdapter, build_random

    with default_device(device, dtype):
        model, processor = build_random(spec_path)
    return Qwen2_5_VLAdapter(model.eval(), processor)


MODELS: dict[str, tuple[Callable, str]] = {
    "llava-onevision-7b": (build_llava_onevision, "llava-onevision-7b-dims.yaml"),
    "qwen2.5-vl-7b": (build_qwen, "qwen2.5-vl-7b-dims.yaml"),
}


# ------------------------------------------------------------------------------------------------ frames
def make_frames(path: Path, video: str = "sample:bigbuckbunny", count: int = 64) -> None:
    """Decode `count` frames of `video` (needs PyAV), resize to SIDE×SIDE and store them as a .npz."""
    from PIL import Image

    from streamprune.sources import read_video, resolve_video_arg

    clip = read_video(resolve_video_arg(video), num_frames=count)
    small = np.stack([np.asarray(Image.fromarray(f).resize((SIDE, SIDE), Image.BICUBIC)) for f in clip.frames])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, frames=small, timestamps=clip.timestamps, video=np.array(video))


def load_frames(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    return data["frames"], data["timestamps"]


# ------------------------------------------------------------------------------------------------ timing
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


@torch.no_grad()
def first_token(adapter: VideoLLMAdapter, inputs: LLMInputs, inner: InnerConfig | None) -> tuple[float, float, list[int]]:
    """(prefill s, s from entering generate to the first token, tokens per layer) of a one-token generate."""
    probe = PrefillProbe(adapter.language_model)
    num_layers = adapter.config.text_config.num_hidden_layers
    seq = inputs.inputs_embeds.shape[1]
    sync()
    t0 = time.perf_counter()
    with adapter.inner_stage(inputs, inner) as stage, probe.installed():
        adapter.generate(inputs, 1, logits_processor=[probe])
    llm = (probe.first_token_at or time.perf_counter()) - t0
    by_layer = stage.tokens_by_layer(num_layers, seq) if stage else [seq] * num_layers
    return probe.prefill_s or 0.0, llm, by_layer


@torch.no_grad()
def decode_ms(adapter: VideoLLMAdapter, inputs: LLMInputs, inner: InnerConfig | None, tokens: int,
              compile: bool = False) -> float:
    """Milliseconds per answer token after the first, greedy, `tokens` long."""
    probe = PrefillProbe(adapter.language_model)
    with adapter.inner_stage(inputs, inner) as stage, probe.installed():
        if compile:
            out = generate_static(adapter, inputs, tokens, logits_processor=[probe], stage=stage, compile=True)
        else:
            out = adapter.generate(inputs, tokens, logits_processor=[probe])
    sync()
    end = time.perf_counter()
    return 1000 * (end - probe.first_token_at) / max(out.shape[1] - 1, 1)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------ sections
def reduction_options(method: str, retain: float) -> dict:
    return {"tau": default_tau(retain)} if method == "holitom" else {}


def reduce_and_layout(adapter, prompt, encoded, method: str, retain: float, text=None):
    """(reduce s, reduce + layout s, LLMInputs, tokens)."""
    options = reduction_options(method, retain)
    t_reduce, tokens = timed(lambda: reduce_tokens(method, encoded.features, encoded.attention, encoded.grid_hw,
                                                   retain, text=text, **options))
    t_layout, inputs = timed(lambda: adapter.reduced_inputs(prompt, tokens, encoded))
    return t_reduce, t_reduce + t_layout, inputs, tokens


def ttft_section(adapter, prompt, args, record: Callable[[dict], None]) -> dict:
    """Vision, HoliTom at each retain, prefill and TTFT against unreduced; returns the encoded video."""
    num_layers = adapter.config.text_config.num_hidden_layers
    for _ in range(2):  # warm-up: cuBLAS handles, allocator, kernels
        encoded = adapter.encode(prompt)
        full = adapter.reduced_inputs(prompt, VisualTokens.unreduced(encoded.features, encoded.grid_hw), encoded)
        first_token(adapter, full, None)
    vision = []
    for _ in range(args.repeats):
        t, encoded = timed(lambda: adapter.encode(prompt))
        vision.append(t)
    vision_s = median(vision)
    full = adapter.reduced_inputs(prompt, VisualTokens.unreduced(encoded.features, encoded.grid_hw), encoded)
    rows = {"unreduced": [], **{r: [] for r in args.retain}}
    inputs_at: dict[float, LLMInputs] = {}
    inner_at: dict[float, InnerConfig] = {}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):
        reset_peak()
        prefill, llm, _ = first_token(adapter, full, None)
        rows["unreduced"].append((0.0, 0.0, prefill, llm))
        peaks["unreduced"] = peak_gib()
        for retain in args.retain:
            reset_peak()
            reduce_s, with_layout, inputs, _ = reduce_and_layout(adapter, prompt, encoded, "holitom", retain)
            inner = method_inner(get_method("holitom"), retain, InnerConfig(), num_layers)
            prefill, llm, _ = first_token(adapter, inputs, inner)
            rows[retain].append((reduce_s, with_layout, prefill, llm))
            inputs_at[retain], inner_at[retain] = inputs, inner
            peaks[f"holitom {retain:g}"] = peak_gib()
    base_ttft = vision_s + median([r[3] for r in rows["unreduced"]])
    out = {"vision_ms": 1000 * vision_s, "visual_tokens": int(full.visual_mask.sum()),
           "unreduced": {"prefill_ms": 1000 * median([r[2] for r in rows["unreduced"]]),
                         "ttft_ms": 1000 * base_ttft, "peak_gib": peaks["unreduced"]}}
    for retain in args.retain:
        reduce_s = median([r[0] for r in rows[retain]])
        with_layout = median([r[1] for r in rows[retain]])
        ttft = vision_s + with_layout + median([r[3] for r in rows[retain]])
        out[f"holitom {retain:g}"] = {
            "llm_visual_tokens": int(inputs_at[retain].visual_mask.sum()), "reduce_ms": 1000 * reduce_s,
            "reduce_layout_ms": 1000 * with_layout, "prefill_ms": 1000 * median([r[2] for r in rows[retain]]),
            "ttft_ms": 1000 * ttft, "ttft_speedup": base_ttft / ttft,
            "prefill_speedup": median([r[2] for r in rows["unreduced"]]) / median([r[2] for r in rows[retain]]),
            "peak_gib": peaks[f"holitom {retain:g}"]}
    record(out)
    if args.decode_tokens:
        low = min(args.retain)
        out["decode_ms_per_token"] = {
            "unreduced generate": decode_ms(adapter, full, None, args.decode_tokens),
            f"holitom {low:g} generate": decode_ms(adapter, inputs_at[low], inner_at[low], args.decode_tokens)}
        record(out)
    return {"encoded": encoded, "full": full, "inputs": inputs_at, "inner": inner_at, "base_ttft": base_ttft,
            "vision_s": vision_s, "section": out}


def compiled_decode(adapter, state: dict, args, record: Callable[[dict], None]) -> None:
    """Decode ms/token with --compile at the lowest retain (the first call compiles; timed on later calls)."""
    low = min(args.retain)
    inputs, inner = state["inputs"][low], state["inner"][low]
    t_compile, _ = timed(lambda: decode_ms(adapter, inputs, inner, args.decode_tokens, compile=True))
    runs = [decode_ms(adapter, inputs, inner, args.decode_tokens, compile=True) for _ in range(args.repeats)]
    state["section"]["decode_ms_per_token"][f"holitom {low:g} --compile"] = median(runs)
    state["section"]["compile_first_call_s"] = t_compile
    record(state["section"])


def methods_section(adapter, prompt, state: dict, args) -> list[dict]:
    """Every registered method at each retain on the same features: reduce time, prefill, TTFT."""
    encoded, num_layers = state["encoded"], adapter.config.text_config.num_hidden_layers
    text = adapter.text_embeddings(DEFAULT_PROMPT)
    rows = []
    for name in sorted(METHODS):
        if name == "none":
            continue
        for retain in args.retain:
            try:
                runs = []
                for _ in range(args.repeats + 1):  # the first is a warm-up
                    reduce_s, with_layout, inputs, _ = reduce_and_layout(adapter, prompt, encoded, name, retain, text)
                    inner = method_inner(get_method(name), retain, InnerConfig(), num_layers,
                                         **reduction_options(name, retain))
                    prefill, llm, by_layer = first_token(adapter, inputs, inner)
                    runs.append((reduce_s, with_layout, prefill, llm))
                runs = runs[1:]
                ttft = state["vision_s"] + median([r[1] for r in runs]) + median([r[3] for r in runs])
                rows.append({"method": name, "retain": retain, "cuts": list(METHODS[name].cuts),
                             "llm_visual_tokens": int(inputs.visual_mask.sum()),
                             "reduce_ms": 1000 * median([r[0] for r in runs]),
                             "reduce_layout_ms": 1000 * median([r[1] for r in runs]),
                             "prefill_ms": 1000 * median([r[2] for r in runs]), "ttft_ms": 1000 * ttft,
                             "ttft_speedup": state["base_ttft"] / ttft})
            except Exception as exc:  # noqa: BLE001 — one broken method must not cost the whole GPU run
                rows.append({"method": name, "retain": retain, "error": f"{type(exc).__name__}: {exc}"[:300]})
                traceback.print_exc()
            print(f"  {name} {retain:g}: {rows[-1].get('reduce_ms', rows[-1].get('error'))}", flush=True)
    return rows


def encoder_section(adapter, prompt, state: dict, args) -> list[dict]:
    """Encoder-side reduction on the SigLIP tower, each followed by HoliTom at the lowest retain."""
    low, num_layers = min(args.retain), adapter.config.text_config.num_hidden_layers
    inner = method_inner(get_method("holitom"), low, InnerConfig(), num_layers)
    rows = []
    for spec in args.encoders:
        try:
            config = parse_encoder(spec, None, None, None, "decreasing" if "tome" in spec else None)
            encoder = adapter.vision_encoder(config)
            runs = []
            for _ in range(args.repeats + 1):
                encoder.reset()
                t_vision, encoded = timed(lambda enc=encoder: adapter.encode(prompt, encoder=enc))
                reduce_s, with_layout, inputs, _ = reduce_and_layout(adapter, prompt, encoded, "holitom", low)
                prefill, llm, _ = first_token(adapter, inputs, inner)
                runs.append((t_vision, with_layout, prefill, llm))
            runs = runs[1:]
            stats = encoded.encoder.to_dict() if encoded.encoder else {}
            ttft = median([r[0] for r in runs]) + median([r[1] for r in runs]) + median([r[3] for r in runs])
            rows.append({"encoder": spec, "schedule": config.merge_schedule, "vision_ms": 1000 * median([r[0] for r in runs]),
                         "computed_fraction": stats.get("computed_fraction"), "flops_ratio": stats.get("flops_ratio"),
                         "prefill_ms": 1000 * median([r[2] for r in runs]), "ttft_ms": 1000 * ttft,
                         "ttft_speedup": state["base_ttft"] / ttft})
        except Exception as exc:  # noqa: BLE001
            rows.append({"encoder": spec, "error": f"{type(exc).__name__}: {exc}"[:300]})
            traceback.print_exc()
        print(f"  encoder {spec}: {rows[-1].get('ttft_speedup', rows[-1].get('error'))}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ report
def markdown(result: dict) -> str:
    lines = [f"# streamprune on {result['runtime'].get('gpu') or result['runtime']['device']}",
             "", f"{result['runtime']['dtype']}, {result['runtime']['attn_implementation']}, torch {result['torch']}, "
             f"transformers {result['transformers']}; random weights at real dimensions; medians of "
             f"{result['settings']['repeats']} after warm-up; TTFT = vision + reduction + prefill to the first token.",
             ""]
    for key, section in result["ttft"].items():
        lines += [f"## {key}", "", "| setting | LLM visual tokens | vision ms | reduce ms | prefill ms | TTFT ms | "
                  "TTFT × | peak GiB |", "|---|---|---|---|---|---|---|---|"]
        u = section["unreduced"]
        lines.append(f"| unreduced | {section['visual_tokens']:,} | {section['vision_ms']:.1f} | – | {u['prefill_ms']:.1f} | "
                     f"{u['ttft_ms']:.1f} | 1.00 | {u['peak_gib']:.1f} |")
        for name, row in section.items():
            if name.startswith("holitom"):
                lines.append(f"| {name} | {row['llm_visual_tokens']:,} | {section['vision_ms']:.1f} | "
                             f"{row['reduce_ms']:.2f} (+layout {row['reduce_layout_ms'] - row['reduce_ms']:.2f}) | "
                             f"{row['prefill_ms']:.1f} | {row['ttft_ms']:.1f} | {row['ttft_speedup']:.2f} | "
                             f"{row['peak_gib']:.1f} |")
        if "decode_ms_per_token" in section:
            lines += ["", "Decode, ms per answer token: " + ", ".join(
                f"{k} {v:.1f}" for k, v in section["decode_ms_per_token"].items())
                + (f" (compiling took {section['compile_first_call_s']:.0f} s on the first call)"
                   if "compile_first_call_s" in section else "")]
        lines.append("")
    if result.get("methods"):
        lines += [f"## Every method on {result['methods_on']}", "",
                  "| method | cuts | retain | LLM visual in | reduce ms | + layout ms | prefill ms | TTFT ms | TTFT × |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["methods"]:
            if "error" in r:
                lines.append(f"| {r['method']} | | {r['retain']:g} | error: {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['method']} | {'+'.join(r['cuts'])} | {r['retain']:g} | {r['llm_visual_tokens']:,} | "
                         f"{r['reduce_ms']:.2f} | {r['reduce_layout_ms']:.2f} | {r['prefill_ms']:.1f} | "
                         f"{r['ttft_ms']:.1f} | {r['ttft_speedup']:.2f} |")
        lines.append("")
    if result.get("encoders"):
        lines += [f"## Encoder-side reduction on {result['encoders_on']} (then HoliTom {min(result['settings']['retain']):g})", "",
                  "| --encoder | schedule | vision ms | patches computed | tower FLOPs | prefill ms | TTFT ms | TTFT × |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["encoders"]:
            if "error" in r:
                lines.append(f"| {r['encoder']} | error: {r['error']} | | | | | | |")
                continue
            lines.append(f"| {r['encoder']} | {r['schedule']} | {r['vision_ms']:.1f} | {r['computed_fraction'] or 1:.0%} | "
                         f"{r['flops_ratio'] or 1:.0%} | {r['prefill_ms']:.1f} | {r['ttft_ms']:.1f} | {r['ttft_speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--frames", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--retain", nargs="+", type=float, default=[0.25, 0.1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32, help="answer length for decode timing (0: skip)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decode (saves its compile time)")
    parser.add_argument("--no-methods", action="store_true")
    parser.add_argument("--encoders", nargs="*", default=["reuse", "tome:0.9", "reuse+tome:0.9"])
    parser.add_argument("--frames-file", type=Path, default=FRAMES_FILE)
    parser.add_argument("--make-frames", action="store_true", help="decode the sample video into --frames-file first")
    parser.add_argument("--smoke", action="store_true", help="toy widths: check the script quickly on any machine")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.make_frames or not args.frames_file.exists() or len(load_frames(args.frames_file)[0]) < max(args.frames):
        try:
            make_frames(args.frames_file, count=max(args.frames))
        except ImportError as exc:  # e.g. a GPU image without PyAV
            raise SystemExit(f"error: decoding the sample needs PyAV ({exc}); make {args.frames_file} with "
                             "`--make-frames` where PyAV is installed and copy it here") from None
    frames, timestamps = load_frames(args.frames_file)
    runtime = resolve_runtime(args.device, args.dtype)
    import transformers

    result = {"runtime": runtime.describe(), "torch": torch.__version__, "transformers": transformers.__version__,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "ttft": {}, "methods": [], "encoders": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        (args.out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
        (args.out / "bench_gpu.md").write_text(markdown(result))

    t_start = time.perf_counter()
    for name in args.models:
        build, spec = MODELS[name]
        spec_path = load_spec(CONFIG_DIR / spec, args.smoke)
        t0 = time.perf_counter()
        adapter = build(spec_path, runtime.device, runtime.dtype)
        print(f"{name}: built in {time.perf_counter() - t0:.0f} s", flush=True)
        for count in args.frames:
            key = f"{name}, {count} frames"
            prompt = adapter.prepare(frames[:count] if count <= len(frames) else frames, DEFAULT_PROMPT,
                                     timestamps[:count])

            def record(section: dict, key: str = key) -> None:
                result["ttft"][key] = section
                write()

            state = ttft_section(adapter, prompt, args, record)
            print(f"{key}: {json.dumps(state['section'])[:400]} ({time.perf_counter() - t_start:.0f} s)", flush=True)
            first = count == min(args.frames)
            if first and name == "llava-onevision-7b":
                if args.decode_tokens and not args.no_compile and runtime.cuda:
                    try:
                        compiled_decode(adapter, state, args, record)
                    except Exception as exc:  # noqa: BLE001
                        state["section"]["compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
                        traceback.print_exc()
                        record(state["section"])
                if not args.no_methods:
                    result["methods_on"] = key
                    result["methods"] = methods_section(adapter, prompt, state, args)
                    write()
                if args.encoders:
                    result["encoders_on"] = key
                    result["encoders"] = encoder_section(adapter, prompt, state, args)
                    write()
            del state
        del adapter
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - t_start
    write()
    print((args.out / "bench_gpu.md").read_text())
    print(f"done in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
