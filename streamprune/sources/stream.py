"""Frame sources for the live engine: files, webcams, network streams and a synthetic test pattern.

Every source is an iterable of `Frame`s (RGB image, timestamp, running index) with `close()`; iterating
again starts a new pass and ends the previous one. `open_source` turns the CLI's SOURCE argument into one.

Network streams survive disconnects: a read error, a timeout, or an end of stream that comes too early
is treated as a lost connection and the source reconnects with exponential backoff, continuing the
frame index and timestamps. Every problem reaches the user as a one-line `VideoError`/`StreamError`.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from streamprune.errors import ConfigError, VideoError
from streamprune.sources.lazy import LazyModule
from streamprune.sources.samples import SAMPLE_PREFIX, resolve_video_arg
from streamprune.sources.video import _check_path, _open_container, _reason, _video_stream

av = LazyModule("av")

_log = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtsp", "rtmp", "http", "https", "udp", "tcp")
SYNTHETIC_PATTERNS = ("moving-box", "static")
SUPPORTED_SOURCES = (
    "a video file, sample:NAME, synthetic[:moving-box|static], webcam[:N], /dev/videoN, "
    "or an rtsp://, rtmp://, http(s)://, udp:// or tcp:// URL"
)
DEFAULT_FPS = 25.0
"""Frame rate assumed for a stream that announces none (only used to space timestamps)."""

DURATION_SLACK_S = 1.0
"""A network stream that ends more than this short of the duration its container announced was cut off."""

MAX_BACKOFF_S = 30.0
"""Longest wait between two reconnection attempts, however many there are."""

RESUME_SEEK_BACK_S = (0.0, 2.0, 10.0, 60.0, math.inf)
"""How far before the last delivered frame to seek when resuming, tried in turn (inf: the stream start)."""


class StreamError(VideoError):
    """A live source that cannot be opened, or is lost: a missing webcam, an unreachable or dropped URL."""


@dataclass
class Frame:
    """One delivered frame.

    image: uint8 [H, W, 3] RGB. timestamp: seconds since the stream started, strictly increasing
    (media pts for files and network streams, arrival time for webcams, index / fps for the
    synthetic pattern). index: 0, 1, 2, ... counting the frames this source delivered.
    """

    image: np.ndarray
    timestamp: float
    index: int


@runtime_checkable
class FrameSource(Protocol):
    """Iterating yields `Frame`s until the stream ends; `close()` releases the device or connection."""

    name: str

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


class _Source:
    """One pass at a time: `__iter__` starts a new `_frames()` generator, `close()` ends it (and its container)."""

    name: str
    _pass: Generator[Frame, None, None] | None = None

    def __iter__(self) -> Iterator[Frame]:
        self.close()
        self._pass = self._frames()
        return self._pass

    def close(self) -> None:
        if self._pass is not None:
            self._pass.close()  # runs the generator's cleanup: closes its container
            self._pass = None

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _frames(self) -> Generator[Frame, None, None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _Pacer:
    """Sleeps so that a frame with timestamp t is released t seconds after the first one (if enabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._origin: float | None = None  # monotonic time at which timestamp 0 is due

    def wait(self, timestamp: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._origin is None:
            self._origin = now - timestamp
        time.sleep(max(0.0, self._origin + timestamp - now))


class _RateCap:
    """Keeps at most one frame per 1/max_fps slot of stream time (none dropped without a cap)."""

    def __init__(self, max_fps: float | None) -> None:
        if max_fps is not None and not max_fps > 0:
            raise ConfigError(f"max_fps must be positive, got {max_fps}")
        self.max_fps = max_fps
        self._last_slot = -math.inf

    def keep(self, timestamp: float) -> bool:
        if self.max_fps is None:
            return True
        slot = math.floor(timestamp * self.max_fps + 1e-6)  # slots, not gaps: no drift from jitter
        if slot <= self._last_slot:
            return False
        self._last_slot = slot
        return True


def _frame_rate(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else DEFAULT_FPS


def _stream_start(stream: av.video.stream.VideoStream) -> float:
    """Presentation time (seconds) of the stream's first frame: timestamps are measured from it."""
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


# --- files -----------------------------------------------------------------------------------------


class FileSource(_Source):
    """Every frame of a video file, decoded in order (no seeking).

    realtime: release each frame at its presentation time, like a live camera. loop: start over at
    the end, forever, with timestamps continuing. max_fps: drop frames to at most this many per
    second of stream time. A file that breaks off mid-way ends the pass early with a warning.
    """

    def __init__(
        self, path: str | Path, realtime: bool = False, loop: bool = False, max_fps: float | None = None
    ) -> None:
        self.max_fps = _RateCap(max_fps).max_fps  # validated now, not at the first frame
        self.realtime, self.loop = realtime, loop
        self.path = _check_path(path)
        self.name = str(self.path)
        with _open_container(self.path) as container:
            stream = _video_stream(container, self.path)
            if stream.codec_context is None:
                raise VideoError(f"cannot decode {self.path}: no PyAV decoder for its video codec")
            self._interval = 1.0 / _frame_rate(stream)  # seconds between frames

    def _frames(self) -> Generator[Frame, None, None]:
        pacer, cap = _Pacer(self.realtime), _RateCap(self.max_fps)
        index, offset = 0, 0.0  # offset: timestamp at which the current loop starts
        while True:
            end = offset
            with _open_container(self.path) as container:
                for t, frame in self._timed_frames(container):
                    end = offset + t
                    if cap.keep(end):
                        pacer.wait(end)
                        yield Frame(_rgb(frame), end, index)
                        index += 1
            if not self.loop:
                return
            offset = end + self._interval

    def _timed_frames(self, container: av.container.InputContainer) -> Iterator[tuple[float, av.VideoFrame]]:
        """(seconds from the stream start, frame) for each frame, strictly increasing in time."""
        stream = _video_stream(container, self.path)
        stream.thread_type = "AUTO"  # throughput over latency: a file is never behind real time
        start, last, count = _stream_start(stream), None, 0
        try:
            for frame in container.decode(stream):
                if frame.pts is not None:
                    t = frame.time - start
                else:
                    t = 0.0 if last is None else last + self._interval
                if last is None or t > last:  # duplicated or out-of-order timestamps would break the clock
                    last, count = t, count + 1
                    yield t, frame
        except (av.error.FFmpegError, OSError, ValueError) as e:
            if not count:
                raise VideoError(f"cannot decode {self.path}: {_reason(e)}") from e
            warnings.warn(f"{self.path}: decoding stopped after {count} frames ({_reason(e)})", stacklevel=2)
        if not count:
            raise VideoError(f"cannot decode {self.path}: no video frame could be decoded")


# --- webcams ---------------------------------------------------------------------------------------


class WebcamSource(_Source):
    """A V4L2 camera. Timestamps are arrival times (monotonic clock) since the first frame.

    width/height/fps ask the driver for a capture mode; it may pick the nearest one it supports.
    """

    def __init__(
        self,
        device: str = "/dev/video0",
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
    ) -> None:
        if (width is None) != (height is None):
            raise ConfigError("give both width and height of the webcam picture, or neither")
        self.device = self.name = device
        self.options: dict[str, str] = {}
        if width is not None:
            self.options["video_size"] = f"{width}x{height}"
        if fps is not None:
            self.options["framerate"] = f"{fps:g}"
        self._check_exists()

    def _check_exists(self) -> None:
        if not Path(self.device).exists():
            raise StreamError(f"webcam {self.device} not found")

    def _frames(self) -> Generator[Frame, None, None]:
        self._check_exists()
        try:
            container = av.open(self.device, format="v4l2", options=self.options)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise StreamError(f"cannot open webcam {self.device}: {_reason(e)}") from e
        with container:
            origin = None
            try:
                for index, frame in enumerate(container.decode(video=0)):
                    now = time.monotonic()
                    origin = now if origin is None else origin
                    yield Frame(_rgb(frame), now - origin, index)
            except (av.error.FFmpegError, OSError, ValueError) as e:
                raise StreamError(f"webcam {self.device} lost: {_reason(e)}") from e


# --- network streams -------------------------------------------------------------------------------


def _redact(url: str) -> str:
    """The URL without a password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _scheme(spec: str) -> str | None:
    match = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", spec)
    return match.group(1).lower() if match else None


class _Timeline:
    """Puts the frames of successive connections on one clock: seconds since the stream started.

    A stream whose container announces a duration (a file served over the network) keeps its own
    clock, pts from the stream start, so after a reconnection the frames already delivered are
    recognised and skipped. A live stream's pts restart arbitrarily with each connection, so each
    connection is shifted to continue one frame interval after the last delivered frame.
    """

    def __init__(self) -> None:
        self.last: float | None = None  # timestamp of the last delivered frame

    def connect(self, stream: av.video.stream.VideoStream, finite: bool) -> None:
        self.finite = finite
        self.interval = 1.0 / _frame_rate(stream)
        self._start = _stream_start(stream)
        self._shift: float | None = None

    def place(self, frame: av.VideoFrame) -> float | None:
        """The frame's timestamp, or None if it was already delivered before a reconnection."""
        if frame.pts is None:  # no clock to go by: the next frame slot
            return 0.0 if self.last is None else self.last + self.interval
        t = frame.time
        if self.finite:
            t -= self._start
            return t if self.last is None or t > self.last else None
        if self._shift is None or (self.last is not None and t + self._shift <= self.last):
            # a new connection, or pts that jumped back: continue right after the last frame
            self._shift = (0.0 if self.last is None else self.last + self.interval) - t
        return t + self._shift


class NetworkSource(_Source):
    """An rtsp/rtmp/http(s)/udp/tcp stream through PyAV, reconnecting when the connection drops.

    A read error, a stall longer than `timeout_s`, or an end of stream short of the duration the
    container announced (a server killed mid-transfer often looks like a plain end of file) counts
    as a disconnect. The source then reconnects up to `reconnect_attempts` times in a row, waiting
    `backoff_s`, 2x, 4x, ... between attempts, and reports each attempt through `on_event` (default:
    a logging warning). A finite stream resumes after the last delivered frame (seeking there when
    the server allows it); a live one continues from the present. When the attempts run out the
    source raises a one-line `StreamError`. A clean end: a finite stream reaching its announced end,
    an http(s) response without announced duration ending, or an early end that a reconnection
    confirms (the same last frame again).
    """

    def __init__(
        self,
        url: str,
        reconnect_attempts: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 5.0,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.scheme = _scheme(url)
        if self.scheme not in NETWORK_SCHEMES:
            raise StreamError(f"unsupported stream URL {_redact(url)}: expected {SUPPORTED_SOURCES}")
        if reconnect_attempts < 0 or backoff_s < 0 or not timeout_s > 0:
            raise ConfigError(
                "reconnect_attempts and backoff_s must be >= 0 and timeout_s > 0, got "
                f"{reconnect_attempts}, {backoff_s}, {timeout_s}"
            )
        self.url, self.name = url, _redact(url)
        self.reconnect_attempts, self.backoff_s, self.timeout_s = reconnect_attempts, backoff_s, timeout_s
        self.on_event = on_event or _log.warning

    def _frames(self) -> Generator[Frame, None, None]:
        timeline, index = _Timeline(), 0
        failures, reason = 0, ""  # consecutive failed connections and why the last one failed
        early_end_index: int | None = None  # `index` at the last early end of stream
        while True:
            if failures:
                self._wait_to_reconnect(failures, reason, index)
            waiting_since = time.monotonic()  # since the source last waited on the network
            try:
                with self._connect() as container:
                    stream = _video_stream(container, self.name)
                    timeline.connect(stream, finite=container.duration is not None)
                    for frame in self._decoded(container, stream, timeline):
                        timestamp = timeline.place(frame)
                        if timestamp is not None:
                            yield Frame(_rgb(frame), timestamp, index)
                            index, timeline.last, failures = index + 1, timestamp, 0
                            waiting_since = time.monotonic()
                    reason = self._early_end(container, timeline)
                if reason is None or early_end_index == index:
                    return  # a clean end, or an early one the server confirmed by ending there again
                early_end_index = index
            except (av.error.FFmpegError, OSError) as e:
                # A timeout often surfaces as the decoder choking on the packet it cut short: say what happened.
                stalled = (
                    isinstance(e, av.error.ExitError) or time.monotonic() - waiting_since >= self.timeout_s
                )
                reason = f"no data for {self.timeout_s:g} s" if stalled else _reason(e)
            failures += 1

    def _connect(self) -> av.container.InputContainer:
        """Open the URL; FFmpeg's own socket timeouts back up PyAV's (open, read) timeouts."""
        timeout_us = str(round(self.timeout_s * 1e6))
        options = {"rw_timeout": timeout_us}
        if self.scheme == "rtsp":
            options |= {"rtsp_transport": "tcp", "timeout": timeout_us}
        elif self.scheme == "udp":
            options["timeout"] = timeout_us
        return av.open(self.url, options=options, timeout=(self.timeout_s, self.timeout_s))

    def _wait_to_reconnect(self, failures: int, reason: str, delivered: int) -> None:
        """Report the coming attempt and back off, or raise when `failures` exceeds the attempts allowed."""
        attempts = self.reconnect_attempts
        if failures > attempts:
            what = f"stream {self.name} lost" if delivered else f"cannot open stream {self.name}"
            plural = "" if attempts == 1 else "s"
            raise StreamError(f"{what} after {attempts} reconnect attempt{plural}: {reason}")
        self.on_event(f"reconnecting to {self.name} (attempt {failures}/{attempts}) after: {reason}")
        time.sleep(min(self.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S))

    @staticmethod
    def _decoded(
        container: av.container.InputContainer, stream: av.video.stream.VideoStream, timeline: _Timeline
    ) -> Iterator[av.VideoFrame]:
        """The connection's decoded frames. A finite stream resumed after a reconnection starts at or
        before its first undelivered frame: seek there, and further back while a coarse seek lands past
        it or finds no frame (MPEG-TS seeks to any packet; decoding then starts at the next keyframe)."""
        frames = container.decode(stream)
        if not timeline.finite or timeline.last is None:
            return frames
        start, first = _stream_start(stream), None
        for back in RESUME_SEEK_BACK_S:
            target = max(timeline.last - back, 0.0)
            frames.close()
            try:
                container.seek(round((start + target) / stream.time_base), stream=stream, backward=True)
            except (av.error.FFmpegError, OSError):
                # not seekable: decode from the start, the timeline skips the frames already delivered
                return container.decode(stream)
            frames = container.decode(stream)
            first = next(frames, None)
            if first is not None and (
                first.pts is None or first.time - start <= timeline.last + 1.5 * timeline.interval
            ):
                break  # at or before the first undelivered frame
            if target == 0.0:
                break  # the stream start: nothing earlier to try
        return itertools.chain([first] if first is not None else [], frames)

    def _early_end(self, container: av.container.InputContainer, timeline: _Timeline) -> str | None:
        """Why an end of stream is a disconnect, or None for a clean end."""
        if timeline.finite:
            duration = container.duration / av.time_base
            end = 0.0 if timeline.last is None else timeline.last + timeline.interval  # stream time covered
            if end + DURATION_SLACK_S >= duration:
                return None
            return f"stream ended at {end:.1f} s of the {duration:.1f} s announced"
        if self.scheme in ("http", "https"):
            return None  # an HTTP response without a known duration: its end is the stream's end
        return "end of live stream"


# --- synthetic test pattern ------------------------------------------------------------------------


class SyntheticSource(_Source):
    """A generated test pattern, no file needed: a fixed textured background with a bouncing square.

    pattern "moving-box": consecutive frames differ only where the square was and is (it moves about
    1/60 of the picture per frame); "static": the background alone, the same image every frame.
    Timestamps are index / fps; `realtime` releases frames at that pace. `num_frames=None` never ends.
    """

    def __init__(
        self,
        width: int = 320,
        height: int = 240,
        fps: float = 25.0,
        num_frames: int | None = None,
        pattern: str = "moving-box",
        realtime: bool = False,
        seed: int = 0,
    ) -> None:
        if pattern not in SYNTHETIC_PATTERNS:
            raise ConfigError(
                f"unknown synthetic pattern {pattern!r} (choose from {', '.join(SYNTHETIC_PATTERNS)})"
            )
        if width < 8 or height < 8 or not fps > 0 or (num_frames is not None and num_frames < 0):
            raise ConfigError(
                f"synthetic source needs width, height >= 8, fps > 0 and num_frames >= 0, got "
                f"{width}x{height}, {fps}, {num_frames}"
            )
        self.name = f"synthetic:{pattern}"
        self.fps, self.num_frames, self.pattern, self.realtime = fps, num_frames, pattern, realtime
        rng = np.random.default_rng(seed)
        self._background = _textured_background(width, height, rng)
        self._box = max(4, min(width, height) // 10)  # side, pixels
        self._velocity = rng.choice([-1, 1], size=2) * max(1, min(width, height) // 60)  # (dy, dx) px/frame
        self._start = rng.integers(0, [height - self._box + 1, width - self._box + 1])  # (y, x)
        self._color = np.array([255, 64, 32], np.uint8)  # saturated: unlike anything in the background

    def _frames(self) -> Generator[Frame, None, None]:
        pacer = _Pacer(self.realtime)
        indices = itertools.count() if self.num_frames is None else range(self.num_frames)
        for index in indices:
            image = self._background.copy()  # consumers may keep frames: never hand out a shared buffer
            if self.pattern == "moving-box":
                y, x = self._box_position(index)
                image[y : y + self._box, x : x + self._box] = self._color
            timestamp = index / self.fps
            pacer.wait(timestamp)
            yield Frame(image, timestamp, index)

    def _box_position(self, index: int) -> tuple[int, int]:
        """Top-left corner (y, x) of the square in frame `index`: straight lines, bouncing off the edges."""
        height, width = self._background.shape[:2]
        y, x = (
            _bounce(int(start + velocity * index), span - self._box)
            for start, velocity, span in zip(self._start, self._velocity, (height, width), strict=True)
        )
        return y, x


def _bounce(position: int, limit: int) -> int:
    """Fold an unbounded coordinate into [0, limit], reflecting at both ends (a triangle wave)."""
    if limit == 0:
        return 0
    return limit - abs(position % (2 * limit) - limit)


def _textured_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3]: colour gradients plus fixed mild noise, so the picture is not flat."""
    y, x = np.mgrid[0 : 1 : height * 1j, 0 : 1 : width * 1j]
    base = np.stack([40 + 120 * x, 60 + 100 * y, 140 - 60 * x * y], axis=-1)
    noise = rng.normal(0, 6, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# --- the CLI's SOURCE argument ---------------------------------------------------------------------


def is_live(spec: str) -> bool:
    """True for sources that may never end (a webcam, a network URL, the synthetic test pattern); False for
    a file or sample:NAME. The same naming rules as `open_source`."""
    kind = spec.partition(":")[0]
    return kind in ("synthetic", "webcam") or spec.startswith("/dev/video") or _scheme(spec) is not None


def open_source(spec: str, **kwargs) -> FrameSource:
    """The source named by `spec`; `kwargs` go to its constructor.

    synthetic[:PATTERN] -> SyntheticSource; webcam, webcam:N, /dev/videoN -> WebcamSource;
    rtsp/rtmp/http(s)/udp/tcp URLs -> NetworkSource; sample:NAME -> FileSource of that bundled
    sample; anything else -> FileSource of that path. Another URL scheme is a StreamError.
    """
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return SyntheticSource(pattern=arg or "moving-box", **kwargs)
    if kind == "webcam":
        if arg and not arg.isdigit():
            raise StreamError(f"bad webcam {spec!r}: expected webcam or webcam:N (N = /dev/videoN)")
        return WebcamSource(f"/dev/video{arg or 0}", **kwargs)
    if spec.startswith("/dev/video"):
        return WebcamSource(spec, **kwargs)
    if _scheme(spec) is not None:
        return NetworkSource(spec, **kwargs)  # rejects schemes other than NETWORK_SCHEMES
    if spec.startswith(SAMPLE_PREFIX):
        return FileSource(resolve_video_arg(spec), **kwargs)
    return FileSource(spec, **kwargs)
