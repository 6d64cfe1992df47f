"""Decode a sparse, evenly spaced set of RGB frames from a video file.

PyAV is the decoder. Frames are chosen by stream index (uniformly, or at a fixed rate in video time)
and decoded by seeking to the keyframe before each far-away target, then decoding forward to it, so
taking 32 frames from an hour-long video costs a few GOPs per frame rather than the whole stream.
decord is a fallback only for files whose container PyAV parsed but whose video codec it cannot decode.
Every user-facing problem is a one-line `VideoError` naming the file.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamprune.errors import ConfigError, VideoError
from streamprune.sources.lazy import LazyModule

if TYPE_CHECKING:
    import av
    import decord
else:
    av = LazyModule("av")

ProgressFn = Callable[[int, int], None]
"""`progress(done, total)`: called as sampled frames are decoded."""

SEEK_AHEAD_S = 2.0
"""Seek instead of decoding forward when the next target is more than this far (video seconds) ahead."""

_TEXT_DEMUXERS = {"tty"}
"""FFmpeg demuxers that turn plain text into "video" (`tty` renders .txt/.nfo files as ANSI art)."""


@dataclass(frozen=True)
class VideoInfo:
    """Stream metadata. `total_frames` is estimated as duration x fps when the container lacks a count."""

    fps: float
    duration: float
    total_frames: int
    width: int
    height: int
    codec: str


@dataclass
class VideoClip:
    """Sampled frames of one video.

    frames: uint8 [T, H, W, 3] RGB. timestamps: float64 [T], presentation time in seconds from the
    stream start. frame_indices: int64 [T], index of each frame in the decoded stream.
    fps: stream average frame rate; duration: seconds; total_frames: frames in the stream.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    frame_indices: np.ndarray
    fps: float
    duration: float
    total_frames: int
    path: str


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read the video stream's metadata without decoding frames."""
    path = _check_path(path)
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        if stream.codec_context is None:
            return _probe_with_decord(path, stream)
        return _stream_info(container, stream, path)


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = 32,
    fps: float | None = None,
    progress: ProgressFn | None = None,
) -> VideoClip:
    """Decode `num_frames` uniformly spaced frames, or frames at `fps` per second capped at `num_frames`.

    See `sample_indices` for which frames are chosen. A stream that breaks off mid-way yields the
    frames decoded before the break (with a warning); a stream with no decodable frame is an error.
    """
    _check_sampling(num_frames, fps)
    path = _check_path(path)
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        if stream.codec_context is None:
            return _read_with_decord(path, num_frames, fps, progress)
        info = _stream_info(container, stream, path)
        count_is_exact = stream.frames > 0
        targets = sample_indices(info.total_frames, info.fps, info.duration, num_frames, fps)
        decoded = _decode_indices(container, stream, targets, info.fps, progress)
    true_total = decoded.last_index + 1
    if decoded.error is None and len(decoded.frames) < len(targets) and 0 < true_total < info.total_frames:
        # The stream ended before the container said it would: re-plan over the frames that really
        # exist rather than return a short clip. An estimated count may be off without anything being
        # wrong; an exact one that is too high means a truncated file, which the user should hear of.
        if count_is_exact:
            warnings.warn(
                f"{path}: the video stops at frame {true_total} of the {info.total_frames} its container "
                f"lists (truncated file?); sampling the frames that exist",
                stacklevel=2,
            )
        info = replace(info, total_frames=true_total, duration=min(info.duration, true_total / info.fps))
        targets = sample_indices(info.total_frames, info.fps, info.duration, num_frames, fps)
        with _open_container(path) as container:
            decoded = _decode_indices(container, _video_stream(container, path), targets, info.fps, progress)
    if not decoded.frames:
        reason = f" ({decoded.error})" if decoded.error else ""
        raise VideoError(f"cannot decode {path}: no video frame could be decoded{reason}")
    if len(decoded.frames) < len(targets):
        cause = decoded.error or "stream ended early"
        warnings.warn(
            f"{path}: decoding stopped at frame {decoded.last_index} ({cause}); "
            f"returning {len(decoded.frames)} of {len(targets)} frames",
            stacklevel=2,
        )
    return VideoClip(
        frames=np.stack(decoded.frames),
        timestamps=np.asarray(decoded.times, dtype=np.float64),
        frame_indices=np.asarray(decoded.indices, dtype=np.int64),
        fps=info.fps,
        duration=info.duration,
        total_frames=info.total_frames,
        path=str(path),
    )


def sample_indices(
    total_frames: int,
    video_fps: float,
    duration: float,
    num_frames: int | None = 32,
    fps: float | None = None,
) -> np.ndarray:
    """Stream indices to decode: int64 [N], strictly increasing, starting at 0.

    Without `fps`: `round(linspace(0, total_frames - 1, num_frames))` (LLaVA-OneVision / lmms-eval),
    i.e. every frame when the video has fewer than `num_frames`. With `fps`: the frames shown at
    0, 1/fps, 2/fps, ... < duration seconds, thinned uniformly to at most `num_frames` if given.
    """
    _check_sampling(num_frames, fps)
    last = max(total_frames - 1, 0)
    if fps is None:
        indices = np.linspace(0, last, num_frames).round()
    else:
        count = max(math.ceil(duration * fps - 1e-9), 1)  # k / fps < duration, and at least frame 0
        indices = np.minimum((np.arange(count) / fps * video_fps).round(), last)
    indices = np.unique(indices.astype(np.int64))
    if num_frames is not None and len(indices) > num_frames:
        indices = indices[np.linspace(0, len(indices) - 1, num_frames).round().astype(np.int64)]
    return indices


@dataclass
class _Decoded:
    """Frames taken for the targets, plus what the decode pass learned about the stream."""

    frames: list[np.ndarray] = field(default_factory=list)  # uint8 [H, W, 3] each
    times: list[float] = field(default_factory=list)  # seconds from stream start
    indices: list[int] = field(default_factory=list)
    decoded: int = 0  # frames decoded in total, taken or not: the cost of the pass
    last_index: int = -1  # index of the last frame decoded
    error: str | None = None  # decoder error that cut the stream short


def _decode_indices(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    targets: np.ndarray,
    fps: float,
    progress: ProgressFn | None,
) -> _Decoded:
    """Decode forward from the stream start, taking the first frame at or past each target index.

    `container` must be freshly opened (targets[0] is always 0). A target more than `min_gap` frames
    ahead is reached by seeking to the keyframe before it. A seek that lands behind the current
    position shows keyframes are sparser than that, so `min_gap` grows to the distance learnt and
    nearer targets are decoded forward. Seeking stops if it fails or frames lack timestamps (an index
    could then not be recovered after a seek).
    """
    out = _Decoded()
    stream.thread_type = "AUTO"
    start_s = float((stream.start_time or 0) * stream.time_base)
    frames: Iterator[av.VideoFrame] = container.decode(stream)
    can_seek, seeked, min_gap = True, False, SEEK_AHEAD_S * fps
    if progress:
        progress(0, len(targets))
    try:
        for target in targets.tolist():
            position = out.last_index
            if can_seek and target - (position + 1) > min_gap:
                can_seek = seeked = _seek(container, stream, start_s + target / fps)
                if seeked:
                    frames = container.decode(stream)
            for frame in frames:
                index = _frame_index(frame, start_s, fps, out.last_index)
                if seeked and index <= position:
                    min_gap = max(min_gap, target - index)
                seeked = False
                can_seek = can_seek and frame.pts is not None
                out.decoded += 1
                out.last_index = index
                if index >= target:
                    out.frames.append(frame.to_ndarray(format="rgb24"))
                    out.times.append(frame.time - start_s if frame.pts is not None else index / fps)
                    out.indices.append(index)
                    if progress:
                        progress(len(out.frames), len(targets))
                    break
            else:
                break  # end of stream
    except (av.error.FFmpegError, OSError, ValueError) as e:
        out.error = _reason(e)
    return out


def _frame_index(frame: av.VideoFrame, start_s: float, fps: float, last_index: int) -> int:
    """Stream index of a decoded frame, from its timestamp; the successor of the last one if it has none."""
    if frame.pts is None:
        return last_index + 1
    return round((frame.time - start_s) * fps)


def _seek(container: av.container.InputContainer, stream: av.video.stream.VideoStream, time_s: float) -> bool:
    """Seek to the keyframe at or before `time_s` (seconds, absolute); False if the format cannot seek."""
    try:
        container.seek(int(time_s / stream.time_base), stream=stream, backward=True)
    except (av.error.FFmpegError, OSError):
        return False
    return True


def _check_sampling(num_frames: int | None, fps: float | None) -> None:
    if fps is None and num_frames is None:
        raise ConfigError("give num_frames, fps or both to sample a video")
    if num_frames is not None and num_frames < 1:
        raise ConfigError(f"num_frames must be at least 1, got {num_frames}")
    if fps is not None and not fps > 0:  # also rejects NaN
        raise ConfigError(f"fps must be positive, got {fps}")


def _check_path(path: str | os.PathLike) -> Path:
    """Reject what is not a non-empty regular file before FFmpeg sees it (clearer messages)."""
    p = Path(path)
    try:
        if not p.exists():
            raise VideoError(f"video not found: {p}")
        if p.is_dir():
            raise VideoError(f"{p} is a directory, not a video file")
        if p.stat().st_size == 0:
            raise VideoError(f"{p} is empty (0 bytes)")
    except OSError as e:  # e.g. an unreadable parent directory
        raise VideoError(f"cannot read {p}: {_reason(e)}") from e
    return p


def _open_container(path: Path) -> av.container.InputContainer:
    """Open with PyAV; anything FFmpeg cannot parse becomes a VideoError."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.InvalidDataError as e:
        raise VideoError(f"cannot read {path}: not a video file, or truncated/corrupt ({_reason(e)})") from e
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot read {path}: {_reason(e)}") from e
    if container.format.name in _TEXT_DEMUXERS:
        container.close()
        raise VideoError(f"cannot read {path}: not a video file (plain text)")
    return container


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    """The first real video stream; cover art in audio files (attached pictures) does not count."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["none"]
    raise VideoError(f"{path} has no video stream (streams: {', '.join(kinds)})")


def _stream_info(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path
) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VideoError(f"cannot read {path}: the video stream has no frame rate")
    fps = float(rate)
    if stream.duration:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = None
    total = stream.frames
    if total <= 0:
        total = max(round(duration * fps), 1) if duration else _count_packets(path, stream.index)
    if duration is None:
        duration = total / fps
    return VideoInfo(fps, duration, total, stream.width, stream.height, stream.codec_context.name)


def _count_packets(path: Path, stream_index: int) -> int:
    """Frame count of a stream with neither count nor duration (raw elementary streams): demux, no decode."""
    with av.open(str(path), metadata_errors="ignore") as container:
        count = 0
        try:
            for packet in container.demux(container.streams[stream_index]):
                count += packet.size > 0  # the final flush packet is empty
        except (av.error.FFmpegError, OSError, ValueError):
            pass  # a corrupt tail: count what came before it
    return max(count, 1)


def _reason(e: BaseException) -> str:
    """An error's text on one line: FFmpeg's without errno and file name, decord's without its stack trace."""
    text = str(getattr(e, "strerror", None) or e)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


def _decord_reader(path: Path) -> tuple[decord.VideoReader, float, int]:
    """A decord reader with its frame rate and frame count. Only for files PyAV parsed: decord can
    crash the process on corrupt ones."""
    try:
        import decord  # the fallback decoder: imported only when needed, and optional
    except ImportError:
        raise VideoError(f"cannot decode {path}: PyAV has no decoder for its video codec, and the fallback "
                         "decoder is not installed (pip install 'streamprune[decord]')") from None
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except (RuntimeError, OSError, ValueError) as e:
        raise VideoError(f"cannot decode {path}: no decoder for its video codec ({_reason(e)})") from e
    fps, total = float(reader.get_avg_fps()), len(reader)
    if total == 0 or not fps > 0:
        raise VideoError(f"cannot decode {path}: no video frame could be decoded")
    return reader, fps, total


def _probe_with_decord(path: Path, stream: av.video.stream.VideoStream) -> VideoInfo:
    reader, fps, total = _decord_reader(path)
    try:
        height, width = reader[0].shape[:2]
    except (RuntimeError, OSError, ValueError) as e:
        raise VideoError(f"cannot decode {path}: {_reason(e)}") from e
    return VideoInfo(fps, total / fps, total, width, height, stream.codec_tag or "unknown")


def _read_with_decord(
    path: Path, num_frames: int | None, fps: float | None, progress: ProgressFn | None
) -> VideoClip:
    """Same sampling as `read_video`, decoded by decord in one batch."""
    reader, video_fps, total = _decord_reader(path)
    indices = sample_indices(total, video_fps, total / video_fps, num_frames, fps)
    try:
        batch = reader.get_batch(indices.tolist())
        timestamps = reader.get_frame_timestamp(indices.tolist())[:, 0]
    except (RuntimeError, OSError, ValueError) as e:
        raise VideoError(f"cannot decode {path}: {_reason(e)}") from e
    # decord's global bridge may have been switched to torch or tf by other code.
    frames = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()
    if progress:
        progress(len(indices), len(indices))
    return VideoClip(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        timestamps=np.asarray(timestamps, dtype=np.float64),
        frame_indices=indices,
        fps=video_fps,
        duration=total / video_fps,
        total_frames=total,
        path=str(path),
    )
