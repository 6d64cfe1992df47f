"""`streamprune stream SOURCE`: feed a live source through the StreamEngine with live token counts.

Views: a terminal dashboard (rich), a local web page (127.0.0.1, server-sent events), or none; with
`--json-lines`, one JSON object per closed segment (and per answer) on stdout for scripts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import TextIO

from streamprune.encoder import EncoderConfig
from streamprune.engine import StreamConfig, StreamEngine
from streamprune.errors import ConfigError, StreamPruneError
from streamprune.models import load_video_llm
from streamprune.sources.stream import is_live, open_source

LIVE_CONTEXT_TOKENS = 4096
"""KV budget of a live source (webcam, URL, test pattern) unless --max-context-tokens says otherwise: a live
source may never end, so its context must not grow without bound. 4096 is the budget of
benchmarks/bench_stream.py: about 0.22 GiB of bf16 KV on a Qwen2-7B-class decoder (28 layers × 4 KV heads ×
128 × 2 × 2 bytes = 56 KiB a token), while still holding a dozen or more segments of recent context."""


@dataclass
class LiveOptions:
    source: str
    model: str = "tiny"
    retain: float = 0.1
    ask: str | None = None
    every: float | None = None  # stream seconds between questions; None: ask once at the end
    # KV budget in tokens; None: unbounded; "auto": LIVE_CONTEXT_TOKENS for a live source, unbounded for a file
    max_context_tokens: int | str | None = "auto"
    lookahead: int = 8
    ui: str = "terminal"  # terminal | web | none
    json_lines: bool = False
    max_frames: int | None = None
    realtime: bool = False  # pace files at their frame rate
    port: int = 0  # web UI port (0: any free port)
    max_new_tokens: int = 32
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # encoder-side reduction, state kept across frames
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: a visible GPU, else the CPU)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (auto: bf16 on a GPU, fp32 on the CPU)
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 | eager

    def validate(self) -> None:
        if self.ui not in ("terminal", "web", "none"):
            raise ConfigError(f"unknown --ui {self.ui!r}; choose terminal, web or none")
        if self.every is not None and self.every <= 0:
            raise ConfigError(f"--every must be a positive number of seconds, got {self.every}")
        if self.every is not None and not self.ask:
            raise ConfigError("--every needs --ask TEXT")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"--max-frames must be at least 1, got {self.max_frames}")

    def context_budget(self) -> int | None:
        """The KV budget this source gets: `max_context_tokens`, with "auto" resolved by the source kind."""
        if self.max_context_tokens == "auto":
            return LIVE_CONTEXT_TOKENS if is_live(self.source) else None
        return self.max_context_tokens


class TerminalDashboard:
    """A rich Live table of the engine's counters, redrawn a few times per second."""

    ROWS = [("source", "{}"), ("frames_in", "{:,}"), ("frames_skipped", "{:,}"), ("frames_encoded", "{:,}"),
            ("patches_computed", "{:,}"), ("tokens_encoded", "{:,}"), ("tokens_kept", "{:,}"), ("segments", "{:,}"),
            ("kv_tokens", "{:,}"), ("kv_bytes", "bytes"), ("evicted_segments", "{:,}"), ("fps", "{:.1f}"),
            ("ms_per_frame", "{:.1f}"), ("stream_time_s", "{:.1f}"), ("answer", "{}")]

    def __init__(self, console) -> None:
        from rich.live import Live

        self.live = Live(self._table({}), console=console, refresh_per_second=4, transient=False)

    def _table(self, stats: dict):
        from rich.table import Table

        table = Table(title="streamprune · live", show_header=False, min_width=60)
        for key, fmt in self.ROWS:
            value = stats.get(key, "–")
            if value != "–":
                value = f"{value / 2**20:.2f} MiB" if fmt == "bytes" else fmt.format(value)
            table.add_row(key.replace("_", " "), str(value))
        return table

    def start(self) -> None:
        self.live.start()

    def update(self, stats: dict, frame=None, kept=None) -> None:
        self.live.update(self._table(stats))

    def show(self, line: str, out: TextIO) -> None:
        """A line above the live table (a periodic answer): printed through the dashboard's console."""
        self.live.console.print(line, markup=False, highlight=False)

    def stop(self) -> None:
        self.live.stop()


class _NoView:
    def start(self) -> None: ...
    def update(self, stats: dict, frame=None, kept=None) -> None: ...
    def stop(self) -> None: ...

    def show(self, line: str, out: TextIO) -> None:
        print(line, file=out, flush=True)


def _make_view(opts: LiveOptions, err: TextIO):
    if opts.ui == "terminal":
        from rich.console import Console

        return TerminalDashboard(Console(file=err))
    if opts.ui == "web":
        from streamprune.ui.web import WebDashboard

        return WebDashboard(port=opts.port, title=f"streamprune · {opts.source}")
    return _NoView()


def run_stream(opts: LiveOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> dict:
    """Stream until the source ends (or --max-frames); returns the final stats. A source that fails
    after its reconnect attempts raises StreamPruneError after the stats so far were reported; Ctrl-C
    (KeyboardInterrupt) reports the stats so far (reason "interrupted"), then propagates."""
    opts.validate()
    loaded = load_video_llm(opts.model, opts.device, opts.dtype, opts.attn_implementation)
    runtime = loaded.runtime.describe()
    budget = opts.context_budget()
    engine = StreamEngine(loaded.adapter, StreamConfig(retain=opts.retain, lookahead=opts.lookahead,
                                                max_context_tokens=budget, encoder=opts.encoder))
    events: list[str] = []
    source = open_source(opts.source, **_source_kwargs(opts, events, err))
    view = _make_view(opts, err)

    def emit(record: dict) -> None:
        if opts.json_lines:
            print(json.dumps(record), file=out, flush=True)

    def answer(stream_time: float, periodic: bool) -> None:
        text = engine.ask(opts.ask, max_new_tokens=opts.max_new_tokens)
        emit({"event": "answer", "stream_time_s": round(stream_time, 3), "question": opts.ask, "answer": text})
        if periodic and not opts.json_lines:  # the answer at the end is in the final report
            view.show(f"answer at {stream_time:.1f} s: {text}", out)

    report = _Report(engine, opts, out, events, runtime, budget)
    last_question, reason = None, "end of source"
    url = view.start()
    if url:
        print(f"web view: {url}", file=err, flush=True)
    try:
        for frame in source:
            for record in engine.push(frame.image, frame.timestamp):
                emit({"event": "segment", **record.to_dict(), **_counters(engine)})
            if _question_due(opts, engine, frame.timestamp, last_question):
                answer(frame.timestamp, periodic=True)
                last_question = frame.timestamp
            view.update({"source": opts.source, **engine.stats()}, *(engine.last_view or (None, None)))
            if opts.max_frames and frame.index + 1 >= opts.max_frames:
                reason = "max frames"
                break
        for record in engine.flush():
            emit({"event": "segment", **record.to_dict(), **_counters(engine)})
        if opts.ask and not opts.every:
            answer(engine.stats()["stream_time_s"], periodic=False)
    except StreamPruneError:
        emit({"event": "error", "stats": engine.stats(), "source_events": events})
        view.stop()
        report.write("stats_before_error")
        raise
    except KeyboardInterrupt:
        view.stop()  # before the report, so a terminal dashboard does not redraw over it
        report.write("interrupted")
        raise
    finally:
        view.stop()
        source.close()
    return report.write(reason)


def _question_due(opts: LiveOptions, engine: StreamEngine, now: float, last_question: float | None) -> bool:
    """A periodic question (--every) is due: one segment is cached (an answer before that would see no
    video) and `every` seconds of stream time passed since the last one."""
    if not (opts.ask and opts.every) or engine.stats()["segments"] == 0:
        return False
    return last_question is None or now - last_question >= opts.every


def _source_kwargs(opts: LiveOptions, events: list[str], err: TextIO) -> dict:
    """Per-kind options for `open_source`: reconnect events are shown and recorded, files may be paced."""
    def on_event(message: str) -> None:
        events.append(message)
        print(f"note: {message}", file=err, flush=True)

    if "://" in opts.source:
        return {"on_event": on_event}
    if opts.source.startswith(("webcam", "/dev/video")):
        return {}
    return {"realtime": opts.realtime}  # files and test patterns


def _counters(engine: StreamEngine) -> dict:
    stats = engine.stats()
    return {k: stats[k] for k in ("frames_in", "frames_skipped", "frames_encoded", "kv_tokens", "fps")}


@dataclass
class _Report:
    """The final stats (with the KV budget and where the model ran, `Runtime.describe()`, under "runtime"),
    printed once as a JSON line or a summary line, whichever way the stream ended."""

    engine: StreamEngine
    opts: LiveOptions
    out: TextIO
    source_events: list[str]
    runtime: dict
    max_context_tokens: int | None
    written: dict | None = None

    def write(self, reason: str) -> dict:
        """Print the stats once; reason: "end of source", "max frames", "interrupted" or "stats_before_error"
        (the JSON event of a failed source, as before)."""
        if self.written is not None:
            return self.written
        stats = {**self.engine.stats(), "evicted": self.engine.evicted, "source_events": self.source_events,
                 "max_context_tokens": self.max_context_tokens, "runtime": self.runtime}
        self.written = stats
        if self.opts.json_lines:
            event = ({"event": reason} if reason == "stats_before_error" else {"event": "final", "reason": reason})
            print(json.dumps({**event, **stats}), file=self.out, flush=True)
        elif self.opts.ui != "terminal" or reason in ("interrupted", "stats_before_error"):
            # the terminal view already shows the final counters of a stream that ran to its end
            prefix = "interrupted · " if reason == "interrupted" else ""
            print(prefix + _summary_line(stats), file=self.out, flush=True)
        return stats


def _summary_line(stats: dict) -> str:
    computed = (f" · vision tower computed {stats['patches_computed'] / stats['patches_total']:.0%} of patches"
                if stats.get("patches_total") else "")
    return (f"frames {stats['frames_in']:,} (skipped {stats['frames_skipped']:,}, "
            f"encoded {stats['frames_encoded']:,}){computed} · "
            f"tokens encoded {stats['tokens_encoded']:,} → kept {stats['tokens_kept']:,} · "
            f"KV {stats['kv_tokens']:,} tokens, {stats['kv_bytes'] / 2**20:.2f} MiB · segments {stats['segments']:,}, "
            f"evicted {stats['evicted_segments']:,} · {stats['fps']:.1f} frames/s"
            + (f" · {stats['runtime']['device']} {stats['runtime']['dtype']}" if stats.get("runtime") else "")
            + (f" · answer: {stats['answer']!r}" if stats["answer"] else ""))
