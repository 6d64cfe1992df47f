"""The lmms-eval backend on the tiny random-weight model and a real sample video.

The core (`VideoQA`, what the lmms-eval class delegates to) is tested always; the lmms-eval class, its
registration and its entry point only where lmms-eval is importable (it is not in the project's venv:
run with `PYTHONPATH=<a site dir holding lmms-eval>`)."""

from __future__ import annotations

import os
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


class _Dataset:
    """lmms-eval's `task_dict[task][split]`: docs by doc_id."""

    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs

    def __getitem__(self, doc_id: int) -> dict:
        return self.docs[doc_id]


def test_lmms_eval_generate_until(sample_video):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.models import get_model

    backend.register()
    assert get_model("streamprune").__name__ == "StreamPruneModel"
    docs = [{"video": str(sample_video), "question": QUESTION}] * 2

    def answers(model_args: str) -> list[GenerationResult]:
        model = get_model("streamprune").create_from_arg_string(model_args, {"batch_size": 1})
        model.task_dict = {"videomme": {"test": _Dataset(docs)}}
        gen_kwargs = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
        requests = [Instance("generate_until", (doc["question"], gen_kwargs, lambda d: [d["video"]], i, "videomme",
                                                "test"), idx=0, metadata={"task": "videomme", "doc_id": i,
                                                                          "repeats": 1})
                    for i, doc in enumerate(docs)]
        return model.generate_until(requests)

    reduced = answers(f"pretrained=tiny,method=holitom,retain=0.25,frames={FRAMES}")
    full = answers(f"pretrained=tiny,method=none,frames={FRAMES}")
    assert len(reduced) == len(docs) == len(full)
    for r, f in zip(reduced, full, strict=True):
        assert isinstance(r.text, str) and r.text and isinstance(f.text, str) and f.text
        assert r.token_counts.output_tokens <= NEW_TOKENS
        assert r.token_counts.input_tokens < f.token_counts.input_tokens * 0.5
    with pytest.raises(NotImplementedError, match="generate_until only"):
        get_model("streamprune").create_from_arg_string(f"frames={FRAMES}").loglikelihood([])
    with pytest.raises(ConfigError, match="unknown streamprune model_args: retian"):
        get_model("streamprune").create_from_arg_string("retian=0.2")


def test_lmms_eval_finds_the_model_through_an_entry_point(tmp_path):
    """What a `lmms_eval.models` entry point in streamprune's metadata would do, from a stand-in dist-info
    (the real one would come from setup.cfg): plain lmms-eval resolves `streamprune` to the class."""
    pytest.importorskip("lmms_eval")
    dist = tmp_path / "streamprune_lmms_entry_point-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: streamprune-lmms-entry-point\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\n"
                                           "streamprune = streamprune.integrations.lmms_eval:lmms_eval_manifest\n")
    code = "from lmms_eval.models import get_model; print(get_model('streamprune').__module__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "streamprune.integrations.lmms_eval"
