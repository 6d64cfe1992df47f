"""Where a run computes: device, dtype and attention implementation, chosen once per run.

`auto` means a CUDA GPU in bf16 when one is visible, else the CPU in fp32 (bf16 is several times slower
than fp32 on CPUs). Everything downstream takes the device and dtype of its input tensors; only loaders
(models, policies) and the commands read a `Runtime`.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from streamprune.errors import ConfigError, OutOfMemory

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str = "sdpa"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict:
        """For reports and `--json`: device, dtype, attention and, on CUDA, the GPU's name and memory."""
        out = {"device": str(self.device), "dtype": self.dtype_name, "attn_implementation": self.attn_implementation,
               "gpu": None}
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            out["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        return out

    def synchronize(self) -> None:
        """Wait for queued device work, so a host clock reads the time it took (no-op on CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` → a torch.device that exists here (ConfigError otherwise)."""
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device {spec}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: no CUDA GPU is visible to torch {torch.__version__} "
                          "(use --device cpu or auto)")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto` → bf16 on a GPU (fp16 where it has no bf16), fp32 on the CPU; else the named dtype."""
    if isinstance(spec, torch.dtype):
        return spec
    spec = "auto" if spec is None else spec.strip().lower()
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec not in DTYPES:
        raise ConfigError(f"--dtype must be auto, bfloat16, float16 or float32, got {spec!r}")
    return DTYPES[spec]


def resolve_runtime(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
                    attn_implementation: str | None = "sdpa") -> Runtime:
    """Check and resolve the three run options (one ConfigError line for a bad one)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    attn = attn_implementation or "sdpa"
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {attn!r}")
    if attn == "flash_attention_2":
        if dev.type != "cuda" or dt == torch.float32:
            raise ConfigError("--attn-implementation flash_attention_2 needs a CUDA device and --dtype bfloat16 "
                              "or float16")
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ConfigError("--attn-implementation flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn); sdpa is the default") from None
    return Runtime(dev, dt, attn)


CPU = Runtime(torch.device("cpu"), torch.float32)


def out_of_memory(exc: BaseException, what: str = "run", lower: str = "--frames, --retain or --dtype") -> OutOfMemory:
    """The one user-facing line for a CUDA out-of-memory error: what ran out and what to lower. Frees the
    allocator's cached blocks, so that work after it (the next video of a batch) can go on."""
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(exc))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return OutOfMemory(f"CUDA out of memory during the {what}{f' (asked for {asked[1]} more)' if asked else ''}; "
                       f"lower {lower} (e.g. --dtype bfloat16), or use a larger GPU")


@contextmanager
def out_of_memory_as_error(what: str = "run", lower: str = "--frames, --retain or --dtype"):
    """Raise `out_of_memory(...)` in place of a CUDA out-of-memory error."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(exc, what, lower) from None
