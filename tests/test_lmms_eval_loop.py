"""The lmms-eval backend inside lmms-eval itself (the video environment, which has lmms-eval; tests/conftest.py):
the registered class answers `generate_until` requests, lmms-eval finds it through the entry point, and a real
`simple_evaluate` runs end to end on the tiny model over a local task made from a sample video."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streamprune.errors import ConfigError
from streamprune.integrations import lmms_eval as backend
from tests.test_lmms_eval import FRAMES, NEW_TOKENS, QUESTION, ROOT


class _Dataset:
    """lmms-eval's `task_dict[task][split]`: docs by doc_id."""

    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs

    def __getitem__(self, doc_id: int) -> dict:
        return self.docs[doc_id]


def test_lmms_eval_generate_until(sample_video):
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
    dist = tmp_path / "streamprune_lmms_entry_point-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: streamprune-lmms-entry-point\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\n"
                                           "streamprune = streamprune.integrations.lmms_eval:lmms_eval_manifest\n")
    code = "from lmms_eval.models import get_model; print(get_model('streamprune').__module__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "streamprune.integrations.lmms_eval"


TASK_YAML = """task: streamprune_sample_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function sample_qa.doc_to_visual
doc_to_text: !function sample_qa.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {tokens}
  temperature: 0
  do_sample: false
  until: ["\\n\\n"]
process_results: !function sample_qa.process_results
metric_list:
  - metric: answered
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"answered": float(bool(results[0].strip()))}
'''


def test_a_whole_lmms_eval_run_on_a_local_task(sample_video, tmp_path):
    """The documented launcher, end to end: lmms-eval loads a task from a local folder (two questions on the
    bundled sample video, no download), runs streamprune's model on it and writes its results."""
    import json

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"video": str(sample_video), "question": QUESTION, "answer": "B"}) + "\n"
                            for _ in range(2)))
    (tasks / "sample_qa.yaml").write_text(TASK_YAML.format(docs=docs, tokens=NEW_TOKENS))
    (tasks / "sample_qa.py").write_text(TASK_UTILS)
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-m", "streamprune.integrations.lmms_eval", "eval", "--model", "streamprune",
                          "--model_args", f"pretrained=tiny,method=holitom,retain=0.25,frames={FRAMES}",
                          "--tasks", "streamprune_sample_qa", "--include_path", str(tasks), "--device", "cpu",
                          "--output_path", str(out), "--log_samples"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*results*.json")]
    assert results, f"no results file under {out}: {sorted(p.name for p in out.rglob('*'))}"
    task = results[0]["results"]["streamprune_sample_qa"]
    assert task["answered,none"] == 1.0  # both questions got a non-empty answer from the pruned tiny model
    samples = [line for p in out.rglob("*samples*.jsonl") for line in p.read_text().splitlines()]
    assert len(samples) == 2
