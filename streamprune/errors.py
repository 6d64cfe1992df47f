"""User-facing errors: the CLI prints `error: <message>` on one line and exits with `exit_code`."""


class StreamPruneError(Exception):
    """A problem with the user's input or environment, not a bug. One line, no traceback."""

    exit_code = 2


class VideoError(StreamPruneError):
    """A video that is missing, unreadable, corrupt, empty or not a video."""


class ModelError(StreamPruneError):
    """A model that cannot be found, loaded offline or is of an unsupported type."""


class ConfigError(StreamPruneError):
    """A bad flag value: ratio out of range, unknown method, and the like."""


class OutOfMemory(StreamPruneError):
    """The device ran out of memory: the message names what to lower."""

