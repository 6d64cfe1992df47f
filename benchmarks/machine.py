"""What a benchmark ran on (kept here for the benchmark scripts; the code lives in `streamprune.machine`)."""

from streamprune.machine import describe

__all__ = ["describe"]
