"""streamprune: token reduction for video LLMs and robot policies."""

from streamprune.errors import ConfigError, ModelError, StreamPruneError, VideoError
from streamprune.tokens import Fate, VisualTokens

__version__ = "0.1.0"
__all__ = ["ConfigError", "Fate", "ModelError", "StreamPruneError", "VideoError", "VisualTokens"]
