"""Frame sampling and error handling of streamprune.sources, against real decoders and files."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import pytest

from streamprune.errors import ConfigError, VideoError
from streamprune.sources import (
    VideoInfo,
    list_sample_videos,
    probe_video,
    read_video,
    resolve_video_arg,
    sample_video_path,
)
from streamprune.sources.video import _decode_indices, sample_indices

if TYPE_CHECKING:
    from conftest import SyntheticVideo


def linspace_indices(total: int, n: int) -> np.ndarray:
    return np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))


def assert_shows_indices(clip, video: SyntheticVideo) -> None:
    """Each returned frame shows the number it was encoded with, equal to its reported index (±1)."""
    shown = np.array([video.index_of(frame) for frame in clip.frames])
    np.testing.assert_allclose(shown, clip.frame_indices, atol=1)


# --- the real sample video ----------------------------------------------------------------------


def test_probe_sample(sample_video: Path) -> None:
    assert probe_video(sample_video) == VideoInfo(25.0, 5.28, 132, 1280, 720, "h264")


def test_uniform_sampling_on_sample(sample_video: Path) -> None:
    clip = read_video(sample_video, num_frames=32)
    assert clip.frames.shape == (32, 720, 1280, 3) and clip.frames.dtype == np.uint8
    assert clip.timestamps.dtype == np.float64 and clip.frame_indices.dtype == np.int64
    np.testing.assert_array_equal(clip.frame_indices, np.linspace(0, 131, 32).round())
    assert np.all(np.diff(clip.timestamps) > 0)
    np.testing.assert_allclose(clip.timestamps, clip.frame_indices / 25.0)
    assert (clip.fps, clip.duration, clip.total_frames, clip.path) == (25.0, 5.28, 132, str(sample_video))


def test_fps_sampling_on_sample(sample_video: Path) -> None:
    clip = read_video(sample_video, num_frames=None, fps=2.0)
    assert len(clip.frames) == math.ceil(5.28 * 2)
    np.testing.assert_allclose(clip.timestamps, np.arange(len(clip.frames)) / 2.0, atol=0.5 / 25)


def test_fps_sampling_is_capped_by_num_frames(sample_video: Path) -> None:
    clip = read_video(sample_video, num_frames=8, fps=10.0)
    assert len(clip.frames) == 8
    assert clip.frame_indices[0] == 0 and clip.frame_indices[-1] >= 125  # spans the whole video


def test_progress_reports_each_sampled_frame(sample_video: Path) -> None:
    calls: list[tuple[int, int]] = []
    read_video(sample_video, num_frames=5, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(6)]


# --- synthetic videos whose frames show their own index -------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 8, 32, 100])
def test_uniform_sampling_returns_the_right_frames(synthetic_video: SyntheticVideo, num_frames: int) -> None:
    clip = read_video(synthetic_video.path, num_frames=num_frames)
    np.testing.assert_array_equal(clip.frame_indices, linspace_indices(600, num_frames))
    assert_shows_indices(clip, synthetic_video)
    np.testing.assert_allclose(clip.timestamps, clip.frame_indices / 10.0)


def test_fps_sampling_returns_the_right_frames(synthetic_video: SyntheticVideo) -> None:
    clip = read_video(synthetic_video.path, num_frames=None, fps=0.25)
    np.testing.assert_array_equal(clip.frame_indices, np.arange(15) * 40)
    assert_shows_indices(clip, synthetic_video)


def test_far_targets_are_reached_by_seeking(synthetic_video: SyntheticVideo) -> None:
    targets = linspace_indices(600, 8)
    with av.open(str(synthetic_video.path)) as container:
        decoded = _decode_indices(container, container.streams.video[0], targets, 10.0, None)
    assert decoded.indices == targets.tolist()
    assert [synthetic_video.index_of(f) for f in decoded.frames] == targets.tolist()
    assert decoded.decoded < 8 * 10 + 10  # about one GOP per target, not the 600-frame stream


def test_keyframes_sparser_than_targets(make_video) -> None:
    video = make_video("gop300.mp4", 600, fps=10, gop=300)
    clip = read_video(video.path, num_frames=16)
    np.testing.assert_array_equal(clip.frame_indices, linspace_indices(600, 16))
    assert_shows_indices(clip, video)
    # Seeking back to the same keyframe for every target would decode ~16 x 150 frames; after the
    # first seek lands behind, the decoder keeps going forward instead.
    with av.open(str(video.path)) as container:
        decoded = _decode_indices(container, container.streams.video[0], clip.frame_indices, 10.0, None)
    assert decoded.decoded < 700


def test_video_shorter_than_num_frames_gives_every_frame(make_video) -> None:
    video = make_video("five_frames.mp4", 5)
    clip = read_video(video.path, num_frames=32)
    np.testing.assert_array_equal(clip.frame_indices, np.arange(5))
    assert_shows_indices(clip, video)


def test_container_without_frame_count(make_video) -> None:
    video = make_video("no_count.mkv", 300)
    with av.open(str(video.path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska stores no frame count
    assert probe_video(video.path).total_frames == 300  # estimated from duration x fps
    clip = read_video(video.path, num_frames=12)
    np.testing.assert_array_equal(clip.frame_indices, linspace_indices(300, 12))
    assert_shows_indices(clip, video)


def test_container_longer_than_its_video(make_video) -> None:
    # 2 s of video, 4 s of audio: the estimate from the container's duration is twice too high.
    video = make_video("long_audio.mkv", 20, audio_seconds=4.0)
    assert probe_video(video.path).total_frames > 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an estimate being off is no cause for a warning
        clip = read_video(video.path, num_frames=8)
    np.testing.assert_array_equal(clip.frame_indices, linspace_indices(20, 8))
    assert clip.total_frames == 20
    assert_shows_indices(clip, video)


@pytest.mark.parametrize(
    ("num_frames", "warning"),
    [
        (16, "decoding stopped"),  # decoding runs into the cut: the frames before it
        (8, "stops at frame"),  # a seek jumps past the cut: re-sampled over the frames that exist
    ],
)
def test_video_truncated_midway(make_video, tmp_path: Path, num_frames: int, warning: str) -> None:
    whole = make_video("faststart.mp4", 300, faststart=True)
    data = whole.path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # index intact, half the frames' data gone
    with pytest.warns(UserWarning, match=f"cut.mp4.*{warning}"):
        clip = read_video(cut, num_frames=num_frames)
    assert 1 <= len(clip.frames) <= num_frames and clip.frame_indices[-1] < 300
    assert_shows_indices(clip, whole)


def test_video_data_missing_entirely(make_video, tmp_path: Path) -> None:
    whole = make_video("faststart_small.mp4", 100, faststart=True)
    data = whole.path.read_bytes()
    cut = tmp_path / "no_frames.mp4"
    cut.write_bytes(data[: data.index(b"mdat") + 4])  # header and index only
    with pytest.raises(VideoError, match="no video frame could be decoded"):
        read_video(cut)


# --- bad inputs ------------------------------------------------------------------------------------


BAD_KINDS = [
    "missing",
    "directory",
    "empty",
    "random_bytes",
    "text",
    "text_as_mp4",
    "truncated",
    "audio_only",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("reader", [read_video, probe_video])
def test_bad_input_is_one_line_naming_the_file(bad_video_files: dict[str, Path], kind: str, reader) -> None:
    path = bad_video_files[kind]
    with pytest.raises(VideoError) as info:
        reader(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_bad_input_messages(bad_video_files: dict[str, Path]) -> None:
    expected = {
        "missing": "video not found",
        "directory": "is a directory",
        "empty": "is empty",
        "random_bytes": "not a video file",
        "text": "not a video file",
        "audio_only": "has no video stream",
    }
    for kind, fragment in expected.items():
        with pytest.raises(VideoError, match=fragment):
            read_video(bad_video_files[kind])


@pytest.mark.parametrize(
    "kwargs", [{"num_frames": 0}, {"fps": 0.0}, {"fps": -1.0}, {"fps": float("nan")}, {"num_frames": None}]
)
def test_bad_sampling_arguments(sample_video: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        read_video(sample_video, **kwargs)


def test_sample_indices_edge_cases() -> None:
    np.testing.assert_array_equal(sample_indices(1, 25.0, 0.04, 32), [0])
    np.testing.assert_array_equal(
        sample_indices(10, 10.0, 1.0, None, fps=100.0), np.arange(10)
    )  # deduplicated
    np.testing.assert_array_equal(sample_indices(100, 10.0, 10.0, None, fps=1.0), np.arange(10) * 10)


# --- sample videos ---------------------------------------------------------------------------------


def test_list_and_resolve_sample_videos(sample_video: Path) -> None:
    samples = list_sample_videos()
    assert samples["bigbuckbunny"] == sample_video and sample_video.is_file()
    assert resolve_video_arg("sample:bigbuckbunny") == sample_video_path() == sample_video
    assert resolve_video_arg("clips/a.mp4") == Path("clips/a.mp4")


def test_unknown_sample_lists_available() -> None:
    with pytest.raises(VideoError, match="bigbuckbunny"):
        resolve_video_arg("sample:nope")
