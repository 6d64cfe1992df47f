"""streamprune: token reduction for video LLMs and robot policies."""

from streamprune.errors import ConfigError, ModelError, StreamPruneError, VideoError

__version__ = "0.1.0"
__all__ = ["ConfigError", "Fate", "ModelError", "StreamPruneError", "VideoError", "VisualTokens"]


def __getattr__(name: str):
    # `Fate` and `VisualTokens` import torch: loaded on first use, so that the console script (streamprune.__main__)
    # can catch a Ctrl-C while torch imports
    if name in ("Fate", "VisualTokens"):
        from streamprune import tokens

        return getattr(tokens, name)
    raise AttributeError(f"module 'streamprune' has no attribute {name!r}")
