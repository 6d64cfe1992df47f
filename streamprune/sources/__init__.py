"""Video inputs: sampled frames from files, live frame sources, and the bundled sample videos."""

from streamprune.sources.samples import list_sample_videos, resolve_video_arg, sample_video_path
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
from streamprune.sources.video import VideoClip, VideoInfo, probe_video, read_video

__all__ = [
    "FileSource",
    "Frame",
    "FrameSource",
    "NetworkSource",
    "StreamError",
    "SyntheticSource",
    "VideoClip",
    "WebcamSource",
    "open_source",
    "VideoInfo",
    "list_sample_videos",
    "probe_video",
    "read_video",
    "resolve_video_arg",
    "sample_video_path",
]
