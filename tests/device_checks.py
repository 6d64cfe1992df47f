"""Device and dtype discipline, provable without a GPU.

Under `with torch.device("meta"):` every tensor made without an explicit device lands on the meta device.
Mixing it with the CPU inputs then either raises, or (indexing a CPU tensor with a meta index) reads
garbage. So a check runs a function twice on the same CPU inputs, normally and with meta as the default
device, and asks for the same outputs on the inputs' device and dtype: a tensor made without `device=`
fails one way or the other. On CUDA (`tests/gpu/`) the same functions compare a CUDA run with a CPU run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from streamprune.tokens import VisualTokens


@contextmanager
def meta_default_device() -> Iterator[None]:
    """Tensors made without a device go to `meta` for the duration."""
    with torch.device("meta"):
        yield


def bf16_exact(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 and back: values that both a bf16 and an fp32 run see identically."""
    return x.to(torch.bfloat16).to(x.dtype)


def tensors_of(value, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside an output (tensors, VisualTokens, dataclasses, tuples, lists, dicts), by path."""
    if isinstance(value, torch.Tensor):
        yield prefix or "output", value
    elif isinstance(value, VisualTokens):
        for name in ("features", "frame", "position", "size", "origin", "fate"):
            yield f"{prefix}.{name}", getattr(value, name)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from tensors_of(getattr(value, f.name), f"{prefix}.{f.name}")
    elif isinstance(value, tuple | list):
        for i, v in enumerate(value):
            yield from tensors_of(v, f"{prefix}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from tensors_of(v, f"{prefix}[{k!r}]")


def assert_on(value, device: torch.device | str, float_dtype: torch.dtype | None = None) -> None:
    """Every tensor in `value` is on `device`; floating ones have `float_dtype` (when given)."""
    device = torch.device(device)
    for path, t in tensors_of(value):
        assert t.device.type == device.type, f"{path} is on {t.device}, expected {device}"
        if float_dtype is not None and t.is_floating_point():
            assert t.dtype == float_dtype, f"{path} is {t.dtype}, expected {float_dtype}"


def assert_same(a, b, atol: float = 0.0, rtol: float = 0.0, what: str = "") -> None:
    """Two outputs hold the same tensors (compared on the CPU, dtypes may differ when a tolerance is given)."""
    ta, tb = dict(tensors_of(a)), dict(tensors_of(b))
    assert ta.keys() == tb.keys(), f"{what}: outputs differ in structure: {sorted(ta)} vs {sorted(tb)}"
    for path in ta:
        x, y = ta[path].detach().cpu(), tb[path].detach().cpu()
        assert x.shape == y.shape, f"{what}{path}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.is_floating_point() or y.is_floating_point():
            torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=rtol, msg=lambda m, p=path: f"{what}{p}: {m}")
        else:
            assert torch.equal(x, y), f"{what}{path}: values differ"


def check_device_discipline(fn: Callable[[], object], device: torch.device | str = "cpu",
                            float_dtype: torch.dtype | None = None, what: str = "") -> object:
    """Run `fn` (a closure over CPU inputs) normally and under the meta default device: same outputs, on the
    inputs' device and dtype. Returns the normal run's output."""
    expected = fn()
    with meta_default_device():
        got = fn()
        list(tensors_of(got))  # lazy bookkeeping (VisualTokens.origin / size) runs under meta too
    assert_on(got, device, float_dtype)
    assert_same(expected, got, what=what)
    return expected
