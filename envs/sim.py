"""Simulated episodes (PushT, ALOHA, LIBERO) for any lerobot policy: one control loop, timed per action chunk.

The loop follows `lerobot.scripts.lerobot_eval.rollout` for a single environment, so a policy instance
(e.g. a token-pruned one) can be evaluated in-process without saving or registering it, and adds what
lerobot-eval does not record: the latency of each action-chunk computation and the visual tokens the
policy kept for it.
"""

from __future__ import annotations

import collections
import importlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import AlohaEnv, EnvConfig, LiberoEnv, PushtEnv
from lerobot.envs.factory import make_env, make_env_pre_post_processors
from lerobot.envs.utils import NEW_ROLLOUT_OPTION, env_to_policy_features, preprocess_observation
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_IMAGES, OBS_STATE

from envs.libero_setup import ensure_libero_ready
from envs.video import EpisodeVideo, draw_kept_tokens, letterbox, upscale
from streamprune.errors import ConfigError

# Our env names -> lerobot env config factories. gym-pusht renders 96x96 observations because lerobot's
# PushtEnv does not pass its observation size to gym; declaring 96x96 makes the features tell the truth.
# A LIBERO env is one task of a suite (`make_sim(task_id=...)`, default task 0); lerobot's defaults otherwise
# (two 360x360 cameras, 8-d state, 7-d relative end-effector actions, init states, hard resets).
ENVS: dict[str, Callable[[], EnvConfig]] = {
    "pusht": partial(PushtEnv, observation_height=96, observation_width=96),
    "aloha-insertion": partial(AlohaEnv, task="AlohaInsertion-v0"),
    "aloha-transfer": partial(AlohaEnv, task="AlohaTransferCube-v0"),
    "libero-spatial": partial(LiberoEnv, task="libero_spatial"),
    "libero-object": partial(LiberoEnv, task="libero_object"),
    "libero-goal": partial(LiberoEnv, task="libero_goal"),
    "libero-10": partial(LiberoEnv, task="libero_10"),
}

# Tasks per LIBERO suite (fixed by the benchmark): a bad task id is refused before anything is built.
LIBERO_SUITE_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10}

# lerobot's LIBERO env processor (LiberoProcessorStep) turns the nested robot state into one vector: end-effector
# position (3), orientation as axis-angle (3), gripper joint positions (2). Policies see that, not the raw keys.
LIBERO_STATE = PolicyFeature(type=FeatureType.STATE, shape=(8,))

# Cameras of the ALOHA scene (gym_aloha/assets/*.xml). lerobot observes only "top".
ALOHA_CAMERAS = ("top", "angle", "front_close", "left_pillar", "right_pillar", "left_wrist", "right_wrist")

Processor = Callable[[Any], Any]
Overlay = Callable[[Any], dict[str, np.ndarray]]


def _simulation_errors() -> tuple[type[Exception], ...]:
    """Errors a simulator raises when its state blows up (MuJoCo's "Nan, Inf or huge value in QACC" in ALOHA):
    the episode ends there as a failure; the run goes on."""
    try:
        from dm_control.rl.control import PhysicsError
    except ImportError:  # without the aloha extra
        return ()
    return (PhysicsError,)


SIMULATION_ERRORS = _simulation_errors()


class Policy(Protocol):
    """What the loop needs from a policy (lerobot's PreTrainedPolicy has it)."""

    def reset(self) -> None: ...

    def select_action(self, batch: dict[str, Any]) -> torch.Tensor: ...


def _config(name: str) -> EnvConfig:
    if name not in ENVS:
        raise ConfigError(f"unknown simulated env {name!r}; choose one of: {', '.join(ENVS)}")
    return ENVS[name]()


def policy_features_for(name: str) -> dict[str, PolicyFeature]:
    """lerobot policy features (observation.* inputs and action) of env `name`, to build a matching policy:
    what the policy receives after the env's own processor (for LIBERO: two cameras and the 8-d state)."""
    cfg = _config(name)
    features = env_to_policy_features(cfg)
    if isinstance(cfg, LiberoEnv):
        features = {key: f for key, f in features.items() if not key.startswith(f"{OBS_STATE}.")}
        features[OBS_STATE] = LIBERO_STATE
    return features


def make_sim(
    name: str, episode_length: int | None = None, render_camera: str | None = None, task_id: int | None = None
) -> tuple[gym.vector.VectorEnv, EnvConfig]:
    """Build env `name` as a synchronous vector env of 1 through lerobot's `make_env`.

    `episode_length` overrides the config's step limit (the env truncates there). `render_camera` is
    for ALOHA only: the scene camera rendered into the policy's image (lerobot's `observation.images.top`
    key); default "top". Only that camera is rendered: stock gym-aloha renders three 480x640 views per
    step (~100 ms each in software GL) and returns one. `task_id` is for LIBERO only: the task of the
    suite (default 0). LIBERO's config and offline assets are set up first (`ensure_libero_ready`).
    """
    cfg = _config(name)
    if episode_length is not None:
        cfg.episode_length = episode_length
    is_aloha, is_libero = isinstance(cfg, AlohaEnv), isinstance(cfg, LiberoEnv)
    if render_camera is not None and not is_aloha:
        views = "two fixed cameras" if is_libero else "a single fixed view"
        raise ConfigError(f"{name} has {views}; render_camera applies to the ALOHA envs only")
    if is_aloha and (render_camera or "top") not in ALOHA_CAMERAS:
        raise ConfigError(f"unknown ALOHA camera {render_camera!r}; choose one of: {', '.join(ALOHA_CAMERAS)}")
    check_task_id(name, task_id)
    if is_libero:
        return _make_libero(name, cfg, task_id or 0), cfg
    if cfg.gym_id not in gym.registry:  # registered by its package: imported here, lerobot would say so on stdout
        importlib.import_module(cfg.package_name)
    env = make_env(cfg, n_envs=1, use_async_envs=False)[cfg.type][0]
    if is_aloha:
        _render_only(env, render_camera or "top")
    return env, cfg


def check_task_id(name: str, task_id: int | None) -> None:
    """ConfigError (one line) unless `task_id` is None or a task of LIBERO env `name`'s suite."""
    cfg = _config(name)
    if task_id is None:
        return
    if not isinstance(cfg, LiberoEnv):
        raise ConfigError(f"{name} has a single task; task_id applies to the LIBERO envs only")
    tasks = LIBERO_SUITE_TASKS[cfg.task]
    if not 0 <= task_id < tasks:
        raise ConfigError(f"{name}: task_id {task_id} out of range [0, {tasks - 1}]")


def _make_libero(name: str, cfg: LiberoEnv, task_id: int) -> gym.vector.VectorEnv:
    """Task `task_id` of the config's suite. The simulator itself is built lazily, at the first reset."""
    ensure_libero_ready()
    cfg.task_ids = [task_id]
    try:
        envs = make_env(cfg, n_envs=1, use_async_envs=False)
    except ValueError as exc:  # lerobot's check of the task id against the suite's size
        raise ConfigError(f"{name}: {exc}") from None
    return envs[cfg.task][task_id]


def _render_only(env: gym.vector.SyncVectorEnv, camera: str) -> None:
    """Make gym-aloha's task render just `camera`, served as its "top" image."""
    aloha = env.envs[0].unwrapped
    task = aloha._env.task

    def get_observation(physics: Any) -> collections.OrderedDict:
        obs = collections.OrderedDict(
            qpos=task.get_qpos(physics), qvel=task.get_qvel(physics), env_state=task.get_env_state(physics)
        )
        size = {"height": aloha.observation_height, "width": aloha.observation_width}
        obs["images"] = {"top": physics.render(camera_id=camera, **size)}
        return obs

    task.get_observation = get_observation


@dataclass
class EpisodeResult:
    """One episode. Token lists hold one entry per chunk and stay empty if the policy does not report them."""

    seed: int
    steps: int
    sum_reward: float
    max_reward: float
    success: bool
    chunk_latencies_s: list[float] = field(default_factory=list)
    tokens_kept: list[int] = field(default_factory=list)
    tokens_total: list[int] = field(default_factory=list)
    # per chunk, the fraction of image patches the vision tower computed (encoder-side reduction only)
    patches_computed: list[float] = field(default_factory=list)
    simulation_error: str | None = None  # why the simulator stopped the episode early, if it did


@dataclass
class EvalResult:
    """All episodes of a `run_episodes` call and their aggregates (see `to_dict`)."""

    env: str
    episodes: list[EpisodeResult]
    wall_time_s: float
    video_path: str | None = None

    @property
    def success_rate(self) -> float:
        return _mean([float(e.success) for e in self.episodes])

    @property
    def avg_sum_reward(self) -> float:
        return _mean([e.sum_reward for e in self.episodes])

    @property
    def avg_max_reward(self) -> float:
        return _mean([e.max_reward for e in self.episodes])

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.episodes)

    @property
    def chunks(self) -> int:
        return sum(len(e.chunk_latencies_s) for e in self.episodes)

    @property
    def chunk_latency_p50_s(self) -> float | None:
        return _percentile([t for e in self.episodes for t in e.chunk_latencies_s], 50)

    @property
    def chunk_latency_p95_s(self) -> float | None:
        return _percentile([t for e in self.episodes for t in e.chunk_latencies_s], 95)

    @property
    def mean_tokens_kept(self) -> float | None:
        kept = [n for e in self.episodes for n in e.tokens_kept]
        return statistics.fmean(kept) if kept else None

    @property
    def mean_tokens_total(self) -> float | None:
        total = [n for e in self.episodes for n in e.tokens_total]
        return statistics.fmean(total) if total else None

    @property
    def mean_patches_computed(self) -> float | None:
        computed = [f for e in self.episodes for f in e.patches_computed]
        return statistics.fmean(computed) if computed else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: aggregates plus the per-episode records."""
        aggregates = (
            "success_rate avg_sum_reward avg_max_reward steps chunks chunk_latency_p50_s chunk_latency_p95_s "
            "mean_tokens_kept mean_tokens_total mean_patches_computed"
        ).split()
        return {
            "env": self.env,
            "n_episodes": len(self.episodes),
            "wall_time_s": self.wall_time_s,
            "video_path": self.video_path,
            **{name: getattr(self, name) for name in aggregates},
            "episodes": [asdict(e) for e in self.episodes],
        }


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_episodes(
    env_name: str,
    policy: Policy,
    preprocessor: Processor,
    postprocessor: Processor,
    episodes: int = 1,
    seed: int = 0,
    max_steps: int | None = None,
    video_path: str | Path | None = None,
    overlay: Overlay | None = None,
    progress: Callable[[int, int], None] | None = None,
    render_camera: str | None = None,
    task_id: int | None = None,
) -> EvalResult:
    """Run `episodes` episodes of `env_name` with `policy`, seeds `seed, seed + 1, ...`.

    `preprocessor`/`postprocessor` are the policy's processors (`make_pre_post_processors`); the env's
    own ones are built here. `max_steps` caps each episode (default: the env's episode length).
    `video_path` records the first episode's camera frames; `overlay(policy)` -> {camera key: kept bool
    [gh, gw]} is read after each new chunk and its mask drawn on the frames until the next chunk.
    `progress(done_steps, total_steps)` is called after every step (total = episodes x step limit).
    `render_camera` picks the ALOHA view and `task_id` the LIBERO task (see `make_sim`).
    """
    if episodes < 1:
        raise ConfigError(f"episodes must be at least 1, got {episodes}")
    env, env_cfg = make_sim(env_name, episode_length=max_steps, render_camera=render_camera, task_id=task_id)
    env_pre, env_post = make_env_pre_post_processors(env_cfg, getattr(policy, "config", None))
    step_limit = int(env.call("_max_episode_steps")[0])
    video = EpisodeVideo(video_path, env_cfg.fps) if video_path is not None else None
    processors = (env_pre, preprocessor, postprocessor, env_post)
    total = episodes * step_limit
    start = time.perf_counter()
    results: list[EpisodeResult] = []
    try:
        for index in range(episodes):
            loop = _EpisodeLoop(env, policy, processors, overlay, video if index == 0 else None,
                                policy_view(env_cfg))

            def on_step(step: int, done: int = index * step_limit) -> None:
                if progress is not None:
                    progress(done + step, total)

            results.append(loop.run(seed + index, step_limit, on_step))
            if results[-1].steps < step_limit:  # an episode that ended early skips its remaining steps
                on_step(step_limit)
    finally:
        env.close()
        if video is not None:
            video.close()
    return EvalResult(env_name, results, time.perf_counter() - start, str(video_path) if video else None)


class _EpisodeLoop:
    """One episode of the rollout: observation -> processors -> select_action -> processors -> step."""

    def __init__(
        self,
        env: gym.vector.VectorEnv,
        policy: Policy,
        processors: tuple[Processor, Processor, Processor, Processor],
        overlay: Overlay | None,
        video: EpisodeVideo | None,
        view: Callable[[np.ndarray], np.ndarray],
    ):
        self.env, self.policy, self.overlay, self.video, self.view = env, policy, overlay, video, view
        self.env_pre, self.pre, self.post, self.env_post = processors
        self.masks: dict[str, np.ndarray] = {}

    def run(self, seed: int, step_limit: int, on_step: Callable[[int], None]) -> EpisodeResult:
        self.policy.reset()
        result = EpisodeResult(seed=seed, steps=0, sum_reward=0.0, max_reward=-np.inf, success=False)
        observation, _ = self.env.reset(seed=seed, options={NEW_ROLLOUT_OPTION: True})
        done = False
        while not done and result.steps < step_limit:
            action = self._act(observation, result)
            if self.video is not None:  # after acting, so the frame shows the mask chosen on it
                self._record(observation)
            try:
                observation, reward, terminated, truncated, info = self.env.step(action)
            except SIMULATION_ERRORS as exc:
                result.simulation_error = f"step {result.steps}: {str(exc).splitlines()[0]}"
                break
            result.steps += 1
            result.sum_reward += float(reward[0])
            result.max_reward = max(result.max_reward, float(reward[0]))
            result.success |= step_success(info)
            done = bool(terminated[0] or truncated[0])
            on_step(result.steps)
        return result

    def _act(self, observation: dict[str, Any], result: EpisodeResult) -> np.ndarray:
        """Choose one action; time `select_action` and record chunk stats when it computes a new chunk."""
        batch = preprocess_observation(observation)
        batch["task"] = task_descriptions(self.env)
        batch = self.pre(self.env_pre(batch))
        new_chunk = _starts_chunk(self.policy)
        start = time.perf_counter()
        with torch.inference_mode():
            action = self.policy.select_action(batch)
        elapsed = time.perf_counter() - start
        if new_chunk:
            self._on_chunk(elapsed, result)
        action = self.env_post({ACTION: self.post(action)})[ACTION]
        return action.to("cpu").numpy()

    def _on_chunk(self, latency_s: float, result: EpisodeResult) -> None:
        result.chunk_latencies_s.append(latency_s)
        kept, total = getattr(self.policy, "tokens_kept", None), getattr(self.policy, "tokens_total", None)
        if kept is not None and total is not None:
            result.tokens_kept.append(int(kept))
            result.tokens_total.append(int(total))
        stats = getattr(self.policy, "encoder_stats", None)
        if stats is not None:
            result.patches_computed.append(round(stats.computed_fraction, 4))
        if self.overlay is not None and self.video is not None:
            self.masks = self.overlay(self.policy)

    def _record(self, observation: dict[str, Any]) -> None:
        """Add the first camera's frame (with the latest kept-token mask, if any) to the video."""
        key, frame = next(iter(camera_frames(observation).items()))
        frame = self.view(frame)
        padding = getattr(self.policy, "image_padding", None)
        if padding is not None and frame.shape[0] != frame.shape[1]:
            frame = letterbox(frame, padding)  # the square the policy tokenises: cells sit on their tokens
        frame = upscale(frame)  # before drawing, so the grid lines stay thin
        # A single-camera policy may name its camera differently (rename maps); its only mask still applies.
        mask = self.masks.get(key, next(iter(self.masks.values())) if len(self.masks) == 1 else None)
        self.video.add(frame if mask is None else draw_kept_tokens(frame, mask))


def last_kept_overlay(policy: Any) -> dict[str, np.ndarray]:
    """Overlay for the pruned policies in `policies/`: their `last_kept` (camera -> kept token indices
    [B, k] on a square grid, on the policy's device) as bool [side, side] host grids for batch row 0. The grid
    size per camera is `tokens_total / len(last_kept)` (64 for SmolVLA, 256 for pi0)."""
    last_kept = getattr(policy, "last_kept", None) or {}
    if not last_kept:
        return {}
    per_camera = int(policy.tokens_total) // len(last_kept)
    side = math.isqrt(per_camera)
    masks = {}
    for camera, indices in last_kept.items():
        kept = np.zeros(per_camera, bool)
        kept[indices[0].cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)[0]] = True
        masks[camera] = kept.reshape(side, side)
    return masks


def policy_view(env_cfg: EnvConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Camera frame -> the image the policy sees, so video frames and kept-token masks line up.
    LIBERO's cameras render upside down; its env processor rotates them by 180 degrees."""
    if isinstance(env_cfg, LiberoEnv):
        return lambda frame: frame[::-1, ::-1]
    return lambda frame: frame


def camera_frames(observation: dict[str, Any]) -> dict[str, np.ndarray]:
    """uint8 [H, W, 3] frames of env 0 of a vector-env observation, by lerobot policy key."""
    pixels = observation["pixels"]
    if isinstance(pixels, dict):
        return {f"{OBS_IMAGES}.{name}": image[0] for name, image in pixels.items()}
    return {OBS_IMAGE: pixels[0]}


def task_descriptions(env: gym.vector.VectorEnv) -> list[str]:
    """The language task per sub-env, as lerobot_eval infers it (description, else task name, else "")."""
    for attr in ("task_description", "task"):
        try:
            return [str(t) for t in env.call(attr)]
        except (AttributeError, NotImplementedError):
            continue
    return [""] * env.num_envs


def _starts_chunk(policy: Policy) -> bool:
    """Whether the next `select_action` call computes a new action chunk (its action queue is empty).

    pi0/pi05/ACT queue actions in `_action_queue` (pi0 also has an unused `_queues["action"]`, so that is
    checked first); SmolVLA and Diffusion in `_queues["action"]`. A policy with neither queue computes on
    every call, so every call counts as a chunk.
    """
    queue = getattr(policy, "_action_queue", None)
    if queue is None:
        queue = (getattr(policy, "_queues", None) or {}).get(ACTION)
    return queue is None or len(queue) == 0


def step_success(info: dict[str, Any]) -> bool:
    """Success of env 0 from a vector-env step info (`final_info` when the episode just ended)."""
    source = info.get("final_info", info)
    return bool(np.asarray(source.get("is_success", False)).reshape(-1)[0])
