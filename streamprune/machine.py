"""What a benchmark ran on, for its report: ratios are only comparable with the machine named."""

from __future__ import annotations

import os
import platform

import torch


def describe() -> str:
    """e.g. "AMD EPYC, 2 cores, 2 threads, torch 2.11.0+cpu" (the CPU model from /proc/cpuinfo on Linux)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{model}, {os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)}, torch {torch.__version__}"
