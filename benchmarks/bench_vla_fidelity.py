"""Action fidelity of pruned VLA policies at real dimensions (random weights), on simulated-env observations.

Run by hand (`make bench-vla-fidelity`; on a 2-core AMD EPYC VM alone: SmolVLA ~1 h, pi0 ~1.5 h per env with
1 episode of 9 chunks; `--threads 1` when sharing the cores roughly doubles that). Protocol, the same for every
policy, env and variant:
1. Reference episode: the policy at retain 1.0 (tested to be the unmodified lerobot policy) drives the env
   from seed s. At each chunk boundary the observation is kept (after the env's and the policy's
   processors), the chunk is computed with fixed flow-matching noise, and its first `steps_per_chunk`
   actions are executed (clipped to the env's action bounds). Random weights make those actions arbitrary,
   but they move the robot, so the scene changes from chunk to chunk as in a rollout.
2. Every variant (cut × selection × retain) replays the same observations with the same noise from a fresh
   episode: `reset`, W unpruned warm-up chunks (VLA-Pruner's rule), then pruned chunks.
3. Per pruned chunk: MSE and cosine of the variant's action chunk against the reference's. Reported: mean
   and standard error over all pruned chunks of all episodes, and, per budget, the share of chunks where
   VLA-Pruner is closer than semantic-only / random (paired on the same chunk).
One policy instance serves every variant (`configure_pruning`): pi0 at real size is 16 GB in fp32.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lerobot.envs.factory import make_env_pre_post_processors
from lerobot.envs.utils import NEW_ROLLOUT_OPTION, preprocess_observation
from lerobot.utils.constants import ACTION

from benchmarks.machine import describe
from envs.sim import SIMULATION_ERRORS, make_sim, policy_features_for, task_descriptions
from policies.loading import load_pruned_policy
from streamprune.models.tiny import CONFIG_DIR
from streamprune.reduce.vla import SELECTIONS

RETAINS = (0.5, 0.25, 0.125)
# real-dimension specs of the tiny builders (keyword, file)
REAL_DIMS = {"smolvla": ("backbone", "smolvlm-500m-dims.yaml"), "pi0": ("spec_path", "pi0-dims.yaml")}


@dataclass
class Episode:
    """Observations at the chunk boundaries of one reference rollout, and the reference's action chunks."""

    seed: int
    batches: list[dict[str, Any]]
    actions: list[torch.Tensor]  # [1, chunk, action_dim] each
    scores: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # per chunk: camera → (semantic, action) [1, n]


@torch.no_grad()
def reference_episode(policy, pre, post, env_name: str, seed: int, chunks: int, steps_per_chunk: int,
                      noise: torch.Tensor) -> Episode:
    """Roll out `policy` (configured unpruned) for `chunks` chunks; see the module docstring."""
    env, env_cfg = make_sim(env_name, episode_length=chunks * steps_per_chunk + 1)
    env_pre, env_post = make_env_pre_post_processors(env_cfg, policy.config)
    # random weights can command joints far outside the env's bounds (ALOHA: [-1, 1]), where MuJoCo diverges;
    # only this reference rollout executes actions, the variants replay its observations
    low, high = env.single_action_space.low, env.single_action_space.high
    policy.reset()
    episode = Episode(seed, [], [], [])
    try:
        observation, _ = env.reset(seed=seed, options={NEW_ROLLOUT_OPTION: True})
        for _ in range(chunks):
            batch = preprocess_observation(observation)
            batch["task"] = task_descriptions(env)
            batch = pre(env_pre(batch))
            actions = policy.predict_action_chunk(dict(batch), noise=noise)
            episode.batches.append(batch)
            episode.actions.append(actions)
            episode.scores.append(policy.last_scores())
            for i in range(steps_per_chunk):
                action = env_post({ACTION: post(actions[:, i])})[ACTION].numpy().clip(low, high)
                try:
                    observation, _, terminated, truncated, _ = env.step(action)
                except SIMULATION_ERRORS as exc:  # the episode ends here; its chunks so far are kept
                    print(f"  seed {seed}: the simulator stopped the reference episode: {exc}", flush=True)
                    return episode
                if terminated[0] or truncated[0]:
                    return episode
    finally:
        env.close()
    return episode


@torch.no_grad()
def replay(policy, episode: Episode, noise: torch.Tensor) -> list[torch.Tensor]:
    policy.reset()
    return [policy.predict_action_chunk(dict(batch), noise=noise) for batch in episode.batches]


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Share of the top-k positions of scores a [n] that are also top-k of b [n]."""
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


def score_overlaps(episodes: list[Episode]) -> dict[str, float]:
    """VLA-Pruner's premise measured on the unpruned reference chunks, per budget: top-k overlap of the
    action importance of consecutive chunks (high → last chunks predict this one), and of semantic vs
    action importance in the same chunk (low → semantic-only pruning drops what the action expert reads)."""
    result = {}
    for retain in RETAINS:
        consecutive, cross = [], []
        for episode in episodes:
            for before, now in zip(episode.scores, episode.scores[1:], strict=False):
                for camera, (semantic, action) in now.items():
                    k = max(1, round(retain * action.shape[-1]))
                    consecutive.append(top_overlap(before[camera][1][0], action[0], k))
                    cross.append(top_overlap(semantic[0], action[0], k))
        result[f"action t-1 vs t {retain:g}"] = round(statistics.fmean(consecutive), 3)
        result[f"semantic vs action {retain:g}"] = round(statistics.fmean(cross), 3)
    return result


def compare(policy, episodes: list[Episode], noise: torch.Tensor, cut: str, warmup: int,
            selections: tuple[str, ...] = SELECTIONS, log=print) -> dict[str, Any]:
    """Fidelity of every selection × budget for one cut (see the module docstring)."""
    mse: dict[str, list[float]] = {}
    results: dict[str, Any] = {}
    for retain in RETAINS:
        for selection in selections:
            key = f"{selection} {retain:g}"
            policy.configure_pruning(retain=retain, cut=cut, selection=selection)
            errors, cosines, start = [], [], time.perf_counter()
            for episode in episodes:
                pairs = zip(replay(policy, episode, noise), episode.actions, strict=True)
                for actions, reference in list(pairs)[warmup:]:
                    errors.append(float(F.mse_loss(actions, reference)))
                    cosines.append(float(F.cosine_similarity(actions.flatten(), reference.flatten(), 0)))
            mse[key] = errors
            (m, se), (c, c_se) = mean_se(errors), mean_se(cosines)
            results[key] = {"mse": round(m, 6), "mse_se": round(se, 6), "cosine": round(c, 5),
                            "cosine_se": round(c_se, 5), "chunks": len(errors)}
            log(f"  {cut:<6} {key:<16} mse {m:.5f} ± {se:.5f}  cos {c:.4f}  ({time.perf_counter() - start:.0f} s)")
        for baseline in (s for s in selections if s != "vla_pruner" and "vla_pruner" in selections):
            ours, theirs = mse[f"vla_pruner {retain:g}"], mse[f"{baseline} {retain:g}"]
            wins = sum(a < b for a, b in zip(ours, theirs, strict=True)) / len(ours)
            results[f"vla_pruner closer than {baseline} {retain:g}"] = round(wins, 3)
    policy.configure_pruning(retain=1.0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", choices=sorted(REAL_DIMS), default="smolvla")
    parser.add_argument("--envs", nargs="+", default=["pusht", "aloha-transfer"])
    parser.add_argument("--episodes", type=int, default=2, help="reference episodes per env (seeds 0, 1, …)")
    parser.add_argument("--chunks", type=int, default=8, help="chunks per episode, warm-up included")
    parser.add_argument("--steps-per-chunk", type=int, default=10, help="actions executed per chunk")
    parser.add_argument("--cuts", nargs="+", default=["before", "inside"])
    parser.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=SELECTIONS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when two runs share the 2 cores)")
    parser.add_argument("--merge", action="store_true",
                        help="add these envs / cuts / selections to the existing report at --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    keyword, spec = REAL_DIMS[args.policy]
    out = Path(args.out or f"benchmarks/results/vla_fidelity_{args.policy}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.exists():  # add envs to an earlier run's report
        report = json.loads(out.read_text())
    else:
        report = {"policy": f"{args.policy} at real dimensions ({spec}), random weights, fp32",
                  "machine": describe(),
                  "protocol": " ".join(__doc__.split("Protocol, ")[1].split("One policy")[0].split()),
                  "episodes_per_env": args.episodes, "chunks_per_episode": args.chunks,
                  "steps_per_chunk": args.steps_per_chunk, "envs": {}}
    for env_name in args.envs:
        start = time.perf_counter()
        policy, pre, post = load_pruned_policy(args.policy, "tiny", policy_features_for(env_name),
                                               retain=1.0, **{keyword: CONFIG_DIR / spec})
        print(f"{env_name}: built {args.policy} in {time.perf_counter() - start:.0f} s", flush=True)
        noise = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim,
                            generator=torch.Generator().manual_seed(1))
        episodes = [reference_episode(policy, pre, post, env_name, seed, args.chunks, args.steps_per_chunk, noise)
                    for seed in range(args.episodes)]
        print(f"  reference: {sum(len(e.batches) for e in episodes)} chunks", flush=True)
        warmup = policy.config.importance_window
        env_report = report["envs"].setdefault(env_name, {})
        env_report["top_k_overlap_unpruned"] = score_overlaps(episodes)
        print(f"  {env_report}", flush=True)
        for cut in args.cuts:
            env_report.setdefault(cut, {}).update(compare(policy, episodes, noise, cut, warmup, tuple(args.selections)))
        out.write_text(json.dumps(report, indent=2))  # after each env: a long run keeps what it measured
        # pi0 at real size is 16 GB: free it before the next build. The pruner's hooks and the model refer
        # to each other, so only the cycle collector frees them.
        del policy, pre, post, episodes
        gc.collect()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
