"""`streamprune policy eval`: a pruned VLA policy in simulation — success, reward, chunk latency, tokens kept."""

from __future__ import annotations

import contextlib
import io
import statistics
from dataclasses import dataclass, field

import numpy as np

from streamprune.encoder import EncoderConfig
from streamprune.errors import ConfigError
from streamprune.extras import require_extra
from streamprune.reduce.vla import SELECTIONS
from streamprune.runtime import Runtime, resolve_runtime

POLICIES = ("smolvla", "pi0", "pi05")
CUTS = ("before", "inside")
# VLA-Pruner's W: the first W chunks of an episode run unpruned while the action importance (attention of the
# action expert, smoothed over the last W chunks) fills its window; pruning needs that history
WARMUP_CHUNKS = 3


@dataclass
class PolicyEvalOptions:
    policy: str
    env: str
    policy_path: str = "tiny"
    episodes: int = 1
    retain: float = 0.25
    cut: str = "before"
    selection: str = "vla_pruner"
    seed: int = 0
    max_steps: int | None = None
    n_action_steps: int | None = None
    warmup_chunks: int = WARMUP_CHUNKS  # unpruned chunks per episode (also the importance smoothing window)
    task_id: int | None = None  # LIBERO: the task of the suite
    video: str | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: a visible GPU, else the CPU)
    dtype: str = "auto"  # auto | bfloat16 | float32 (auto: bf16 on a GPU, fp32 on the CPU); see policies.loading
    # checked like the video commands' option; lerobot's VLAs always run their own eager attention (the
    # pruning reads its probabilities), which is what the report's runtime names
    attn_implementation: str = "sdpa"

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown --policy {self.policy!r}; choose one of: {', '.join(POLICIES)}")
        if not 0.0 < self.retain <= 1.0:
            raise ConfigError(f"--retain must be in (0, 1], got {self.retain}")
        if self.cut not in CUTS:
            raise ConfigError(f"unknown --cut {self.cut!r}; choose one of: {', '.join(CUTS)}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown --selection {self.selection!r}; choose one of: {', '.join(SELECTIONS)}")
        if self.episodes < 1:
            raise ConfigError(f"--episodes must be at least 1, got {self.episodes}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.warmup_chunks < 1:  # the selection needs at least one chunk of attention history
            raise ConfigError(f"--warmup-chunks must be at least 1, got {self.warmup_chunks}")

    def runtime(self) -> Runtime:
        """Where the policy runs (ConfigError for a device that is not here or a dtype lerobot's VLAs lack)."""
        from policies.loading import policy_dtype

        runtime = resolve_runtime(self.device, self.dtype, self.attn_implementation)
        policy_dtype(runtime)
        return Runtime(runtime.device, runtime.dtype, "eager")


def run_policy_eval(opts: PolicyEvalOptions, progress=None) -> dict:
    """Build the pruned policy for the env, run the episodes, return the result as a dict."""
    require_extra("vla", "policy eval")
    opts.validate()
    runtime = opts.runtime()
    from envs.sim import check_task_id, last_kept_overlay, policy_features_for, run_episodes
    from policies.loading import load_pruned_policy
    from policies.pruning_config import encoder_fields

    check_task_id(opts.env, opts.task_id)  # before the (slow) policy build

    features = policy_features_for(opts.env)
    pruning = {"retain": opts.retain, "cut": opts.cut, "selection": opts.selection,
               "importance_window": opts.warmup_chunks, **encoder_fields(opts.encoder)}
    if opts.n_action_steps is not None:
        pruning["n_action_steps"] = opts.n_action_steps
    # lerobot prints build notes ("Reducing the number of VLM layers to 16 ...") a user cannot act on
    with contextlib.redirect_stdout(io.StringIO()):
        policy, pre, post = load_pruned_policy(opts.policy, opts.policy_path, features, runtime, **pruning)
    result = run_episodes(opts.env, policy, pre, post, episodes=opts.episodes, seed=opts.seed,
                          max_steps=opts.max_steps, video_path=opts.video, overlay=last_kept_overlay,
                          progress=progress, task_id=opts.task_id)
    random_weights = opts.policy_path == "tiny"
    return {"policy": opts.policy, "policy_path": opts.policy_path, "random_weights": random_weights,
            "env": opts.env, **({"task_id": opts.task_id or 0} if opts.env.startswith("libero") else {}),
            "retain": opts.retain, "cut": opts.cut, "selection": opts.selection, "encoder": opts.encoder.summary(),
            "runtime": runtime.describe(), "warmup_chunks": opts.warmup_chunks,
            **by_phase(result.to_dict(), opts.warmup_chunks, opts.retain)}


# the env's aggregates over all chunks, which mix unpruned warm-up chunks with pruned ones
MIXED_AGGREGATES = ("chunk_latency_p50_s", "chunk_latency_p95_s", "mean_tokens_kept", "mean_tokens_total")


def by_phase(result: dict, warmup_chunks: int, retain: float) -> dict:
    """`result` (EvalResult.to_dict()) with its chunk aggregates split by phase: "phases" → {"warmup": …,
    "pruned": …} (see `phase_stats`), and "pruning_note": why no chunk was pruned (None when some were, or
    when retain 1.0 asks for none)."""
    episodes = result["episodes"]
    phases = {"warmup": phase_stats(episodes, slice(0, warmup_chunks)),
              "pruned": phase_stats(episodes, slice(warmup_chunks, None))}
    note = None
    if phases["pruned"]["chunks"] == 0 and retain < 1.0:
        chunks = phases["warmup"]["chunks"]
        note = (f"no chunk was pruned: the run had {chunks} chunk{'s' if chunks != 1 else ''}, all warm-up "
                f"(the first {warmup_chunks} of each episode run unpruned, --warmup-chunks); "
                f"retain {retain:g} was never applied")
    unmixed = {k: v for k, v in result.items() if k not in MIXED_AGGREGATES}
    return {**unmixed, "phases": phases, "pruning_note": note}


def phase_stats(episodes: list[dict], chunks: slice) -> dict:
    """Aggregates over the chunks `chunks` of every episode (per-episode chunk lists, as in EpisodeResult):
    chunk count, latency p50/p95 (s) and mean visual tokens kept / total (None without such chunks)."""
    latencies = [t for e in episodes for t in e["chunk_latencies_s"][chunks]]
    kept = [n for e in episodes for n in e["tokens_kept"][chunks]]
    total = [n for e in episodes for n in e["tokens_total"][chunks]]
    return {"chunks": len(latencies),
            "latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "latency_p95_s": float(np.percentile(latencies, 95)) if latencies else None,
            "mean_tokens_kept": statistics.fmean(kept) if kept else None,
            "mean_tokens_total": statistics.fmean(total) if total else None}
