"""`streamprune batch`: summarize many videos — on Ray Data when it is there, in-process otherwise — into one
JSON line per video, resuming where an earlier run stopped.

One video is one row. Two Ray Data stages, the same functions on both engines:
  decode (a `map` of Ray tasks) → model (a `map_batches` actor pool: the vision tower, the reduction and the
  LLM, model loaded once per actor) → the driver appends the row to `--out`.
The vision tower and the LLM share one actor because they share one loaded model: a separate vision pool would
hold a second copy of every checkpoint's weights, and on a CPU both stages are compute-bound on the same cores.
Rows are `summarize --json` plus `source` (the path given), `key` and `worker` (pid, peak RSS); a video that
fails at any stage becomes a row with `error` instead, and the run goes on. The driver writes and flushes each
row as it arrives, so a killed run loses only the videos in flight; rerunning with the same `--out` skips
every video that already has a row for the same path, size and mtime (delete its line to redo it). Videos whose
row is an error are retried (their old row removed) unless `skip_failed` is set.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
import os
import pickle
import re
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from streamprune.errors import ConfigError, StreamPruneError
from streamprune.extras import require_extra
from streamprune.paths import check_output_file
from streamprune.runtime import out_of_memory
from streamprune.summarize import SummarizeOptions, decode_clip, encode_clip, finish

VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts", ".mpg", ".mpeg", ".flv", ".wmv"}
LIST_SUFFIXES = {".txt", ".csv", ".lst"}

# progress(done, failed, total, skipped)
ProgressFn = Callable[[int, int, int, int], None]


@dataclass
class BatchOptions:
    sources: list[str]
    out: str
    summarize: SummarizeOptions = field(default_factory=lambda: SummarizeOptions(video=""))
    ray: str = "auto"  # auto | local | none | a cluster address (ray://host:10001, host:6379)
    workers: int = 1  # model actors (Ray)
    skip_failed: bool = False  # on a rerun, leave videos whose recorded row is an error (else retry them)

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if not self.sources:
            raise ConfigError("give at least one source: a folder, a glob, or a .txt/.csv list of videos")
        check_output_file(self.out, "--out")
        for source in self.sources:  # a mistyped folder fails here, not as one error row after the model loads
            if not _is_pattern(source) and not source.startswith("sample:") and not Path(source).exists():
                raise ConfigError(f"source not found: {source}")
        options = replace(self.summarize, video="x")
        if self.ray != "none" and options.device != "auto":  # the GPUs are the cluster's: each actor checks its own
            options = replace(options, device="cpu")
        options.validate()
        from streamprune.models import resolve_model_source

        resolve_model_source(self.summarize.model)  # an unknown model fails here, not in every worker (and a
        # tiny model is built once, before workers load it)


# ---------------------------------------------------------------- sources and resume


def collect_videos(sources: list[str]) -> list[str]:
    """Folders (their video files, recursively, sorted), globs, list files (.txt: one path per line, '#'
    comments; .csv: a `path` column or the first column; relative paths are relative to the list), and plain
    paths, in order, without duplicates. A plain path that does not exist is kept: it becomes an error row."""
    found: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            found += _read_list(path)
        elif _is_pattern(source):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise ConfigError(f"no file matches {source!r}")
            found += matches
        else:
            found.append(source)
    return list(dict.fromkeys(found))


def _is_pattern(source: str) -> bool:
    return any(c in source for c in "*?[")


def _read_list(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            return []
        column = rows[0].index("path") if "path" in rows[0] else 0
        entries = [r[column] for r in (rows[1:] if "path" in rows[0] else rows) if r and r[column].strip()]
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [e if os.path.isabs(e) or e.startswith("sample:") else str(path.parent / e) for e in entries]


def video_key(source: str) -> list:
    """What identifies a video for resuming: resolved path, size, mtime (0, 0 for a missing file)."""
    path = Path(source)
    try:
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path.absolute()), 0, 0]


def _parsed_rows(out: Path) -> list[tuple[str, dict | None]]:
    """Each line of `out` with its row (None for a half-written last line from a killed run)."""
    rows = []
    for line in out.read_text().splitlines() if out.exists() else []:
        try:
            row = json.loads(line)
            rows.append((line, row if isinstance(row, dict) and "key" in row else None))
        except ValueError:
            rows.append((line, None))
    return rows


def done_keys(out: Path) -> set[tuple]:
    """Keys of the rows already in `out` (a half-written last line from a killed run is ignored)."""
    return {tuple(row["key"]) for _, row in _parsed_rows(out) if row is not None}


def drop_failed_rows(out: Path) -> int:
    """Remove the error rows from `out` (their videos are about to be retried); returns how many. The file is
    replaced in one step, so a run killed meanwhile leaves either the old or the new file."""
    rows = _parsed_rows(out)
    kept = [line for line, row in rows if row is None or "error" not in row]
    if len(kept) < len(rows):
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, out)
    return len(rows) - len(kept)


# ---------------------------------------------------------------- the stages (shared by both engines)


def _worker() -> dict:
    return {"pid": os.getpid(), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# A row between stages has one schema on both engines: source, key (JSON text), payload (pickled work so far,
# or None) and result (the finished JSON line, or None). Fixed types keep Ray Data's Arrow blocks simple.


def _row(source: str, key: list) -> dict:
    return {"source": source, "key": json.dumps(key), "payload": None, "result": None}


def _finished(row: dict, fields: dict) -> dict:
    line = {**fields, "source": row["source"], "key": json.loads(row["key"]), "worker": _worker()}
    return {**row, "payload": None, "result": json.dumps(line)}


def _error_row(row: dict, exc: BaseException) -> dict:
    if isinstance(exc, torch.OutOfMemoryError):  # this video was too long for the GPU; the next may fit
        exc = out_of_memory(exc, "summary of this video")
    message = str(exc) if isinstance(exc, StreamPruneError) else f"{type(exc).__name__}: {exc}"
    return _finished(row, {"error": message.splitlines()[0] if message.strip() else repr(exc)})


def decode_stage(row: dict, opts: SummarizeOptions) -> dict:
    """Frames of one video; an error row if it cannot be read."""
    try:
        clip, timing = decode_clip(replace(opts, video=row["source"]))
        return {**row, "payload": pickle.dumps((clip, timing))}
    except Exception as exc:  # noqa: BLE001 — one bad video must not stop the run
        return _error_row(row, exc)


class ModelStage:
    """Vision tower, reduction and LLM on a decoded row, with the model loaded once (per worker); a failing
    row becomes an error row."""

    def __init__(self, opts: SummarizeOptions, loaded=None) -> None:
        from streamprune.models import load_video_llm

        self.opts = opts
        self.loaded = loaded or load_video_llm(opts.model, opts.device, opts.dtype, opts.attn_implementation)

    def __call__(self, row: dict) -> dict:
        if row["result"] is not None:  # failed to decode
            return row
        try:
            opts = replace(self.opts, video=row["source"])
            clip, timing = pickle.loads(row["payload"])
            report = finish(opts, encode_clip(opts, clip, timing, self.loaded))
            return _finished(row, report.to_dict())
        except Exception as exc:  # noqa: BLE001 — one bad video must not stop the run
            return _error_row(row, exc)


# ---------------------------------------------------------------- engines


def run_in_process(rows: list[dict], opts: SummarizeOptions) -> Iterator[str]:
    """One video at a time in this process: the same stages, the model loaded once."""
    if not rows:
        return
    model = ModelStage(opts)
    for row in rows:
        yield model(decode_stage(row, opts))["result"]


def ray_available() -> bool:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's long connect retries, when a cluster address does not answer."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray: expected auto, local, none, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); is `ray start --head` "
                          "running there?") from None


def run_on_ray(rows: list[dict], opts: SummarizeOptions, address: str | None, workers: int) -> Iterator[str]:
    """Decode as Ray tasks, the model stage as a pool of `workers` actors; rows stream back as they finish.

    Each actor asks for one CPU (Ray then gives its torch one thread) and, when the run is on GPUs (`--device
    cuda`, or `auto` on a cluster that has GPUs), one GPU: one model per GPU, on the GPU Ray assigns it (which it
    sees as cuda:0). Decode tasks ask for none: they are
    short and would otherwise wait behind actors that hold every CPU of a small cluster; one per actor runs at
    once, which also bounds the decoded frames held in the object store. The driver iterates the actors'
    output directly: a projection stage after them would bundle small rows into one late block, and a killed
    run would then lose rows that were already finished."""
    if not rows:
        return
    import ray

    started = not ray.is_initialized()
    if started:
        with quiet_ray_backend():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the CLI shows progress; plan and bar notices are noise
    gpus = actor_gpus(opts.device, ray.cluster_resources().get("GPU", 0))
    if gpus:
        opts = replace(opts, device="cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI draws its own
        context.execution_options.preserve_order = False
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        ds = ds.map(decode_stage, fn_kwargs={"opts": opts}, num_cpus=0,
                    compute=ray.data.TaskPoolStrategy(size=workers))
        ds = ds.map_batches(_RayModelStage, fn_constructor_kwargs={"opts": opts}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=gpus,
                            batch_format="pandas")
        for row in ds.iter_rows():
            yield row["result"]
    finally:
        if started:
            ray.shutdown()


# a line of Ray's C++ log: "[2026-12-05 16:05:54,517 I 28084 28084] logging.cc:303: ..."
_RAY_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIW] \d+ \d+\] ")


@contextlib.contextmanager
def quiet_ray_backend() -> Iterator[None]:
    """Keep Ray's C++ log off the CLI's stderr (it is for our errors): the driver's core worker logs `E` lines for
    conditions Ray recovers from (actor arguments in the object store). RAY_BACKEND_LOG_LEVEL=fatal is read when
    `ray.init` starts the processes, so it is set around that call only (a value the user set is kept); the one
    notice Ray prints on reading it is dropped, and anything else written to stderr meanwhile is passed on."""
    logging.getLogger("ray").setLevel(logging.ERROR)  # Python-side notices logged before `ray.init` sets its level
    if "RAY_BACKEND_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as captured:
        os.dup2(captured.fileno(), 2)  # the C++ side writes to file descriptor 2, not to sys.stderr
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            del os.environ["RAY_BACKEND_LOG_LEVEL"]
            captured.seek(0)
            sys.stderr.write("".join(line for line in captured if not _RAY_LOG_LINE.match(line)))


def actor_gpus(device: str, cluster_gpus: float) -> int:
    """GPUs each model actor asks Ray for: 1 for `cuda`/`cuda:N` (ConfigError if the cluster has none), 1 for
    `auto` on a cluster with GPUs, else 0."""
    if device.startswith("cuda"):
        if cluster_gpus < 1:
            raise ConfigError(f"--device {device}: the Ray cluster has no GPU (ray.cluster_resources() lists none)")
        return 1
    return 1 if device == "auto" and cluster_gpus >= 1 else 0


class _RayModelStage:
    """`map_batches` callable class: one ModelStage (one loaded model) per actor, applied to each row of a
    batch (a pandas DataFrame)."""

    def __init__(self, opts: SummarizeOptions) -> None:
        self.stage = ModelStage(opts)

    def __call__(self, batch):
        import pandas as pd

        return pd.DataFrame([self.stage(row) for row in batch.to_dict("records")],
                            columns=["source", "key", "payload", "result"])


@dataclass
class BatchReport:
    total: int
    skipped: int
    done: int
    failed: int
    seconds: float
    engine: str
    out: str

    @property
    def videos_per_minute(self) -> float:
        return 60 * (self.done + self.failed) / self.seconds if self.seconds else 0.0


def run_batch(opts: BatchOptions, progress: ProgressFn | None = None) -> BatchReport:
    """Summarize every video of `opts.sources` not already in `opts.out`; append a row per video."""
    opts.validate()
    videos = collect_videos(opts.sources)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not opts.skip_failed:
        drop_failed_rows(out)
    seen = done_keys(out)
    rows = [_row(v, video_key(v)) for v in videos]
    todo = [r for r in rows if tuple(json.loads(r["key"])) not in seen]
    skipped = len(rows) - len(todo)
    if opts.ray == "none":
        engine, results = "in-process", run_in_process(todo, opts.summarize)
    elif opts.ray == "auto" and not ray_available():
        engine, results = "in-process (ray not installed)", run_in_process(todo, opts.summarize)
    else:
        if not ray_available():
            require_extra("ray", "--ray")
        # auto: the cluster RAY_ADDRESS names, else a new local one; local: always a new local one
        address = {"auto": None, "local": "local"}.get(opts.ray, opts.ray)
        if address not in (None, "local"):
            check_reachable(address)
        engine = f"ray ({opts.ray}, {opts.workers} worker{'s' * (opts.workers != 1)})"
        results = run_on_ray(todo, opts.summarize, address, opts.workers)
    done = failed = 0
    t0 = time.perf_counter()
    if progress:
        progress(0, 0, len(todo), skipped)
    with out.open("a") as sink:
        for line in results:
            sink.write(line + "\n")
            sink.flush()  # a killed run keeps every finished row
            ok = "error" not in json.loads(line)
            done, failed = done + ok, failed + (not ok)
            if progress:
                progress(done, failed, len(todo), skipped)
    return BatchReport(len(rows), skipped, done, failed, time.perf_counter() - t0, engine, str(out))
