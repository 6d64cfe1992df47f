"""The decord fallback decoder (the [decord] extra; in the robot environment, tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamprune.sources import read_video
from streamprune.sources.video import _read_with_decord


def test_decord_fallback_matches_pyav(sample_video: Path) -> None:
    pyav = read_video(sample_video, num_frames=6)
    dec = _read_with_decord(sample_video, 6, None, None)
    np.testing.assert_array_equal(dec.frame_indices, pyav.frame_indices)
    np.testing.assert_allclose(dec.timestamps, pyav.timestamps, atol=1e-3)
    assert dec.frames.shape == pyav.frames.shape
    assert np.abs(dec.frames.astype(int) - pyav.frames).mean() < 3
