"""Outer- and inner-LLM reduction at the real LLaVA-OneVision-0.5B dimensions (random weights), side by side.

Run by hand (`make bench`); takes ~10 minutes on 2 cores. Speed does not depend on weight values, so a
random-weight model at the checkpoint's dimensions measures what the real one would.

One process, one video, one vision pass (reduction happens after the tower, so every configuration
shares it); the LLM prefill of each configuration is timed in interleaved repeats and compared by
median. TTFT = vision + reduction + prefill.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from streamprune.flops import fastv_prefill_flops, prefill_flops
from streamprune.models.base import LLMInputs, VideoLLMAdapter
from streamprune.models.llava_onevision import LlavaOnevisionAdapter
from streamprune.models.tiny import byte_level_tokenizer, tiny_model_dir
from streamprune.reduce import reduce_tokens, temporal_segments
from streamprune.reduce.holitom import default_tau
from streamprune.reduce.inner_cuts import InnerConfig, default_layer
from streamprune.sources import read_video, sample_video_path
from streamprune.summarize import cache_bytes

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf (reference notes, transformers_internals §3.1)
TEXT_0_5B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, rope_theta=1000000.0,
                 tie_word_embeddings=True, max_position_embeddings=32768)
VISION_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, num_hidden_layers=26, num_attention_heads=16,
                     intermediate_size=4304, image_size=384, patch_size=14)


def build_model() -> LlavaOnevisionAdapter:
    from transformers import AutoProcessor, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    tok = byte_level_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    config = LlavaOnevisionConfig(text_config=TEXT_0_5B, vision_config=VISION_SO400M,
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # the tiny model's processor has the same geometry (384 px, 196 tokens/frame) and a compatible tokenizer
    return LlavaOnevisionAdapter(model, AutoProcessor.from_pretrained(tiny_model_dir()))


def other_cores_busy(seconds: float = 0.5) -> float:
    """Cores used by other processes during a short window (the machine is shared)."""
    def snapshot():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        return sum(fields[:3]) + fields[5] + fields[6], own

    (busy0, own0), t0 = snapshot(), time.time()
    time.sleep(seconds)
    (busy1, own1), t1 = snapshot(), time.time()
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / 100 / (t1 - t0))


@torch.no_grad()
def time_prefill(adapter: VideoLLMAdapter, inputs: LLMInputs) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = adapter.model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, use_cache=True,
                        logits_to_keep=1)
    return time.perf_counter() - t0, cache_bytes(out.past_key_values)


NO_TEMPORAL_MERGE = 1.01  # τ above any cosine: every token is dynamic, so exactly retain·T·N enter the LLM


def configurations(retains: list[float], k: int) -> dict:
    """label → (outer method, retain, τ, inner config or None).

    Random-weight SigLIP features barely change between frames, so HoliTom's temporal merge alone
    removes far more than the budget; the "exact budget" rows turn temporal merging off so the LLM gets
    exactly retain·T·N tokens, as it would from a trained tower on a busy video. Inner rows time merging
    alone; what proportional attention adds is measured by benchmarks/bench_proportional.py.
    """
    configs = {"unreduced": ("none", 1.0, None, None)}
    for r in retains:
        configs[f"holitom@{r:g}"] = ("holitom", r, default_tau(r), None)
        configs[f"holitom@{r:g} exact budget"] = ("holitom", r, NO_TEMPORAL_MERGE, None)
        for mode in ("holitom", "similarity", "fastv"):
            configs[f"holitom@{r:g} exact + inner {mode}"] = ("holitom", r, NO_TEMPORAL_MERGE,
                                                             InnerConfig(mode=mode, layer=k, ratio=0.5,
                                                                         proportional=False))
    return configs


def per_layer(result: dict, k: int, text_config) -> list[int]:
    return [result["seq_len"]] * k + [result["after_inner"]] * (text_config.num_hidden_layers - k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--retain", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--out", default="benchmarks/results/prefill_0.5b.json")
    args = parser.parse_args()

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    adapter = build_model()
    print(f"built random-weight LLaVA-OV-0.5B dims in {time.perf_counter() - t0:.0f} s")
    clip = read_video(sample_video_path("bigbuckbunny"), num_frames=args.frames)
    prompt = adapter.prepare(clip.frames, "Describe what happens in this video in a few sentences.")

    print(f"vision tower on {args.frames} frames (other cores busy before: {other_cores_busy():.2f}) ...", flush=True)
    t0 = time.perf_counter()
    encoded = adapter.encode(prompt)
    vision_s = time.perf_counter() - t0
    print(f"vision {vision_s:.1f} s")

    text_config = adapter.config.text_config
    k = default_layer(text_config.num_hidden_layers)
    configs = configurations(args.retain, k)
    results = {}
    inputs = {}
    for key, (method, retain, tau, _) in configs.items():
        options = {"tau": tau} if method == "holitom" else {}
        reduce_s = []
        for _ in range(args.repeats):  # reduction is cheap; time it several times
            t0 = time.perf_counter()
            tokens = reduce_tokens(method, encoded.features, encoded.attention, encoded.grid_hw, retain, **options)
            reduce_s.append(time.perf_counter() - t0)
        inputs[key] = adapter.reduced_inputs(prompt, tokens)
        results[key] = {"reduce_s": reduce_s, "prefill_s": [], "tokens_in": len(tokens) + 1,
                        "segments": len(tokens.segments), "seq_len": inputs[key].inputs_embeds.shape[1]}

    for rep in range(args.repeats):
        order = list(inputs) if rep % 2 == 0 else list(reversed(inputs))  # interleave, alternate order
        for key in order:
            busy = other_cores_busy(0.3)
            with adapter.inner_stage(inputs[key], configs[key][3]) as stage:
                seconds, kv = time_prefill(adapter, inputs[key])
            results[key]["prefill_s"].append(seconds)
            results[key]["kv_cache_bytes"] = kv
            results[key]["after_inner"] = stage.tokens_after if stage else results[key]["seq_len"]
            results[key].setdefault("other_cores_busy", []).append(round(busy, 2))
            print(f"  repeat {rep}: {key:<34} prefill {seconds:6.2f} s  (other cores {busy:.2f})", flush=True)

    # segmentation speed at 64 frames × 196 tokens
    feats64 = torch.cat([encoded.features, encoded.features.flip(0)])[:64]
    seg_times = []
    for _ in range(20):
        t0 = time.perf_counter()
        temporal_segments(feats64, tau=0.8)
        seg_times.append(time.perf_counter() - t0)

    base = results["unreduced"]
    base_prefill = statistics.median(base["prefill_s"])
    base_ttft = vision_s + statistics.median(base["reduce_s"]) + base_prefill
    summary = {}
    for key, r in results.items():
        prefill = statistics.median(r["prefill_s"])
        reduce_s = statistics.median(r["reduce_s"])
        ttft = vision_s + reduce_s + prefill
        summary[key] = {
            "tokens_into_llm": r["tokens_in"], "seq_len": r["seq_len"], "segments": r["segments"],
            "prefill_s": round(prefill, 3), "prefill_speedup": round(base_prefill / prefill, 2),
            "ttft_s": round(ttft, 2), "ttft_speedup": round(base_ttft / ttft, 3),
            "reduce_s": round(reduce_s, 4), "reduce_share_of_unreduced_ttft": round(reduce_s / base_ttft, 5),
            "after_inner": r["after_inner"],
            "flops_ratio_real_arch": round(prefill_flops(text_config, base["seq_len"])
                                           / prefill_flops(text_config, per_layer(r, k, text_config)), 2),
            "flops_ratio_fastv_formula": round(fastv_prefill_flops(text_config, base["seq_len"])
                                               / fastv_prefill_flops(text_config, per_layer(r, k, text_config)), 2),
            "kv_cache_mib": round(r["kv_cache_bytes"] / 2**20, 1),
            "prefill_samples_s": [round(x, 2) for x in r["prefill_s"]],
            "other_cores_busy": r["other_cores_busy"],
        }
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": "LLaVA-OneVision-0.5B dimensions, random weights, fp32, sdpa",
        "video": f"bigbuckbunny.mp4, {args.frames} frames", "vision_s": round(vision_s, 1),
        "segmentation_64x196_ms": round(1000 * statistics.median(seg_times), 2),
        "inner_layer": k,
        "configs": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
