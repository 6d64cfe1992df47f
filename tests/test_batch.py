"""`streamprune batch`: a folder of videos (the sample videos plus two broken files) on a local Ray cluster
started here, rows equal to `summarize --json`, errors as rows, and resuming a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamprune.batch import BatchOptions, collect_videos, done_keys, run_batch
from streamprune.sources import list_sample_videos
from streamprune.summarize import SummarizeOptions, summarize

SETTINGS = dict(frames=4, retain=0.25, max_new_tokens=3)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    """The four sample videos and two broken files: 6 videos, 2 of which cannot be read."""
    folder = tmp_path_factory.mktemp("videos")
    for name, path in list_sample_videos().items():
        shutil.copy(path, folder / f"{name}.mp4")
    (folder / "empty.mp4").touch()
    (folder / "garbage.mp4").write_bytes(os.urandom(40_000))
    (folder / "notes.md").write_text("not a video, not collected\n")
    return folder


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_sources_are_folders_globs_and_lists(video_folder, tmp_path):
    in_folder = collect_videos([str(video_folder)])
    assert len(in_folder) == 6 and all(p.endswith(".mp4") for p in in_folder)
    assert collect_videos([str(video_folder / "bi*.mp4")]) == [str(video_folder / "bigbuckbunny.mp4"),
                                                               str(video_folder / "bikes.mp4")]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two videos\n{video_folder / 'bikes.mp4'}\nrelative.mp4\n")
    assert collect_videos([str(listing)]) == [str(video_folder / "bikes.mp4"), str(tmp_path / "relative.mp4")]
    table = tmp_path / "list.csv"
    table.write_text(f"id,path\n1,{video_folder / 'bikes.mp4'}\n2,{video_folder / 'bikes.mp4'}\n")
    assert collect_videos([str(table)]) == [str(video_folder / "bikes.mp4")]  # duplicates once


def test_batch_on_a_local_ray_cluster_equals_summarize(video_folder, ray_cluster, tmp_path):
    out = tmp_path / "results.jsonl"
    opts = BatchOptions(sources=[str(video_folder)], out=str(out), summarize=SummarizeOptions(video="", **SETTINGS),
                        ray="local", workers=2)
    report = run_batch(opts)
    assert (report.total, report.done, report.failed, report.skipped) == (6, 4, 2, 0)
    assert report.engine.startswith("ray")
    rows = {Path(r["source"]).name: r for r in rows_of(out)}
    assert set(rows) == {f"{n}.mp4" for n in list_sample_videos()} | {"empty.mp4", "garbage.mp4"}
    for name in ("empty.mp4", "garbage.mp4"):
        assert rows[name]["error"] and "summary" not in rows[name]
    for name in list_sample_videos():
        row = rows[f"{name}.mp4"]
        expected = summarize(SummarizeOptions(video=row["source"], **SETTINGS)).to_dict()
        assert row["tokens"] == expected["tokens"] and row["segments"] == expected["segments"]
        assert row["summary"] == expected["summary"] and row["flops"] == expected["flops"]
    workers = {r["worker"]["pid"] for r in rows.values() if "summary" in r}
    assert os.getpid() not in workers and all(r["worker"]["peak_rss_mb"] > 0 for r in rows.values())


def run_cli(*args: str) -> subprocess.Popen:
    """`streamprune batch` in its own session, so killing the group also kills a local Ray cluster it started
    (as Ctrl-C on a terminal would)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "streamprune", "batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def cli_args(folder: Path, out: Path, ray: str = "none") -> list[str]:
    return [str(folder), "--out", str(out), "--ray", ray, "--frames", "4", "--retain", "0.25",
            "--max-new-tokens", "3"]


def test_cli_batch_exits_1_with_broken_videos_and_retries_them(video_folder, tmp_path):
    """Failed videos make the run exit 1 and say so; a rerun retries them (replacing their error rows) unless
    --skip-failed."""
    out = tmp_path / "r.jsonl"
    proc = run_cli(*cli_args(video_folder, out))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr
    assert "4 summarized, 2 failed, 0 skipped" in stdout and "in-process" in stdout
    assert stdout.strip().splitlines()[-1].endswith("exit 1: 2 failed (see their `error` rows)")
    assert "Traceback" not in stderr
    assert len(rows_of(out)) == 6

    skipping = run_cli(*cli_args(video_folder, out), "--skip-failed")
    stdout, stderr = skipping.communicate(timeout=600)
    assert skipping.returncode == 0, stderr
    assert "0 summarized, 0 failed, 6 skipped" in stdout and "exit 1" not in stdout
    assert len(rows_of(out)) == 6

    retry = run_cli(*cli_args(video_folder, out))
    stdout, stderr = retry.communicate(timeout=600)
    assert retry.returncode == 1, stderr
    assert "0 summarized, 2 failed, 4 skipped" in stdout
    rows = rows_of(out)
    assert len(rows) == 6 and sorted(Path(r["source"]).name for r in rows[-2:]) == ["empty.mp4", "garbage.mp4"]
    assert all("error" in r for r in rows[-2:]) and not any("error" in r for r in rows[:4])


def test_cli_batch_of_good_videos_exits_0(tmp_path):
    out = tmp_path / "r.jsonl"
    proc = run_cli("sample:bigbuckbunny", "sample:bikes", "--out", str(out), "--ray", "none", "--frames", "4",
                   "--retain", "0.25", "--max-new-tokens", "3")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert stdout.startswith("2 summarized, 0 failed") and "exit 1" not in stdout and stderr == ""


@pytest.fixture(scope="module")
def long_video_folder(video_folder, tmp_path_factory) -> Path:
    """The six videos of `video_folder` and a second copy of the four samples: 10 videos. Ray hands rows to
    the driver as blocks finish, and on a loaded machine several can land between two polls; with this many
    the run cannot be over by the time two rows are seen."""
    folder = tmp_path_factory.mktemp("long")
    for path in video_folder.glob("*.mp4"):
        shutil.copy(path, folder / path.name)
    for name, path in list_sample_videos().items():
        shutil.copy(path, folder / f"{name}_copy.mp4")
    return folder


@pytest.mark.parametrize("ray", ["none", "local"])
def test_a_killed_run_resumes_without_redoing_videos(long_video_folder, tmp_path, ray):
    """Rows reach --out as each video finishes (on Ray too: nothing buffers them), so a run killed after two
    keeps them, and the rerun does only the rest."""
    video_folder, total = long_video_folder, 10
    out = tmp_path / "r.jsonl"
    proc = run_cli(*cli_args(video_folder, out, ray))
    deadline = time.time() + 600
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    before = out.read_text().splitlines()
    assert 2 <= len(before) < total, "the run finished before it could be killed"
    first = [json.loads(line)["source"] for line in before]
    rerun = run_cli(*cli_args(video_folder, out, ray), "--skip-failed")  # keep the killed run's error rows
    stdout, stderr = rerun.communicate(timeout=600)
    after = out.read_text().splitlines()
    failed_now = any("error" in json.loads(line) for line in after[len(before):])
    assert rerun.returncode == (1 if failed_now else 0) and "Traceback" not in stderr, stderr
    assert f"{len(before)} skipped" in stdout
    assert after[: len(before)] == before  # nothing redone or rewritten
    sources = [json.loads(line)["source"] for line in after]
    assert len(sources) == total and len(set(sources)) == total and sources[: len(first)] == first
    assert len(done_keys(out)) == total


def test_bad_options_are_one_line_errors(video_folder, tmp_path):
    for args, message in ((["--workers", "0"], "--workers"), (["--retain", "2"], "--retain"),
                          (["--method", "nope"], "unknown method"),
                          (["--ray", "127.0.0.1:1"], "cannot reach the Ray cluster"),
                          (["--out", str(tmp_path)], "is a folder")):
        proc = run_cli(str(video_folder), "--out", str(tmp_path / "x.jsonl"), "--ray", "none", *args)
        # (a later --out replaces the first)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_cli_batch_on_ray_prints_only_our_output(tmp_path):
    """Ray's C++ `E`/`I` log lines and its Python notices stay off stderr on a clean run."""
    out = tmp_path / "r.jsonl"
    proc = run_cli("sample:bigbuckbunny", "--out", str(out), "--ray", "local", "--frames", "4", "--retain", "0.25",
                   "--max-new-tokens", "3")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert stderr == "", stderr
    assert stdout.startswith("1 summarized, 0 failed") and "[ray (local" in stdout
