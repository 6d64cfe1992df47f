"""`streamprune policy eval`: a pruned VLA policy in simulation — success, reward, chunk latency, tokens kept."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamprune.encoder import EncoderConfig
from streamprune.errors import ConfigError
from streamprune.extras import require_extra
from streamprune.reduce.vla import SELECTIONS
from streamprune.runtime import Runtime, resolve_runtime

POLICIES = ("smolvla", "pi0", "pi05")
CUTS = ("before", "inside")


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
               **encoder_fields(opts.encoder)}
    if opts.n_action_steps is not None:
        pruning["n_action_steps"] = opts.n_action_steps
    policy, pre, post = load_pruned_policy(opts.policy, opts.policy_path, features, runtime, **pruning)
    result = run_episodes(opts.env, policy, pre, post, episodes=opts.episodes, seed=opts.seed,
                          max_steps=opts.max_steps, video_path=opts.video, overlay=last_kept_overlay,
                          progress=progress, task_id=opts.task_id)
    random_weights = opts.policy_path == "tiny"
    return {"policy": opts.policy, "policy_path": opts.policy_path, "random_weights": random_weights,
            "env": opts.env, **({"task_id": opts.task_id or 0} if opts.env.startswith("libero") else {}),
            "retain": opts.retain, "cut": opts.cut, "selection": opts.selection, "encoder": opts.encoder.summary(),
            "runtime": runtime.describe(), **result.to_dict()}
