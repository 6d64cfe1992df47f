"""lmms-eval model backend `streamprune`: any streamprune reduction method on lmms-eval's video benchmarks.

Each request is one run of streamprune's own pipeline (`streamprune.summarize.summarize`) with the task's
question as the prompt: decode the task's video with streamprune's reader, vision tower, reduction, LLM
generation, on a model loaded once per evaluation. The core (`VideoQA`) does not need lmms-eval; the
lmms-eval class (`StreamPruneModel`) exists only when lmms-eval (0.7.x) is importable.

How lmms-eval 0.7 finds the model: `--model NAME` is resolved through `lmms_eval.models.MODEL_REGISTRY_V2`
(model manifests: built-ins, then the `lmms_eval.models` entry-point group), not through the older
`lmms_eval.api.registry.register_model` decorator, which is still applied here but which 0.7's evaluator does
not read. So `streamprune` is made available by one of:

- the launcher, nothing to configure: `python -m streamprune.integrations.lmms_eval --model streamprune ...`
  registers the manifest, then runs lmms-eval's own CLI on the remaining arguments;
- an entry point in the installed package's metadata, for a plain `lmms-eval --model streamprune`:
  group `lmms_eval.models`, `streamprune = streamprune.integrations.lmms_eval:lmms_eval_manifest`;
- from Python: `lmms_eval.evaluator.simple_evaluate(model=StreamPruneModel(...), tasks=[...])`.

Output types: videomme, mvbench, longvideobench_val_v and egoschema are all `generate_until` tasks; only the
`egoschema_mcppl` / `egoschema_subset_mcppl` variants are `multiple_choice` (→ `loglikelihood`), which this
backend does not implement.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

from streamprune.errors import ConfigError
from streamprune.models import load_video_llm
from streamprune.reduce.inner_cuts import InnerConfig
from streamprune.summarize import SummarizeOptions, SummaryReport, summarize

try:
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ModuleNotFoundError as exc:
    if exc.name != "lmms_eval":  # lmms-eval is installed but broken: say so rather than hide the class
        raise
    LMMS_EVAL_AVAILABLE = False
else:
    LMMS_EVAL_AVAILABLE = True

MODEL_NAME = "streamprune"
CLASS_PATH = f"{__spec__.name if __spec__ else __name__}.StreamPruneModel"
INSTALL_HINT = "lmms-eval is not installed; `pip install lmms-eval==0.7.3` next to streamprune"

# stdlib logging, not `warnings`: importing lmms-eval turns every Python warning off (lmms_eval.utils)
log = logging.getLogger(__name__)


def pipeline_options(pretrained: str = "tiny", method: str | None = None, retain: float | None = None,
                     frames: int | None = None, inner: str | None = None,
                     max_new_tokens: int | None = None, device: str | None = None, dtype: str | None = None,
                     attn_implementation: str | None = None, compile: bool | str | None = None) -> SummarizeOptions:
    """`SummarizeOptions` for these model args; an arg left None keeps `streamprune summarize`'s default.

    `video` and `prompt` are placeholders, set per request. `device` / `dtype` / `attn_implementation` as in
    `streamprune summarize` (auto: a GPU in bf16 when one is visible); `compile`: compiled static-cache decode,
    worth it over a whole evaluation (compiled once, reused by every request)."""
    given = {"method": method, "retain": None if retain is None else float(retain),
             "frames": None if frames is None else int(frames),
             "inner": None if inner is None else InnerConfig(mode=str(inner)),
             "max_new_tokens": None if max_new_tokens is None else int(max_new_tokens),
             "device": None if device is None else str(device), "dtype": None if dtype is None else str(dtype),
             "attn_implementation": attn_implementation,
             "compile": None if compile is None else str(compile).lower() in ("1", "true", "yes")}
    opts = SummarizeOptions(video="", model=str(pretrained), **{k: v for k, v in given.items() if v is not None})
    opts.validate()  # a bad arg fails now, before the model and lmms-eval's datasets load
    return opts


def cut_at_stops(text: str, until: str | Sequence[str] | None) -> str:
    """`text` up to the first of the stop strings (lmms-eval's `until` generation kwarg), stripped."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


class VideoQA:
    """A video LLM loaded once plus the reduction to run on it: the lmms-eval backend without lmms-eval.

    `run(video, question)` is one `streamprune summarize` run with `question` as the prompt and returns its
    report (answer text, token counts, FLOPs, timing); `answer(...)` returns just the text."""

    def __init__(self, pretrained: str = "tiny", method: str | None = None, retain: float | None = None,
                 frames: int | None = None, inner: str | None = None, max_new_tokens: int | None = None,
                 device: str | None = None, dtype: str | None = None, attn_implementation: str | None = None,
                 compile: bool | str | None = None) -> None:
        self.options = pipeline_options(pretrained, method, retain, frames, inner, max_new_tokens, device, dtype,
                                        attn_implementation, compile)
        opts = self.options
        self.loaded = load_video_llm(opts.model, opts.device, opts.dtype, opts.attn_implementation)
        if self.loaded.random_weights:
            log.warning("%r has random weights: answers are noise and benchmark scores meaningless "
                        "(token counts and timing are real)", self.options.model)

    def run(self, video: str | os.PathLike, question: str, max_new_tokens: int | None = None) -> SummaryReport:
        """The pipeline on one video (a path, or `sample:NAME`) with `question` as the prompt."""
        opts = replace(self.options, video=os.fspath(video), prompt=question,
                       max_new_tokens=self.options.max_new_tokens if max_new_tokens is None else int(max_new_tokens))
        return summarize(opts, loaded=self.loaded)

    def answer(self, video: str | os.PathLike, question: str, max_new_tokens: int | None = None,
               until: str | Sequence[str] | None = None) -> str:
        """The model's answer to `question` about `video`, cut at the first stop string of `until`."""
        return cut_at_stops(self.run(video, question, max_new_tokens).summary, until)


def single_video(visuals: object) -> str:
    """The video path a video task's `doc_to_visual` gives (lmms-eval's video tasks return `[path]`)."""
    items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    if len(items) != 1 or not isinstance(items[0], (str, os.PathLike)):
        kinds = ", ".join(type(item).__name__ for item in items) or "nothing"
        raise ValueError(f"the streamprune backend evaluates video tasks: doc_to_visual must give one video "
                         f"path, got {kinds}")
    return os.fspath(items[0])


def _require_lmms_eval() -> None:
    if not LMMS_EVAL_AVAILABLE:
        raise ImportError(INSTALL_HINT)


def lmms_eval_manifest():
    """The manifest lmms-eval 0.7 registers as `streamprune` (the `lmms_eval.models` entry-point target).

    Imports only lmms-eval's registry module: entry points are loaded while `lmms_eval.models` itself is
    still being imported."""
    _require_lmms_eval()
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make `--model streamprune` resolvable by lmms-eval in this process (idempotent)."""
    _require_lmms_eval()
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)


def main() -> None:
    """`python -m streamprune.integrations.lmms_eval ARGS`: lmms-eval's own CLI with `streamprune` registered."""
    from streamprune.extras import MissingExtra, require_extra

    try:
        require_extra("eval", "the lmms-eval launcher")
    except MissingExtra as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    register()
    from lmms_eval.cli.dispatch import main as lmms_eval_cli

    lmms_eval_cli()


if LMMS_EVAL_AVAILABLE:

    @register_model(MODEL_NAME)
    class StreamPruneModel(lmms):
        """lmms-eval model `streamprune`: model args `pretrained` (hub ID, local folder or `tiny`), `method`
        (a name in `streamprune.reduce.methods.REGISTRY`), `retain`, `frames`, `inner` (inner mode),
        `max_new_tokens` (used when a task sets none), `dtype`, `attn_implementation` and `compile`; lmms-eval's
        own `--device` (auto, cpu, cuda, cuda:N) picks the device. Requests run one at a time, greedily."""

        is_simple = True  # takes (context, gen_kwargs, doc_to_visual, doc_id, task, split) requests

        def __init__(self, pretrained: str = "tiny", method: str | None = None, retain: float | None = None,
                     frames: int | None = None, inner: str | None = None, max_new_tokens: int | None = None,
                     batch_size: int | str = 1, device: str | None = None, max_batch_size: int | None = None,
                     dtype: str | None = None, attn_implementation: str | None = None,
                     compile: bool | str | None = None, **unknown: object) -> None:
            super().__init__()
            if unknown:  # a misspelt arg must not silently evaluate the defaults
                raise ConfigError(f"unknown streamprune model_args: {', '.join(sorted(unknown))}; known: "
                                  "pretrained, method, retain, frames, inner, max_new_tokens, dtype, "
                                  "attn_implementation, compile")
            if str(batch_size) != "1":
                log.warning("batch_size %s ignored: streamprune answers one request at a time", batch_size)
            self.qa = VideoQA(pretrained, method, retain, frames, inner, max_new_tokens, device, dtype,
                              attn_implementation, compile)
            self._warned_sampling = False

        def generate_until(self, requests: list) -> list[GenerationResult]:
            """One pipeline run per request; token counts are the reduced LLM prompt and the generated tokens."""
            results = []
            for request in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                gen_kwargs = dict(gen_kwargs or {})
                self._warn_if_sampling(gen_kwargs)
                video = single_video(doc_to_visual(self.task_dict[task][split][doc_id]))
                report = self.qa.run(video, context, gen_kwargs.get("max_new_tokens"))
                text = cut_at_stops(report.summary, gen_kwargs.get("until"))
                counts = TokenCounts(input_tokens=report.tokens["prompt"], output_tokens=report.generated_tokens)
                results.append(GenerationResult(text, counts))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return results

        def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
            raise NotImplementedError(
                "the streamprune backend implements generate_until only: videomme, mvbench, longvideobench_val_v "
                "and egoschema are generate_until tasks; the multiple_choice variants (e.g. egoschema_mcppl) "
                "need loglikelihood")

        def generate_until_multi_round(self, requests: list) -> list[str]:
            raise NotImplementedError("the streamprune backend answers single-round video questions only")

        def _warn_if_sampling(self, gen_kwargs: dict) -> None:
            """Tasks asking for sampling get greedy answers: say so once (the four video tasks are greedy)."""
            sampling = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0
            if sampling and not self._warned_sampling:
                self._warned_sampling = True
                log.warning("streamprune generates greedily; the task's sampling settings are ignored")


if __name__ == "__main__":
    main()
