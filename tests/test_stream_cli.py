"""`streamprune stream` end to end: files, test patterns, a network stream from a local HTTP server that
dies mid-stream, and bad sources."""

from __future__ import annotations

import json
import os
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
    assert len(answers) == 3  # at 0 s, 2 s and 4 s of a 5.3 s video
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
