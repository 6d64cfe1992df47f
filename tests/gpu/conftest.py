"""The GPU suite (`make test-gpu`): the device checks of the CPU suite, run on CUDA. CI has no GPU and does not
collect this folder (tests/conftest.py); on a machine without CUDA every test here is skipped."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    torch.cuda.empty_cache()
