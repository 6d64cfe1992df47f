"""`streamprune policy eval` end to end with the tiny pruned policies, and lerobot's own `lerobot-eval`
running a saved pruned policy."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import av
import pytest

from tests.test_summarize import run_cli


def eval_json(*args: str) -> dict:
    res = run_cli("policy", "eval", "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_smolvla_pusht_with_video(tmp_path):
    video = tmp_path / "episode.mp4"
    result = eval_json("--policy", "smolvla", "--env", "pusht", "--max-steps", "20", "--n-action-steps", "5",
                       "--retain", "0.25", "--video", str(video))
    assert result["n_episodes"] == 1 and result["steps"] == 20 and result["chunks"] == 4
    assert result["random_weights"] and result["cut"] == "before"
    # three warm-up chunks run unpruned (VLA-Pruner's W = 3, the --warmup-chunks default), then 16 of 64 tokens
    assert result["episodes"][0]["tokens_kept"] == [64, 64, 64, 16] and result["warmup_chunks"] == 3
    assert result["phases"]["pruned"]["latency_p50_s"] > 0 and 0.0 <= result["success_rate"] <= 1.0
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 20


@pytest.mark.parametrize("policy,cut", [("smolvla", "inside"), ("pi0", "before"), ("pi05", "inside")])
def test_other_policies_and_cuts_on_pusht(policy, cut):
    result = eval_json("--policy", policy, "--env", "pusht", "--max-steps", "20", "--n-action-steps", "5",
                       "--cut", cut, "--retain", "0.5")
    assert result["chunks"] == 4 and result["cut"] == cut
    assert result["episodes"][0]["tokens_kept"][-1] == result["episodes"][0]["tokens_total"][-1] // 2


@pytest.mark.parametrize("policy,env,cut", [("smolvla", "aloha-insertion", "before"),
                                            ("pi0", "aloha-transfer", "inside"), ("pi05", "aloha-insertion", "inside")])
def test_aloha_episodes_run_and_prune_after_warmup(policy, env, cut):
    """14-dim bimanual state and the 480×640 top camera; 4 chunks: 3 warm-up, then the budget."""
    result = eval_json("--policy", policy, "--env", env, "--cut", cut, "--retain", "0.25", "--max-steps", "8",
                       "--n-action-steps", "2")
    assert result["steps"] == 8 and result["chunks"] == 4 and result["env"] == env and result["cut"] == cut
    kept, total = result["episodes"][0]["tokens_kept"], result["episodes"][0]["tokens_total"]
    assert kept[:3] == total[:3] and kept[3] == total[3] // 4


def test_smolvla_libero_spatial_runs():
    """LIBERO offline through the CLI: stdout stays pure JSON although lerobot and LIBERO print while building."""
    result = eval_json("--policy", "smolvla", "--policy-path", "tiny", "--env", "libero-spatial", "--episodes", "1",
                       "--max-steps", "6", "--n-action-steps", "3", "--retain", "0.5", "--task-id", "1")
    assert result["env"] == "libero-spatial" and result["n_episodes"] == 1 and result["random_weights"]
    assert result["task_id"] == 1
    assert result["steps"] == 6 and result["chunks"] == 2 and result["video_path"] is None
    episode = result["episodes"][0]
    assert episode["steps"] == 6 and episode["success"] is False and len(episode["chunk_latencies_s"]) == 2
    assert episode["tokens_total"] == [128, 128]  # two cameras x 64 tokens
    assert all(0 < kept <= total for kept, total in zip(episode["tokens_kept"], episode["tokens_total"], strict=True))
    warmup = result["phases"]["warmup"]  # 2 chunks, both within the 3 warm-up chunks
    assert warmup["chunks"] == 2 and 0 < warmup["latency_p50_s"] <= warmup["latency_p95_s"] < result["wall_time_s"]


@pytest.mark.parametrize("args,message", [
    (["--policy", "smolvla", "--env", "pusht", "--retain", "0"], "--retain must be in (0, 1]"),
    (["--policy", "smolvla", "--env", "pusht", "--cut", "middle"], "invalid choice"),
    (["--policy", "smolvla", "--env", "libero-90"], "invalid choice: 'libero-90' (choose from 'pusht', "),
    (["--policy", "smolvla", "--env", "pusht", "--episodes", "0"], "--episodes"),
    (["--policy", "smolvla", "--env", "pusht", "--warmup-chunks", "0"], "--warmup-chunks must be at least 1"),
    (["--policy", "smolvla", "--env", "pusht", "--task-id", "1"], "task_id applies to the LIBERO envs only"),
    (["--policy", "smolvla", "--env", "libero-goal", "--task-id", "10"], "task_id 10 out of range [0, 9]"),
    (["--policy", "smolvla", "--env", "pusht", "--policy-path", "someorg/no-such-policy"], "hf download"),
])
def test_bad_flags(args, message):
    res = run_cli("policy", "eval", *args)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_lerobot_eval_runs_the_saved_pruned_policy(tmp_path):
    """lerobot's evaluator loads `smolvla_pruned` from a folder once `policies` is discovered."""
    from envs.sim import policy_features_for
    from policies.loading import load_pruned_policy

    policy, pre, post = load_pruned_policy("smolvla", "tiny", policy_features_for("pusht"), retain=0.25,
                                           n_action_steps=5)
    folder = tmp_path / "smolvla_pruned_tiny"
    for part in (policy, pre, post):
        part.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["type"] == "smolvla_pruned"
    lerobot_eval = shutil.which("lerobot-eval", path=str(Path(sys.executable).parent))
    res = subprocess.run([lerobot_eval, f"--policy.path={folder}", "--env.type=pusht", "--eval.n_episodes=1",
                          "--eval.batch_size=1", "--eval.use_async_envs=false", "--env.episode_length=10",
                          "--policy.device=cpu", f"--output_dir={tmp_path / 'eval'}",
                          "--env.discover_packages_path=policies"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 1


def test_the_table_names_episodes_the_simulator_stopped():
    from rich.console import Console

    from streamprune.cli import print_policy_eval

    console = Console(record=True, width=200)
    episodes = [{"seed": 3, "simulation_error": "step 56: Physics state is invalid. Warning(s) raised: mjWARN_BADQACC"},
                {"seed": 4, "simulation_error": None}]
    print_policy_eval({"random_weights": False, "policy": "pi0", "env": "aloha-transfer", "retain": 0.25,
                       "cut": "before", "n_episodes": 2, "success_rate": 0.0, "avg_sum_reward": 0.0,
                       "episodes": episodes}, console)
    text = console.export_text()
    assert "episode with seed 3 stopped by the simulator at step 56: Physics state is invalid" in text
    assert "seed 4" not in text


def test_encoder_reuse_in_policy_eval_reports_patches_computed():
    result = eval_json("--policy", "smolvla", "--env", "pusht", "--max-steps", "12", "--n-action-steps", "4",
                       "--encoder", "reuse", "--retain", "1.0")
    assert result["encoder"]["spec"] == "reuse:1" and result["chunks"] == 3
    computed = result["episodes"][0]["patches_computed"]
    assert computed[0] == 1.0 and all(0.0 <= f < 1.0 for f in computed[1:])  # PushT's background stays put
    assert result["mean_patches_computed"] < 1.0


def test_warmup_chunks_are_reported_apart_from_pruned_chunks():
    """`--warmup-chunks 2`: the first two chunks run unpruned; tokens and latency are split by phase, in the
    JSON and in the table, instead of one mean that mixes both ("40.0 of 64")."""
    args = ("--policy", "smolvla", "--env", "pusht", "--max-steps", "16", "--n-action-steps", "4",
            "--retain", "0.25", "--warmup-chunks", "2")
    result = eval_json(*args)
    episode = result["episodes"][0]
    assert episode["tokens_kept"] == [64, 64, 16, 16] and result["warmup_chunks"] == 2
    pruned, warmup = result["phases"]["pruned"], result["phases"]["warmup"]
    assert (pruned["chunks"], pruned["mean_tokens_kept"], pruned["mean_tokens_total"]) == (2, 16, 64)
    assert (warmup["chunks"], warmup["mean_tokens_kept"]) == (2, 64)
    latencies = episode["chunk_latencies_s"]  # each phase's percentiles over its own chunks only
    assert pruned["latency_p50_s"] == pytest.approx(statistics.median(latencies[2:]))
    assert warmup["latency_p50_s"] == pytest.approx(statistics.median(latencies[:2]))
    assert min(latencies[2:]) <= pruned["latency_p95_s"] <= max(latencies[2:])
    assert result["pruning_note"] is None and "mean_tokens_kept" not in result  # no mixed mean any more
    res = run_cli("policy", "eval", *args, env_extra={"COLUMNS": "200"})
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "16.0 of 64 (pruned chunks), 2 warm-up chunks at 64" in res.stdout
    assert "chunk latency, pruned (2 chunks)" in res.stdout and "chunk latency, warm-up (2 chunks)" in res.stdout


def test_a_run_too_short_to_prune_says_so():
    """ALOHA, 4 steps of 2-action chunks: 2 chunks, both warm-up. The report says retain was never applied,
    and lerobot's build notes ("gym id … not found", "Reducing the number of VLM layers") stay off stderr."""
    args = ("--policy", "smolvla", "--env", "aloha-insertion", "--max-steps", "4", "--n-action-steps", "2",
            "--retain", "0.25")
    res = run_cli("policy", "eval", *args, env_extra={"COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "no chunk was pruned: the run had 2 chunks, all warm-up" in res.stdout
    assert "retain 0.25 (never applied)" in res.stdout and "none pruned; 2 warm-up chunks at 64" in res.stdout
    assert res.stderr.strip() == "", res.stderr
    result = eval_json(*args)
    assert result["phases"]["pruned"] == {"chunks": 0, "latency_p50_s": None, "latency_p95_s": None,
                                          "mean_tokens_kept": None, "mean_tokens_total": None}
    assert result["pruning_note"].startswith("no chunk was pruned: the run had 2 chunks, all warm-up")


def test_policy_eval_help_states_every_default():
    res = run_cli("policy", "eval", "--help", env_extra={"COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for expected in ("--episodes EPISODES episodes to run, seeds SEED, SEED+1, ... [1]", "--seed SEED seed of the first episode [0]",
                     "[the env's episode length]", "actions executed per predicted chunk [the policy config's",
                     "--warmup-chunks N the first N action chunks of each episode run unpruned", "[3]"):
        assert expected in text, expected
