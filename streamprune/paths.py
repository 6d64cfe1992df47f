"""Output paths, checked before any work starts: a path that cannot be written is one `error:` line, not a
traceback after minutes of decoding and generation."""

from __future__ import annotations

import os
from pathlib import Path

from streamprune.errors import ConfigError

# what `--save-viz` writes, by suffix (Pillow writes each in its own format)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` must be a writable folder (the rest is created on write)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag} {path}: cannot write in {parent} (permission denied)")
            return


def check_output_file(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """`path` as a file that can be (over)written, its suffix one of `suffixes` when given; ConfigError if not."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} {path}: unknown suffix {path.suffix or '(none)'!r}; use one of "
                          f"{', '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write the file (permission denied)")
    _check_parent(path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a folder that exists or can be created, and written in; ConfigError if not."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{flag} {path}: is a file; give a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: cannot write in the folder (permission denied)")
    else:
        _check_parent(path, flag)
    return path
