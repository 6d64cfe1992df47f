"""`streamprune stream` end to end: files, test patterns, a network stream from a local HTTP server that
dies mid-stream, and bad sources."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from tests.test_summarize import run_cli


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_stream_file_json_lines_with_questions(sample_video):
    res = run_cli("stream", str(sample_video), "--json-lines", "--ask", "What happens?", "--every", "2",
                  "--max-context-tokens", "1500")
    assert res.returncode == 0, res.stderr
    events = json_lines(res.stdout)
    segments = [e for e in events if e["event"] == "segment"]
    answers = [e for e in events if e["event"] == "answer"]
    final = events[-1]
    assert final["event"] == "final" and final["frames_in"] == 132
    assert segments[0]["frames"][0] == 0 and segments[-1]["frames"][1] == 131
    assert all(b["frames"][0] == a["frames"][1] + 1 for a, b in zip(segments, segments[1:], strict=False))
    # periodic answers wait for the first closed segment (none at 0 s, before anything is cached), then every 2 s
    first_segment = events.index(segments[0])
    assert answers and all(events.index(a) > first_segment for a in answers)
    assert answers[0]["stream_time_s"] >= segments[0]["time_s"][1] > 0
    assert all(b["stream_time_s"] - a["stream_time_s"] >= 2 for a, b in zip(answers, answers[1:], strict=False))
    assert final["max_context_tokens"] == 1500
    assert max(e["kv_tokens"] for e in segments) <= 1500 - 32
    assert final["frames_skipped"] + final["frames_encoded"] == final["frames_in"]


def test_stream_still_pattern_text_summary():
    res = run_cli("stream", "synthetic:static", "--max-frames", "300", "--ui", "none")
    assert res.returncode == 0, res.stderr
    assert "frames 300 (skipped 299, encoded 1)" in res.stdout


def test_stream_moving_pattern_with_encoder_reuse():
    res = run_cli("stream", "synthetic:moving-box", "--max-frames", "12", "--ui", "none", "--json-lines",
                  "--encoder", "reuse")
    assert res.returncode == 0, res.stderr
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert final["patches_total"] == final["frames_encoded"] * 729 > 729
    assert final["patches_computed"] < final["patches_total"]  # only around the moving box after the first frame


def test_stream_killed_http_server_reconnects_then_fails_cleanly(serve, stream_videos):
    video = stream_videos["mp4"]
    url = serve(video, cut_at=video.path.stat().st_size // 2, fault="kill")
    res = run_cli("stream", url, "--json-lines", "--ui", "none")
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    notes = [line for line in res.stderr.splitlines() if line.startswith("note: reconnecting")]
    assert len(errors) == 1 and "lost after 3 reconnect attempts" in errors[0] and "Traceback" not in res.stderr
    assert len(notes) == 3
    events = json_lines(res.stdout)
    assert events[-1]["event"] == "stats_before_error"
    assert 0 < events[-1]["frames_in"] < 600  # the stats so far: what arrived before the server died
    assert len(events[-1]["source_events"]) == 3


def test_stream_bad_sources():
    for source, message in [("/dev/video42", "webcam /dev/video42 not found"),
                            ("missing.mp4", "video not found: missing.mp4"),
                            ("ftp://example/x", "ftp"),
                            ("http://127.0.0.1:9/none.ts", "cannot open stream")]:
        res = run_cli("stream", source, "--ui", "none")
        assert res.returncode == 2, source
        assert message in res.stderr.splitlines()[-1] and "Traceback" not in res.stderr


def test_stream_bad_flags():
    for args, message in [(["--every", "2"], "--every needs --ask"),
                          (["--ask", "q", "--every", "0"], "--every must be"),
                          (["--retain", "0"], "--retain"),
                          (["--max-context-tokens", "8"], "--max-context-tokens")]:
        res = run_cli("stream", "synthetic", "--max-frames", "3", "--ui", "none", *args)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)


def test_stream_web_view_counters_update():
    """The CLI's web view on 127.0.0.1 serves the engine's live counters while the stream runs."""
    proc = subprocess.Popen([sys.executable, "-m", "streamprune", "stream", "synthetic:moving-box", "--ui", "web",
                             "--realtime", "--max-frames", "150"], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stderr.readline()
        assert line.startswith("web view: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].strip()
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(set(seen)) < 3:
            time.sleep(0.5)
            with urllib.request.urlopen(url + "stats.json", timeout=5) as response:
                seen.append(json.load(response).get("frames_in", 0))
        assert len(set(seen)) >= 3 and seen == sorted(seen)  # counters move forward while streaming
        with urllib.request.urlopen(url, timeout=5) as response:
            assert b"streamprune" in response.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_live_sources_get_a_default_context_budget_files_do_not(sample_video):
    """A test pattern (like a webcam or URL) may never end: bounded by default; a file stays unbounded unless
    asked; `--max-context-tokens none` lifts the bound. The default is stated in --help."""
    def final(*args: str) -> dict:
        res = run_cli("stream", *args, "--max-frames", "4", "--json-lines")
        assert res.returncode == 0, res.stderr
        return json_lines(res.stdout)[-1]

    assert final("synthetic:static")["max_context_tokens"] == 4096
    assert final("synthetic:static", "--max-context-tokens", "none")["max_context_tokens"] is None
    assert final(str(sample_video))["max_context_tokens"] is None
    assert final(str(sample_video), "--max-context-tokens", "2048")["max_context_tokens"] == 2048
    res = run_cli("stream", "--help", env_extra={"COLUMNS": "200"})
    assert "[4096 for a webcam, network URL or test pattern; unbounded for a file]" in " ".join(res.stdout.split())
    res = run_cli("stream", "synthetic", "--max-context-tokens", "lots")
    assert res.returncode == 2 and "expected a number of tokens or none" in res.stderr


def interrupt_after_first_line(*args: str) -> tuple[str, str, str, int]:
    """Run `stream` on the paced test pattern, send SIGINT (Ctrl-C) once the first line is on stdout; return
    (first line, rest of stdout, stderr, exit code)."""
    proc = subprocess.Popen([sys.executable, "-m", "streamprune", "stream", "synthetic:moving-box", "--realtime",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return first, out, err, proc.returncode


def test_ctrl_c_emits_a_final_json_event_with_the_stats_so_far():
    first, out, err, code = interrupt_after_first_line("--json-lines")
    assert json.loads(first)["event"] == "segment"  # interrupted after the first segment
    final = json_lines(out)[-1]
    assert final["event"] == "final" and final["reason"] == "interrupted"
    assert final["segments"] >= 1 and final["frames_in"] > 0 and final["max_context_tokens"] == 4096
    assert code == 130 and err.strip() == "interrupted" and "Traceback" not in err


def test_periodic_answers_are_printed_without_a_tty_and_ctrl_c_prints_the_stats():
    """No TTY and no --json-lines: each periodic answer is a plain line, after the first segment is cached;
    Ctrl-C then prints the stats so far, not just "interrupted"."""
    first, out, err, code = interrupt_after_first_line("--ask", "What moves?", "--every", "0.2")
    assert first.startswith("answer at ") and float(first.split()[2]) > 0  # not at t = 0
    assert out.startswith("interrupted · frames ") and "segments " in out
    assert code == 130 and err.strip() == "interrupted" and "Traceback" not in err
