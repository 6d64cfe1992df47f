"""The lmms-eval backend on the tiny random-weight model and a real sample video.

The core (`VideoQA`, what the lmms-eval class delegates to) is tested in both environments; the lmms-eval
class, its registration, its entry point and a whole evaluation in tests/test_lmms_eval_loop.py, in the video
environment, which has lmms-eval."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import streamprune.summarize as summarize_pipeline
from streamprune.errors import ConfigError
from streamprune.integrations import lmms_eval as backend

FRAMES = 8
NEW_TOKENS = 4
QUESTION = "What is the animal doing?\n(A) sleeping\n(B) running\nAnswer with the option's letter."
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def holitom_qa() -> backend.VideoQA:
    return backend.VideoQA("tiny", method="holitom", retain=0.25, frames=FRAMES, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def unreduced_qa() -> backend.VideoQA:
    return backend.VideoQA("tiny", method="none", frames=FRAMES, max_new_tokens=NEW_TOKENS)


def test_answers_are_text_and_the_method_cuts_llm_tokens(holitom_qa, unreduced_qa, sample_video):
    reduced, full = holitom_qa.run(sample_video, QUESTION), unreduced_qa.run(sample_video, QUESTION)
    for report in (reduced, full):
        assert isinstance(report.summary, str) and report.summary.strip()
        assert 1 <= report.generated_tokens <= NEW_TOKENS
        assert report.frames == FRAMES
    vision = full.tokens["vision"]
    assert reduced.tokens["vision"] == vision and full.tokens["kept"] == vision
    assert reduced.tokens["kept"] <= round(0.25 * vision)
    assert reduced.tokens["prompt"] < full.tokens["prompt"] - 0.7 * vision  # the LLM really got fewer tokens
    assert holitom_qa.answer(sample_video, QUESTION) == reduced.summary.strip()  # greedy: same answer again


def test_model_is_loaded_once(holitom_qa, sample_video, monkeypatch):
    def no_reload(name):
        raise AssertionError(f"model {name!r} loaded again")

    monkeypatch.setattr(summarize_pipeline, "load_video_llm", no_reload)
    assert holitom_qa.answer(sample_video, QUESTION, max_new_tokens=2)  # summarize runs on the loaded model


def test_bad_model_args_fail_before_loading(monkeypatch):
    monkeypatch.setattr(backend, "load_video_llm", lambda name: pytest.fail("loaded despite a bad arg"))
    with pytest.raises(ConfigError, match="unknown method"):
        backend.VideoQA("tiny", method="no-such-method")
    with pytest.raises(ConfigError, match="retain"):
        backend.VideoQA("tiny", retain=1.5)


def test_stop_strings_and_visuals():
    assert backend.cut_at_stops(" B) running\n\nQuestion:", ["\n\n", "Question:"]) == "B) running"
    assert backend.cut_at_stops("A", None) == "A"
    assert backend.single_video(["/data/v.mp4"]) == "/data/v.mp4"
    with pytest.raises(ValueError, match="one video path"):
        backend.single_video(["/a.mp4", "/b.mp4"])
    with pytest.raises(ValueError, match="one video path"):
        backend.single_video([object()])


def test_importing_streamprune_does_not_import_lmms_eval():
    code = "import sys, streamprune, streamprune.summarize; assert 'lmms_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
