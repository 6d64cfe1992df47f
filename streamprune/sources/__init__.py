"""Video inputs: decoding sampled frames from files and locating bundled sample videos."""

from streamprune.sources.samples import list_sample_videos, resolve_video_arg, sample_video_path
from streamprune.sources.video import VideoClip, VideoInfo, probe_video, read_video

__all__ = [
    "VideoClip",
    "VideoInfo",
    "list_sample_videos",
    "probe_video",
    "read_video",
    "resolve_video_arg",
    "sample_video_path",
]
