"""Encoder-side reduction on SmolVLA at real dimensions (random weights): per-chunk latency, vision time, patches
computed and action fidelity, on the observations of a simulated rollout.

Run by hand (`make bench-vla-encoder`; ~15 minutes on 2 cores). Protocol:
1. Reference rollout: the unreduced policy (retain 1.0, encoder none: the unmodified lerobot policy) drives
   the env from seed s for `--chunks` chunks of `--steps-per-chunk` executed actions each (fixed flow-matching
   noise, actions clipped to the env's bounds); the observation at every chunk boundary is kept
   (`bench_vla_fidelity.reference_episode`).
2. Every variant is its own policy instance with the reference's weights, so its reuse state follows the
   episode; per chunk, the variants run one after another on the same observation and noise (interleaved,
   alternating order), each chunk timed (`predict_action_chunk`) with the vision tower timed inside it.
3. Reported per variant: median chunk latency and its ratio to the unreduced one (chunks after the first of
   each episode: the first is a keyframe for every variant), median vision time, patches the tower computed,
   and action MSE / cosine against the unreduced chunk (all chunks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_vla_fidelity import mean_se, reference_episode
from benchmarks.machine import describe
from envs.sim import policy_features_for
from policies.loading import load_pruned_policy
from streamprune.models.tiny import CONFIG_DIR

# label → pruning/encoder fields of the policy config
VARIANTS = {
    "unreduced": {},
    "reuse": {"encoder": "reuse"},
    "reuse-alone": {"encoder": "reuse-alone"},
    "tome 0.5": {"encoder": "tome:0.5"},
    "reuse + tome 0.5": {"encoder": "reuse+tome:0.5"},
    "reuse + before-cut 0.25": {"encoder": "reuse", "retain": 0.25},
}


def timed_vision(policy) -> list[float]:
    """Seconds spent in `embed_image` per chunk (appended by the caller); wraps the instance's method."""
    owner = policy.model.vlm_with_expert
    spent = [0.0]
    inner = owner.embed_image

    def embed_image(image):
        t0 = time.perf_counter()
        out = inner(image)
        spent[0] += time.perf_counter() - t0
        return out

    owner.embed_image = embed_image
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="pusht")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--steps-per-chunk", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    features = policy_features_for(args.env)
    backbone = {"backbone": CONFIG_DIR / "smolvlm-500m-dims.yaml"}

    t0 = time.perf_counter()
    base, pre, post = load_pruned_policy("smolvla", "tiny", features, retain=1.0, **backbone)
    state = base.state_dict()
    noise = torch.randn(1, base.config.chunk_size, base.config.max_action_dim, generator=torch.Generator().manual_seed(1))
    episodes = [reference_episode(base, pre, post, args.env, seed, args.chunks, args.steps_per_chunk, noise)
                for seed in range(args.episodes)]
    print(f"built and rolled out the reference in {time.perf_counter() - t0:.0f} s: "
          f"{sum(len(e.batches) for e in episodes)} chunks", flush=True)

    policies = {}
    for label in args.variants:
        fields = {"retain": 1.0, **VARIANTS[label]}
        policy, _, _ = load_pruned_policy("smolvla", "tiny", features, **fields, **backbone)
        policy.load_state_dict(state)
        policies[label] = (policy, timed_vision(policy))
    del base

    rows = {label: {"chunk_s": [], "vision_s": [], "computed": [], "mse": [], "cosine": []} for label in policies}
    for episode in episodes:
        for policy, _ in policies.values():
            policy.reset()
        for i, (batch, reference) in enumerate(zip(episode.batches, episode.actions, strict=True)):
            order = list(policies) if i % 2 == 0 else list(reversed(policies))
            for label in order:
                policy, vision = policies[label]
                vision[0] = 0.0
                start = time.perf_counter()
                with torch.no_grad():
                    actions = policy.predict_action_chunk(dict(batch), noise=noise)
                seconds = time.perf_counter() - start
                row = rows[label]
                if i > 0:
                    row["chunk_s"].append(seconds)
                    row["vision_s"].append(vision[0])
                stats = policy.encoder_stats
                row["computed"].append(stats.computed_fraction if stats is not None else 1.0)
                row["mse"].append(float(F.mse_loss(actions, reference)))
                row["cosine"].append(float(F.cosine_similarity(actions.flatten(), reference.flatten(), 0)))
                print(f"  seed {episode.seed} chunk {i}: {label:<24} {seconds:6.2f} s  vision {vision[0]:5.2f} s  "
                      f"computed {row['computed'][-1]:.2f}  mse {row['mse'][-1]:.2e}", flush=True)

    base_chunk = statistics.median(rows["unreduced"]["chunk_s"])
    base_vision = statistics.median(rows["unreduced"]["vision_s"])
    table = {}
    for label, row in rows.items():
        chunk, vision = statistics.median(row["chunk_s"]), statistics.median(row["vision_s"])
        (mse, mse_se), (cos, cos_se) = mean_se(row["mse"]), mean_se(row["cosine"])
        table[label] = {"chunk_s": round(chunk, 3), "chunk_speedup": round(base_chunk / chunk, 3),
                        "vision_s": round(vision, 3), "vision_speedup": round(base_vision / vision, 2),
                        "patches_computed": round(statistics.fmean(row["computed"]), 3),
                        "action_mse": round(mse, 7), "action_mse_se": round(mse_se, 7),
                        "action_cosine": round(cos, 5), "action_cosine_se": round(cos_se, 5)}
    report = {"policy": "SmolVLA, SmolVLM2-500M dims (16 VLM layers), random weights, fp32",
              "machine": describe(), "env": args.env, "episodes": args.episodes, "chunks_per_episode": args.chunks,
              "steps_per_chunk": args.steps_per_chunk,
              "protocol": " ".join(__doc__.split("Protocol:")[1].split()),
              "variants": {label: VARIANTS[label] for label in policies}, "results": table}
    out = Path(args.out or f"benchmarks/results/vla_encoder_smolvla_{args.env}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
