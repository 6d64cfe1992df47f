"""TTFT and prefill speed-up of HoliTom on Qwen2.5-VL-3B / SmolVLM2-500M dimensions, side by side with unreduced.

Random weights at the real checkpoints' dimensions (speed does not depend on weight values). Per video,
in one process: the vision tower (its work is the same for every configuration; `--vision-repeats` runs,
interleaved with each `--encoder` SPEC's, the fastest counts), then each
configuration's prefill to the first token, `--repeats` times, interleaved in alternating order; medians.
TTFT = vision + reduction + prefill to the first token.

Fidelity proxies against the unreduced model (not task accuracy; random weights): KL of the first answer
token's distribution, mean KL and top-1 agreement over `--steps` teacher-forced answer positions (the
unreduced model's greedy answer). With `--encoder SPEC` the tower runs again with encoder-side reduction
(on Qwen, `streamprune.encoder.qwen_tower`), its own vision time enters its rows' TTFT, and the rows give
the tower output's mean cosine to the full encode. On Qwen2.5-VL each retain ratio runs twice: reduced tokens keeping
their original 3-D M-RoPE positions, and the naive alternative, every row renumbered 1-D like text.

    .venv/bin/python -m benchmarks.bench_models --model qwen2.5-vl-3b
    .venv/bin/python -m benchmarks.bench_models --model smolvlm2-500m
    .venv/bin/python -m benchmarks.bench_models --model qwen2.5-vl-3b --max-pixels 200704 --retain 0.1 \
        --encoder reuse+tome reuse+tome:0.7 --merge-schedule decreasing --vision-repeats 2 \
        --out benchmarks/results/models_qwen2.5-vl-3b_encoder.json   # encoder-side reduction inside Qwen's ViT
    .venv/bin/python -m benchmarks.bench_models --model tiny-qwen2.5-vl --steps 16 --videos bigbuckbunny bikes \
        carphone_distorted carphone_pristine      # the positions ablation on a model that reacts to positions
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.machine import describe
from streamprune.encoder import parse_encoder
from streamprune.models.tiny import CONFIG_DIR
from streamprune.reduce import reduce_tokens
from streamprune.reduce.holitom import default_tau
from streamprune.sources import read_video
from streamprune.sources.samples import sample_video_path
from streamprune.summarize import DEFAULT_PROMPT, PrefillProbe

NO_TEMPORAL_MERGE = 1.01  # τ above any cosine: no token is static

MODELS = {  # name → (adapter module, spec, default frames)
    "qwen2.5-vl-3b": ("streamprune.models.qwen2_5_vl:Qwen2_5_VLAdapter", "qwen2.5-vl-3b-dims.yaml", 16),
    "smolvlm2-500m": ("streamprune.models.smolvlm2:SmolVLM2Adapter", "smolvlm2-500m-dims.yaml", 32),
    # the tiny models: their timings mean nothing, but their wide random decoders react to positions, which
    # makes the 3-D-positions-vs-1-D ablation informative (the near-uniform outputs at real dims are not)
    "tiny-qwen2.5-vl": ("streamprune.models.qwen2_5_vl:Qwen2_5_VLAdapter", "tiny-qwen2.5-vl.yaml", 16),
    "tiny-qwen3-vl": ("streamprune.models.qwen3_vl:Qwen3VLAdapter", "tiny-qwen3-vl.yaml", 16),
}


def build(name: str, spec: str | None = None):
    import importlib

    path, default_spec, _ = MODELS[name]
    module, cls = path.split(":")
    module = importlib.import_module(module)
    model, processor = module.build_random(Path(spec) if spec else CONFIG_DIR / default_spec)
    return getattr(module, cls)(model, processor)


@torch.no_grad()
def time_to_first_token(adapter, inputs) -> tuple[float, float]:
    """(prefill s, prefill + first token s) of one greedy step."""
    probe = PrefillProbe(adapter.language_model)
    t0 = time.perf_counter()
    with probe.installed():
        adapter.generate(inputs, 1, logits_processor=[probe])
    return probe.prefill_s, probe.first_token_at - t0


@torch.no_grad()
def greedy_with_logprobs(adapter, inputs, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unreduced model's greedy answer [1, steps] and its log-probs [steps, V] (from the cached
    decode: one prefill, not a second teacher-forced one)."""
    positions = {} if inputs.position_ids is None else {"position_ids": inputs.position_ids}
    out = adapter.model.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                 max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, **positions)
    return out.sequences, F.log_softmax(torch.stack(out.logits, 1)[0].float(), -1)


@torch.no_grad()
def answer_logprobs(adapter, inputs, answer: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probs [steps, V] at the answer positions."""
    logits = adapter.forward(inputs, answer[:, :-1], logits_to_keep=answer.shape[1]).logits[0]
    return F.log_softmax(logits.float(), -1)


def fidelity(ref: torch.Tensor, red: torch.Tensor) -> dict:
    kl = (ref.exp() * (ref - red)).sum(-1)
    return {"kl_first_token": round(float(kl[0]), 4), "kl_mean": round(float(kl.mean()), 4),
            "top1_agreement": round(float((ref.argmax(-1) == red.argmax(-1)).float().mean()), 3)}


def run_video(adapter, video: str, args, positions_ablation: bool) -> dict:
    clip = read_video(sample_video_path(video), num_frames=args.frames)
    prompt = adapter.prepare(clip.frames, DEFAULT_PROMPT, clip.timestamps)
    # the tower, unreduced and with each --encoder SPEC, timed --vision-repeats times interleaved; the fastest
    # run counts (a shared machine's load only ever adds time)
    encoders = {spec: parse_encoder(spec, schedule=args.merge_schedule) for spec in args.encoder}
    vision_samples: dict[str, list[float]] = {"full": [], **{spec: [] for spec in encoders}}
    encodings = {}
    for rep in range(args.vision_repeats):
        for key in list(vision_samples) if rep % 2 == 0 else reversed(list(vision_samples)):
            t0 = time.perf_counter()
            encodings[key] = (adapter.encode(prompt) if key == "full"
                              else adapter.encode(prompt, encoder=adapter.vision_encoder(encoders[key])))
            vision_samples[key].append(round(time.perf_counter() - t0, 2))
            print(f"  repeat {rep}: vision {key}: {vision_samples[key][-1]:.1f} s", flush=True)
    encoded = encodings["full"]
    vision_s = min(vision_samples["full"])
    print(f"{video}: vision {vision_s:.1f} s, {encoded.features.shape[0]}×{encoded.features.shape[1]} tokens",
          flush=True)

    # "exact": temporal merging off, so the LLM gets exactly retain·T·N tokens, as it would from a trained
    # tower on a busy video (random towers give near-identical frames, which HoliTom merges far below budget)
    configs = {"unreduced": ("none", 1.0, None, "full")}
    for r in args.retain:
        configs |= {f"holitom@{r:g}": ("holitom", r, default_tau(r), "full"),
                    f"holitom@{r:g} exact": ("holitom", r, NO_TEMPORAL_MERGE, "full")}
    encodings = {key: (enc, min(vision_samples[key])) for key, enc in encodings.items()}
    for spec in args.encoder:  # encoder-side reduction, then HoliTom at the exact budget
        configs |= {f"{spec} + holitom@{r:g} exact": ("holitom", r, NO_TEMPORAL_MERGE, spec) for r in args.retain}
    rows, inputs = {}, {}
    for key, (method, retain, tau, source) in configs.items():
        enc, seconds = encodings[source]
        t0 = time.perf_counter()
        tokens = reduce_tokens(method, enc.features, enc.attention, enc.grid_hw, retain,
                               **({"tau": tau} if method == "holitom" else {}))
        reduce_s = time.perf_counter() - t0
        inputs[key] = adapter.reduced_inputs(prompt, tokens, enc)
        rows[key] = {"tokens_into_llm": int(inputs[key].visual_mask.sum()),
                     "seq_len": inputs[key].inputs_embeds.shape[1], "reduce_s": round(reduce_s, 4),
                     "vision_s": round(seconds, 2), "prefill_samples_s": [], "first_token_samples_s": []}
        if source != "full":
            rows[key]["vision_feature_cosine"] = round(float(F.cosine_similarity(
                enc.features.float(), encoded.features.float(), -1).mean()), 4)
            rows[key]["patches_computed"] = round(enc.encoder.computed_fraction, 3)
            rows[key]["vision_flops_ratio"] = round(enc.encoder.flops / enc.encoder.flops_full, 3)
            rows[key]["vision_samples_s"] = vision_samples[source]
            rows[key]["encoder"] = encoders[source].summary()
    for rep in range(args.repeats):
        for key in (list(inputs) if rep % 2 == 0 else list(reversed(inputs))):
            prefill, first = time_to_first_token(adapter, inputs[key])
            rows[key]["prefill_samples_s"].append(round(prefill, 3))
            rows[key]["first_token_samples_s"].append(round(first, 3))
            print(f"  repeat {rep}: {key:<14} prefill {prefill:7.2f} s", flush=True)

    reference, ref_logp = greedy_with_logprobs(adapter, inputs["unreduced"], args.steps)
    base = rows["unreduced"]
    base_prefill = statistics.median(base["prefill_samples_s"])
    base_ttft = vision_s + base["reduce_s"] + statistics.median(base["first_token_samples_s"])
    for key, row in rows.items():
        prefill = statistics.median(row["prefill_samples_s"])
        ttft = row["vision_s"] + row["reduce_s"] + statistics.median(row["first_token_samples_s"])
        row.update(prefill_s=round(prefill, 3), prefill_speedup=round(base_prefill / prefill, 2),
                   ttft_s=round(ttft, 2), ttft_speedup=round(base_ttft / ttft, 3),
                   **(fidelity(ref_logp, answer_logprobs(adapter, inputs[key], reference)) if key != "unreduced"
                      else {}))
    if positions_ablation:  # same tokens, positions renumbered 1-D: fidelity only (the cost is the same)
        adapter.keep_3d_positions = False
        try:
            for key, (method, retain, tau, source) in configs.items():
                if method == "none" or source != "full":
                    continue
                tokens = reduce_tokens(method, encoded.features, encoded.attention, encoded.grid_hw, retain, tau=tau)
                naive = adapter.reduced_inputs(prompt, tokens, encoded)
                rows[f"{key} naive 1-D positions"] = {"tokens_into_llm": int(naive.visual_mask.sum()),
                                                      **fidelity(ref_logp, answer_logprobs(adapter, naive, reference))}
        finally:
            adapter.keep_3d_positions = True
    return {"frames": args.frames, "vision_samples_s": vision_samples["full"], "token_grids": encoded.features.shape[0], "grid_hw": list(encoded.grid_hw),
            "vision_tokens": encoded.features.shape[0] * encoded.features.shape[1],
            "vision_s": round(vision_s, 2), "vision_share_of_unreduced_ttft": round(vision_s / base_ttft, 3),
            "configs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), required=True)
    parser.add_argument("--videos", nargs="+", default=["bigbuckbunny", "carphone_pristine"])
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--retain", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="teacher-forced answer positions for the proxies")
    parser.add_argument("--out", default=None)
    parser.add_argument("--encoder", nargs="*", default=[], metavar="SPEC",
                        help="also run encoder-side reduction SPEC (e.g. reuse+tome:0.9), then HoliTom")
    parser.add_argument("--merge-schedule", default=None, choices=["constant", "decreasing"],
                        help="ToMe's schedule for the --encoder specs' merging [constant]")
    parser.add_argument("--vision-repeats", type=int, default=1,
                        help="time the tower (unreduced and each --encoder) this many times, interleaved; fastest")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="cap on pixels per frame for Qwen (its processor's max_pixels); default: the spec's")
    parser.add_argument("--spec", default=None, help="another spec of the same model (e.g. a tiny one, to smoke-test)")
    args = parser.parse_args()
    args.frames = args.frames or MODELS[args.model][2]
    out = Path(args.out or f"benchmarks/results/models_{args.model}.json")

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    adapter = build(args.model, args.spec)
    if args.max_pixels:
        adapter.processor.video_processor.size["longest_edge"] = args.max_pixels
    print(f"built random-weight {args.model} in {time.perf_counter() - t0:.0f} s", flush=True)
    report = {"machine": describe(), "model": f"{args.model} dimensions, random weights, fp32, sdpa",
              "max_pixels_per_frame": args.max_pixels,
              "protocol": __doc__.split("\n\n")[1].replace("\n", " "), "videos": {}}
    for video in args.videos:
        report["videos"][video] = run_video(adapter, video, args, positions_ablation=hasattr(adapter, "keep_3d_positions"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))  # partial results survive an interrupted run
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
