"""Live frame sources of streamprune.sources.stream, against real decoders, files and a local HTTP server."""

from __future__ import annotations

import collections
import itertools
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from streamprune.errors import ConfigError, VideoError
from streamprune.sources import read_video
from streamprune.sources.stream import (
    FileSource,
    Frame,
    FrameSource,
    NetworkSource,
    StreamError,
    SyntheticSource,
    WebcamSource,
    open_source,
)

if TYPE_CHECKING:
    from conftest import SyntheticVideo


def assert_clock(frames: list[Frame]) -> None:
    """Indices count 0, 1, 2, ... and timestamps strictly increase."""
    assert [f.index for f in frames] == list(range(len(frames)))
    assert np.all(np.diff([f.timestamp for f in frames]) > 0)


def shown_indices(frames: list[Frame], video: SyntheticVideo) -> list[int]:
    """The number drawn into each frame of a `make_video` video: its position in the file."""
    return [video.index_of(f.image) for f in frames]


@pytest.fixture(scope="session")
def short_video(make_video: Callable[..., SyntheticVideo]) -> SyntheticVideo:
    """4 s at 10 fps, a keyframe every second, B-frames."""
    return make_video("stream_40.mp4", 40, fps=10, gop=10)


# --- files -----------------------------------------------------------------------------------------


def test_file_source_yields_every_frame_in_order(sample_video: Path) -> None:
    frames = list(FileSource(sample_video))
    assert len(frames) == 132
    assert all(f.image.shape == (720, 1280, 3) and f.image.dtype == np.uint8 for f in frames)
    assert_clock(frames)
    np.testing.assert_allclose([f.timestamp for f in frames], np.arange(132) / 25.0, atol=1e-6)


def test_file_source_decodes_frames_in_stream_order(short_video: SyntheticVideo) -> None:
    frames = list(FileSource(short_video.path))
    assert shown_indices(frames, short_video) == list(range(40))


def test_file_source_loops_with_increasing_timestamps(short_video: SyntheticVideo) -> None:
    frames = list(itertools.islice(FileSource(short_video.path, loop=True), 100))
    assert len(frames) == 100 > short_video.num_frames
    assert_clock(frames)
    assert shown_indices(frames, short_video) == [i % 40 for i in range(100)]
    np.testing.assert_allclose([f.timestamp for f in frames], np.arange(100) / 10.0, atol=1e-6)


def test_file_source_realtime_paces_frames(short_video: SyntheticVideo) -> None:
    start = time.monotonic()
    frames = list(itertools.islice(FileSource(short_video.path, realtime=True), 10))
    elapsed = time.monotonic() - start
    assert frames[-1].timestamp == pytest.approx(0.9)
    assert 0.7 * 0.9 <= elapsed < 0.9 + 3.0


def test_file_source_max_fps_thins_frames(sample_video: Path) -> None:
    frames = list(FileSource(sample_video, max_fps=5))
    assert 25 <= len(frames) <= 27  # 5.28 s at 5 fps
    assert_clock(frames)
    assert np.diff([f.timestamp for f in frames]).min() >= 0.2 - 1 / 25 - 1e-6


def test_file_source_close_ends_the_pass(short_video: SyntheticVideo) -> None:
    with FileSource(short_video.path) as source:
        frames = iter(source)
        assert next(frames).index == 0
        source.close()
        assert next(frames, None) is None
        assert len(list(source)) == 40  # a new pass starts over


def test_file_source_errors_are_one_line(
    bad_video_files: dict[str, Path], short_video: SyntheticVideo
) -> None:
    for kind, path in bad_video_files.items():
        with pytest.raises(VideoError) as excinfo:
            list(FileSource(path))
        assert "\n" not in str(excinfo.value), kind
    with pytest.raises(ConfigError, match="max_fps"):
        FileSource(short_video.path, max_fps=0)


# --- synthetic pattern -----------------------------------------------------------------------------


def test_synthetic_static_frames_are_identical() -> None:
    frames = list(SyntheticSource(num_frames=5, pattern="static", fps=10))
    assert len(frames) == 5 and frames[0].image.shape == (240, 320, 3) and frames[0].image.dtype == np.uint8
    assert all(np.array_equal(f.image, frames[0].image) for f in frames)
    assert [f.timestamp for f in frames] == [i / 10 for i in range(5)]
    frames[0].image[:] = 0  # each frame is its own array
    assert frames[1].image.any()


def test_synthetic_moving_box_changes_a_small_region() -> None:
    frames = list(SyntheticSource(num_frames=30))
    assert_clock(frames)
    box = 240 // 10
    for before, after in itertools.pairwise(frames):
        changed = np.argwhere(np.any(before.image != after.image, axis=-1))
        assert 0 < len(changed) <= 2 * box * box
        height, width = changed.max(axis=0) - changed.min(axis=0) + 1
        assert height <= 2 * box and width <= 2 * box


def test_synthetic_source_is_deterministic_per_seed() -> None:
    def first_two(seed: int) -> list[np.ndarray]:
        return [f.image for f in SyntheticSource(num_frames=2, seed=seed)]

    assert all(np.array_equal(a, b) for a, b in zip(first_two(1), first_two(1), strict=True))
    assert not np.array_equal(first_two(1)[1], first_two(2)[1])


def test_synthetic_long_stream_is_cheap() -> None:
    start = time.monotonic()
    last = collections.deque(SyntheticSource(num_frames=20_000), maxlen=1).pop()
    assert last.index == 19_999 and last.timestamp == pytest.approx(19_999 / 25)
    assert time.monotonic() - start < 5.0


def test_synthetic_realtime_paces_frames() -> None:
    start = time.monotonic()
    frames = list(SyntheticSource(num_frames=5, fps=20, realtime=True))
    assert time.monotonic() - start >= 0.7 * frames[-1].timestamp


def test_synthetic_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="pattern"):
        SyntheticSource(pattern="zebra")
    with pytest.raises(ConfigError):
        SyntheticSource(fps=0)


# --- webcam ----------------------------------------------------------------------------------------


def test_missing_webcam_is_a_one_line_stream_error() -> None:
    with pytest.raises(StreamError) as excinfo:
        WebcamSource("/dev/video99")
    assert str(excinfo.value) == "webcam /dev/video99 not found"
    assert excinfo.value.exit_code == 2


def test_webcam_that_cannot_be_opened_names_the_device(tmp_path: Path) -> None:
    not_a_camera = tmp_path / "video0"
    not_a_camera.write_bytes(b"\0" * 64)
    source = WebcamSource(str(not_a_camera))
    with pytest.raises(StreamError, match=f"^cannot open webcam {re.escape(str(not_a_camera))}: ") as excinfo:
        list(source)
    assert "\n" not in str(excinfo.value)


# --- network ---------------------------------------------------------------------------------------

def read_stream(url: str, **kwargs) -> tuple[list[Frame], list[str], StreamError | None]:
    """Frames delivered, events reported, and the StreamError that ended the stream (if any)."""
    frames: list[Frame] = []
    events: list[str] = []
    source = NetworkSource(url, backoff_s=0.05, on_event=events.append, **kwargs)
    try:
        for frame in source:
            frames.append(frame)
    except StreamError as e:
        return frames, events, e
    return frames, events, None


@pytest.mark.parametrize("container", ["mp4", "ts"])
def test_network_source_reads_a_whole_http_video(
    serve: Callable[..., str], stream_videos: dict[str, SyntheticVideo], container: str
) -> None:
    video = stream_videos[container]
    frames, events, error = read_stream(serve(video))
    assert error is None and events == []
    assert shown_indices(frames, video) == list(range(600))
    assert_clock(frames)
    np.testing.assert_allclose([f.timestamp for f in frames], np.arange(600) / 10, atol=1e-6)


def test_network_source_reports_a_killed_server(
    serve: Callable[..., str], stream_videos: dict[str, SyntheticVideo]
) -> None:
    video = stream_videos["mp4"]
    url = serve(video, cut_at=video.path.stat().st_size // 3, fault="kill")
    start = time.monotonic()
    frames, events, error = read_stream(url, reconnect_attempts=2)
    assert time.monotonic() - start < 5.0
    assert 0 < len(frames) < 600  # what arrived before the kill was delivered
    assert shown_indices(frames, video) == list(range(len(frames)))
    assert_clock(frames)
    assert [e.split(" after: ")[0] for e in events] == [
        f"reconnecting to {url} (attempt {k}/2)" for k in (1, 2)
    ]
    assert error is not None and "\n" not in str(error)
    assert str(error).startswith(f"stream {url} lost after 2 reconnect attempts: ")


@pytest.mark.parametrize("container", ["mp4", "ts"])
def test_network_source_resumes_after_a_dropped_connection(
    serve: Callable[..., str], stream_videos: dict[str, SyntheticVideo], container: str
) -> None:
    video = stream_videos[container]
    frames, events, error = read_stream(serve(video, cut_at=video.path.stat().st_size // 3, fault="drop"))
    assert error is None and len(events) == 1
    assert shown_indices(frames, video) == list(range(600))  # nothing lost, nothing repeated
    assert_clock(frames)


def test_network_source_times_out_a_stalled_server(
    serve: Callable[..., str], stream_videos: dict[str, SyntheticVideo]
) -> None:
    video = stream_videos["mp4"]
    url = serve(video, cut_at=video.path.stat().st_size // 2, fault="stall")
    start = time.monotonic()
    frames, events, error = read_stream(url, timeout_s=0.5)
    assert time.monotonic() - start < 5.0
    assert error is None and len(events) == 1 and events[0].endswith("after: no data for 0.5 s")
    assert shown_indices(frames, video) == list(range(600))


def test_network_source_gives_up_on_an_unreachable_url() -> None:
    with socket.socket() as probe:  # a free port: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/video.mp4"
    start = time.monotonic()
    frames, events, error = read_stream(url, reconnect_attempts=2, timeout_s=1.0)
    assert time.monotonic() - start < 5.0
    assert frames == [] and len(events) == 2
    assert error is not None and "\n" not in str(error)
    assert str(error).startswith(f"cannot open stream {url} after 2 reconnect attempts: ")


# --- open_source -----------------------------------------------------------------------------------


def test_open_source_synthetic() -> None:
    source = open_source("synthetic")
    assert isinstance(source, SyntheticSource) and source.pattern == "moving-box"
    assert open_source("synthetic:moving-box").pattern == "moving-box"
    static = open_source("synthetic:static", num_frames=3, width=16, height=12)
    assert static.pattern == "static" and static.name == "synthetic:static"
    assert [f.image.shape for f in static] == [(12, 16, 3)] * 3
    with pytest.raises(ConfigError, match="moving-box, static"):
        open_source("synthetic:zebra")


@pytest.mark.skipif(any(Path("/dev").glob("video*")), reason="this machine has a video device")
@pytest.mark.parametrize(
    ("spec", "device"),
    [("webcam", "/dev/video0"), ("webcam:3", "/dev/video3"), ("/dev/video7", "/dev/video7")],
)
def test_open_source_webcam(spec: str, device: str) -> None:
    with pytest.raises(StreamError, match=f"^webcam {device} not found$"):
        open_source(spec)


def test_open_source_rejects_a_bad_webcam_number() -> None:
    with pytest.raises(StreamError, match="webcam:N"):
        open_source("webcam:front")


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://127.0.0.1:8554/cam",
        "rtmp://127.0.0.1/live/key",
        "http://127.0.0.1:8000/a.ts",
        "https://example.com/a.mp4",
        "udp://127.0.0.1:1234",
        "tcp://127.0.0.1:1234",
    ],
)
def test_open_source_network(url: str) -> None:
    source = open_source(url, reconnect_attempts=1)  # nothing connects before iterating
    assert isinstance(source, NetworkSource) and source.name == url and source.reconnect_attempts == 1


def test_network_source_hides_passwords() -> None:
    assert open_source("rtsp://admin:secret@127.0.0.1:554/cam").name == "rtsp://admin:***@127.0.0.1:554/cam"


def test_open_source_files(sample_video: Path, short_video: SyntheticVideo) -> None:
    sample = open_source("sample:bigbuckbunny")
    assert isinstance(sample, FileSource) and sample.path == sample_video
    file = open_source(str(short_video.path), max_fps=5)
    assert isinstance(file, FileSource) and len(list(file)) == 20


def test_open_source_missing_file_is_the_readers_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoError) as from_reader:
        read_video(missing)
    with pytest.raises(VideoError) as from_source:
        open_source(str(missing))
    assert str(from_source.value) == str(from_reader.value) == f"video not found: {missing}"


@pytest.mark.parametrize("spec", ["ftp://127.0.0.1/a.mp4", "file:///tmp/a.mp4", "srt://127.0.0.1:9000"])
def test_open_source_rejects_other_schemes(spec: str) -> None:
    with pytest.raises(StreamError, match=r"^unsupported stream URL .*synthetic.*rtsp://") as excinfo:
        open_source(spec)
    assert "\n" not in str(excinfo.value)


def test_every_source_is_a_frame_source(sample_video: Path) -> None:
    for source in (SyntheticSource(), FileSource(sample_video), NetworkSource("rtsp://127.0.0.1/x")):
        assert isinstance(source, FrameSource)
