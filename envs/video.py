"""Episode videos: camera frames, optionally with the policy's kept visual tokens drawn over them."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

KEPT_COLOR = np.array([0, 255, 0], np.uint8)  # bright green outline around each kept token cell
DIM_FACTOR = 0.35  # brightness left in cells whose tokens were dropped
MIN_VIDEO_SIDE = 256  # small observations (PushT is 96x96) are upscaled so the grid stays readable


def cell_edges(size: int, cells: int) -> np.ndarray:
    """Pixel edges of `cells` near-equal cells over `size` pixels: `cells + 1` ints from 0 to `size`."""
    return np.round(np.linspace(0, size, cells + 1)).astype(int)


def outline_width(image_shape: tuple[int, ...], kept_shape: tuple[int, ...]) -> int:
    """Outline thickness in pixels: about 1/16 of the smaller cell side, at least 1."""
    cell = min(image_shape[0] / kept_shape[0], image_shape[1] / kept_shape[1])
    return max(1, round(cell / 16))


def draw_kept_tokens(image: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Draw a token keep-mask over a camera image.

    `image` is uint8 [H, W, 3]; `kept` is bool [gh, gw], one cell per visual token in raster order.
    Kept cells get a bright green outline (inside the cell); dropped cells are dimmed. The grid spans
    the whole frame: policies letterbox non-square frames to a square before tokenising, so pass such
    frames through `letterbox` first (as the episode loop does) for the cells to sit where the tokens are.
    Returns a new uint8 [H, W, 3] array; the input is not modified.
    """
    kept = np.asarray(kept, bool)
    height, width = image.shape[:2]
    rows, cols = cell_edges(height, kept.shape[0]), cell_edges(width, kept.shape[1])
    # Per-pixel cell mask via index expansion: row/col cell index of every pixel.
    pixel_kept = kept[np.repeat(np.arange(kept.shape[0]), np.diff(rows))][
        :, np.repeat(np.arange(kept.shape[1]), np.diff(cols))
    ]
    out = image.copy()
    out[~pixel_kept] = (out[~pixel_kept] * DIM_FACTOR).astype(np.uint8)
    line = outline_width(image.shape, kept.shape)
    for r, c in zip(*np.nonzero(kept), strict=True):
        top, bottom, left, right = rows[r], rows[r + 1], cols[c], cols[c + 1]
        out[top : top + line, left:right] = KEPT_COLOR
        out[bottom - line : bottom, left:right] = KEPT_COLOR
        out[top:bottom, left : left + line] = KEPT_COLOR
        out[top:bottom, right - line : right] = KEPT_COLOR
    return out


def letterbox(image: np.ndarray, padding: str) -> np.ndarray:
    """Pad uint8 [H, W, 3] with black to a square, as the policy pads before resizing: "top_left" (lerobot's
    `resize_with_pad`, SmolVLA: all padding above / left) or "centre" (`resize_with_pad_torch`, pi0 and
    pi05, openpi's convention). The token grid then covers the returned image exactly."""
    if padding not in ("top_left", "centre"):
        raise ValueError(f"unknown padding {padding!r}")
    height, width = image.shape[:2]
    side = max(height, width)
    extra_h, extra_w = side - height, side - width
    top, left = (extra_h, extra_w) if padding == "top_left" else (extra_h // 2, extra_w // 2)
    out = np.zeros((side, side, *image.shape[2:]), image.dtype)
    out[top:top + height, left:left + width] = image
    return out


def upscale(image: np.ndarray, min_side: int = MIN_VIDEO_SIDE) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so the shorter side is at least `min_side`."""
    factor = math.ceil(min_side / min(image.shape[:2]))
    return image if factor <= 1 else image.repeat(factor, axis=0).repeat(factor, axis=1)


class EpisodeVideo:
    """An H.264 mp4 written frame by frame (streamed: a 400-step ALOHA episode is ~370 MB raw)."""

    def __init__(self, path: str | Path, fps: int):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.frames = 0
        self._fps = fps
        self._container = av.open(str(path), "w")
        self._stream: av.video.stream.VideoStream | None = None

    def add(self, frame: np.ndarray) -> None:
        """Append a uint8 [H, W, 3] frame (cropped to even size for yuv420p)."""
        frame = np.ascontiguousarray(frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2])
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=Fraction(self._fps))
            self._stream.height, self._stream.width = frame.shape[:2]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": "18", "preset": "veryfast"}
        self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        if self._stream is not None:
            self._container.mux(self._stream.encode())
        self._container.close()
