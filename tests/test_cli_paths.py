"""Issue 25: output paths are checked before any work (one `error:` line, exit 2), `--save-viz` writes the
format its suffix names, the figure agrees with the report, and a Ctrl-C while importing is one line."""

from __future__ import annotations

import configparser
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from streamprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--frames", "4", "--max-new-tokens", "2"]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """The CLI's `main(argv)` in this process: (exit code, stdout, stderr)."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc: int, err: str, *needles: str) -> None:
    """Exit 2 and stderr exactly one `error:` line (no blank line before it, no traceback)."""
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


# ---------------------------------------------------------------- summarize --save-viz


@pytest.mark.parametrize("case", ["folder", "under_a_file", "unknown_suffix"])
def test_bad_save_viz_is_refused_before_decoding(capsys, tmp_path, a_file, case):
    """The video does not exist: an error about --save-viz (not about the video) shows the path was checked
    before anything was decoded or loaded."""
    path, needle = {"folder": (tmp_path, "is a folder"), "under_a_file": (a_file / "x.png", "is a file"),
                    "unknown_suffix": (tmp_path / "x.gif", "unknown suffix")}[case]
    rc, out, err = run_main(capsys, "summarize", str(tmp_path / "missing.mp4"), "--save-viz", str(path))
    assert_one_error(rc, err, "--save-viz")
    assert needle in err and out == ""
    assert not (tmp_path / "x.gif").exists()


def test_save_viz_jpg_is_a_jpeg(capsys, tmp_path):
    path = tmp_path / "viz.jpg"
    rc, out, err = run_main(capsys, "summarize", "sample:bigbuckbunny", "--model", "tiny", "--retain", "0.1",
                            "--save-viz", str(path), "--json", *FAST)
    assert rc == 0, err
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG's start-of-image marker, not PNG's \x89PNG
    assert json.loads(out)["viz"] == str(path)
    with Image.open(path) as image:
        assert image.format == "JPEG"


def test_figure_counts_what_the_report_counts(capsys, tmp_path):
    """The PNG's header line (stored as its Description) gives the report's 'into the LLM' count, newline
    tokens included, and the kept count, as the report does."""
    path = tmp_path / "viz.png"
    rc, out, err = run_main(capsys, "summarize", "sample:bigbuckbunny", "--model", "tiny", "--retain", "0.1",
                            "--save-viz", str(path), "--json", *FAST)
    assert rc == 0, err
    tokens = json.loads(out)["tokens"]
    assert tokens["layout"] >= 1  # LLaVA-OneVision adds a newline token: the case where the two disagreed
    with Image.open(path) as image:
        assert image.format == "PNG"
        line = image.info["Description"]
    assert f"→ {tokens['llm_input']} into the LLM ({tokens['kept']} kept" in line, line
    assert f"+ {tokens['layout']} newline" in line


def test_method_none_title_says_no_reduction(capsys, tmp_path):
    path = tmp_path / "none.png"
    rc, _, err = run_main(capsys, "summarize", "sample:bigbuckbunny", "--model", "tiny", "--method", "none",
                          "--retain", "0.1", "--save-viz", str(path), *FAST)
    assert rc == 0, err
    with Image.open(path) as image:
        title = image.info["Title"]
    assert "no reduction" in title and "retain" not in title, title


@pytest.mark.parametrize("args", [["--method", "fastv"], ["--method", "none", "--inner", "fastv"]])
def test_fastv_report_claims_no_merge_mode(capsys, args):
    """FastV drops tokens inside the LLM; the report must not say they were merged by a mean."""
    rc, out, err = run_main(capsys, "summarize", "sample:bigbuckbunny", "--model", "tiny", "--json", *args, *FAST)
    assert rc == 0, err
    inner = json.loads(out)["inner"]
    assert inner["mode"] != "none" and inner["merge"] is None, inner


# ---------------------------------------------------------------- batch and bench --out


@pytest.mark.parametrize("case", ["folder", "under_a_file"])
def test_batch_bad_out_is_refused(capsys, tmp_path, a_file, case):
    out = {"folder": tmp_path, "under_a_file": a_file / "rows.jsonl"}[case]
    rc, stdout, err = run_main(capsys, "batch", "sample:bigbuckbunny", "--out", str(out), "--ray", "none", *FAST)
    assert_one_error(rc, err, "--out")
    assert stdout == ""


def test_batch_missing_source_is_an_error_before_work(capsys, tmp_path):
    out = tmp_path / "rows.jsonl"
    rc, stdout, err = run_main(capsys, "batch", str(tmp_path / "vidoes"), "--out", str(out), "--ray", "none", *FAST)
    assert_one_error(rc, err, "source not found", "vidoes")
    assert not out.exists() and stdout == ""


@pytest.mark.parametrize("case", ["a_file", "under_a_file"])
def test_bench_bad_out_is_refused_before_decoding(capsys, tmp_path, a_file, case):
    """--out is bench's output folder; the missing video shows nothing was read before the check."""
    out = {"a_file": a_file, "under_a_file": a_file / "bench"}[case]
    rc, stdout, err = run_main(capsys, "bench", str(tmp_path / "missing.mp4"), "--out", str(out),
                               "--methods", "holitom", "--retain", "0.1", "--repeats", "1")
    assert_one_error(rc, err, "--out", "is a file")
    assert stdout == "" and a_file.read_text() == "not a folder\n"


# ---------------------------------------------------------------- stderr of a real process


def test_no_blank_line_before_error(tmp_path):
    """The progress display is stopped before the error is printed; off a terminal it must print nothing."""
    res = subprocess.run([sys.executable, "-m", "streamprune", "summarize", str(tmp_path / "missing.mp4")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, repr(res.stderr)


def console_script() -> list[str]:
    """The command setup.cfg's `streamprune` entry point runs, as pip's generated script runs it."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    entries = dict(line.split("=", 1) for line in config["options.entry_points"]["console_scripts"].strip().splitlines())
    module, _, function = entries["streamprune "].strip().partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


@pytest.mark.parametrize("how", ["console_script", "python -m"])
def test_ctrl_c_while_importing_is_one_line(how):
    command = console_script() if how == "console_script" else [sys.executable, "-m", "streamprune"]
    proc = subprocess.Popen([*command, "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    time.sleep(0.3)  # torch alone takes over a second to import
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err == "interrupted\n" and out == "", repr(err)
