"""Tests for `streamprune.viz.render_reduction` on a small hand-made `VisualTokens`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from streamprune import viz
from streamprune.tokens import Fate, VisualTokens

T, H, W = 6, 32, 48
GRID = (4, 4)
SEGMENTS = [(0, 2), (3, 5)]
THUMB = 240  # thumbnails 240×160: the grid, not the header, sets the width
COLUMNS = 4

KEPT_CELL = 0  # frame 0: a kept token standing only for itself (size 1, so no dot)
MERGED_CELL = 1
DROPPED_CELL = 2
SINK_CELL = 5  # frame 0: the kept token every merged/dropped token of segment 0 counts against


def _frames() -> np.ndarray:
    """Warm, textured frames (little blue) so darkening and a blue tint are easy to measure."""
    yy, xx = np.mgrid[0:H, 0:W]
    frames = np.empty((T, H, W, 3), np.uint8)
    for t in range(T):
        frames[t, ..., 0] = 150 + (xx * 2 + t * 5) % 60
        frames[t, ..., 1] = 100 + (yy * 2) % 40
        frames[t, ..., 2] = 40 + (xx + yy) % 20
    return frames


def _tokens() -> VisualTokens:
    n = GRID[0] * GRID[1]
    fate = np.full((T, n), Fate.MERGED, np.uint8)
    for start, _ in SEGMENTS:
        fate[start, [KEPT_CELL, SINK_CELL]] = Fate.KEPT
        fate[start, DROPPED_CELL] = Fate.DROPPED
    fate[1, 10] = Fate.KEPT
    fate[4, [3, 7]] = Fate.DROPPED

    kept = np.argwhere(fate == Fate.KEPT)  # (frame, position), raster order
    index = {(int(f), int(p)): m for m, (f, p) in enumerate(kept)}
    origin = np.zeros((T, n), np.int64)
    for start, end in SEGMENTS:
        for t in range(start, end + 1):
            for p in range(n):
                origin[t, p] = index.get((t, p), index[(start, SINK_CELL)])
    size = np.bincount(origin.ravel(), minlength=len(kept))
    return VisualTokens(
        features=torch.zeros(len(kept), 4),
        frame=torch.tensor(kept[:, 0]),
        position=torch.tensor(kept[:, 1]),
        size=torch.tensor(size),
        origin=torch.tensor(origin),
        fate=torch.tensor(fate),
        grid_hw=GRID,
        segments=list(SEGMENTS),
        after_temporal=T * n - 30,
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    frames, tokens = _frames(), _tokens()
    path = tmp_path_factory.mktemp("viz") / "sub" / "reduction.png"
    image = viz.render_reduction(
        frames, tokens, timestamps=np.arange(T) * 1.5, title="test", path=path, max_columns=COLUMNS,
        thumb=THUMB,
    )
    layout = viz.compute_layout(T, (H, W), COLUMNS, THUMB)
    return frames, tokens, path, image, layout


def _cell(arr: np.ndarray, position: int, inset: int = 0) -> np.ndarray:
    """Pixels of token cell `position` in an [h, w, 3] thumbnail, shrunk by `inset` on every side."""
    h, w = arr.shape[:2]
    r, c = divmod(position, GRID[1])
    y0, y1 = r * h // GRID[0], (r + 1) * h // GRID[0]
    x0, x1 = c * w // GRID[1], (c + 1) * w // GRID[1]
    return arr[y0 + inset : y1 - inset, x0 + inset : x1 - inset].astype(np.float64)


def _thumb_pixels(image: Image.Image, layout: viz.Layout, frame: int) -> np.ndarray:
    return np.asarray(image)[slice(*layout.thumb_boxes[frame][1::2]), slice(*layout.thumb_boxes[frame][0::2])]


def test_png_written_with_grid_width(rendered):
    _, _, path, image, layout = rendered
    assert path.is_file()
    reopened = Image.open(path)
    assert reopened.format == "PNG" and reopened.mode == "RGB"
    assert reopened.size == image.size
    thumb_w, thumb_h = viz.thumbnail_size((H, W), THUMB)
    assert (thumb_w, thumb_h) == (240, 160)  # aspect kept
    expected_w = 2 * viz.MARGIN + COLUMNS * (thumb_w + 2 * viz.BORDER) + (COLUMNS - 1) * viz.GAP
    assert reopened.width == expected_w == layout.width
    assert reopened.height == layout.height
    assert reopened.height > 2 * thumb_h  # two rows of 4 for 6 frames


def test_thumbnail_boxes_hold_the_frames(rendered):
    frames, _, _, image, layout = rendered
    src = viz.make_thumbnail(frames[0], THUMB)
    out = _thumb_pixels(image, layout, 0)
    assert out.shape == src.shape


def test_dropped_cell_is_darkened(rendered):
    frames, _, _, image, layout = rendered
    src = _cell(viz.make_thumbnail(frames[0], THUMB), DROPPED_CELL, inset=2)
    out = _cell(_thumb_pixels(image, layout, 0), DROPPED_CELL, inset=2)
    assert out.mean() < 0.4 * src.mean()


def test_merged_cell_is_tinted_blue(rendered):
    frames, _, _, image, layout = rendered
    src = _cell(viz.make_thumbnail(frames[0], THUMB), MERGED_CELL, inset=2)
    out = _cell(_thumb_pixels(image, layout, 0), MERGED_CELL, inset=2)
    blue_share = lambda a: a[..., 2].sum() / a.sum()  # noqa: E731
    assert out[..., 2].mean() > src[..., 2].mean() + 30
    assert blue_share(out) > blue_share(src) + 0.15
    assert out[..., 0].mean() < src[..., 0].mean()  # and not just brightened


def test_kept_cell_interior_unchanged(rendered):
    frames, _, _, image, layout = rendered
    src = _cell(viz.make_thumbnail(frames[0], THUMB), KEPT_CELL, inset=2)
    out = _cell(_thumb_pixels(image, layout, 0), KEPT_CELL, inset=2)
    np.testing.assert_array_equal(out, src)
    # its edge facing a merged neighbour carries the bright outline
    edge = _cell(_thumb_pixels(image, layout, 0), KEPT_CELL)[:, -1]
    assert (edge == 255).all()


def test_size_dot_on_kept_token_standing_for_many(rendered):
    _, _, _, image, layout = rendered
    cell = _cell(_thumb_pixels(image, layout, 0), SINK_CELL)
    centre = cell[cell.shape[0] // 2, cell.shape[1] // 2]
    np.testing.assert_array_equal(centre, viz.DOT_FILL)


def test_segments_get_distinct_border_colours(rendered):
    _, _, _, image, layout = rendered
    arr = np.asarray(image)

    def border(frame: int) -> tuple[int, ...]:
        x0, y0, _, y1 = layout.thumb_boxes[frame]
        return tuple(arr[(y0 + y1) // 2, x0 - 1])

    def bar(frame: int) -> tuple[int, ...]:
        x0, _, x1, y1 = layout.thumb_boxes[frame]
        return tuple(arr[y1 + viz.BORDER + viz.BAR_H - 2, x1 - 2])

    seg0, seg1 = border(0), border(3)
    assert seg0 != seg1
    assert seg0 == border(1) == border(2) == bar(0) == tuple(viz.segment_colour(0))
    assert seg1 == border(4) == border(5) == bar(5) == tuple(viz.segment_colour(1))
    # the bar joins frames of one segment across the gap, and stops where the segment ends
    gap_x = layout.thumb_boxes[0][2] + viz.BORDER + viz.GAP // 2
    bar_y = layout.thumb_boxes[0][3] + viz.BORDER + viz.BAR_H // 2
    assert tuple(arr[bar_y, gap_x]) == seg0
    gap_after_seg0 = layout.thumb_boxes[2][2] + viz.BORDER + 2
    assert tuple(arr[bar_y, gap_after_seg0]) == viz.BACKGROUND


def test_mismatched_frame_count_raises():
    with pytest.raises(ValueError, match="frames"):
        viz.render_reduction(_frames()[:5], _tokens())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda tok: setattr(tok, "segments", [(0, 2), (4, 5)]), "segments"),
        (lambda tok: setattr(tok, "segments", [(0, 2)]), "segments"),
        (lambda tok: setattr(tok, "grid_hw", (2, 4)), "grid_hw"),
    ],
)
def test_inconsistent_tokens_raise(change, message):
    tokens = _tokens()
    change(tokens)
    with pytest.raises(ValueError, match=message):
        viz.render_reduction(_frames(), tokens)


def test_timestamps_length_checked():
    with pytest.raises(ValueError, match="timestamps"):
        viz.render_reduction(_frames(), _tokens(), timestamps=np.arange(T - 1))


def test_summary_line_counts():
    tokens = _tokens()
    fate = tokens.fate.numpy()
    merged, dropped = int((fate == Fate.MERGED).sum()), int((fate == Fate.DROPPED).sum())
    line = viz.summary_line(tokens)
    assert line == (
        f"{T * 16} tokens → {len(tokens)} kept ({100 * len(tokens) / (T * 16):.1f}%), "
        f"{merged} merged, {dropped} dropped, 2 segments"
    )
    # with the model's newline tokens: the count the LLM gets, as the text report gives it
    with_newline = viz.summary_line(tokens, newlines=1)
    assert f"→ {len(tokens) + 1} into the LLM ({len(tokens)} kept (" in with_newline and "+ 1 newline)" in with_newline


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".jpg", b"\xff\xd8\xff"), (".webp", b"RIFF")])
def test_saved_image_is_in_its_suffix_format(tmp_path, suffix, magic):
    path = tmp_path / f"viz{suffix}"
    viz.render_reduction(_frames(), _tokens(), title="t", path=path, thumb=64)
    assert path.read_bytes()[:len(magic)] == magic


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "00:00.0"), (1.5, "00:01.5"), (83.27, "01:23.3"), (59.96, "01:00.0"), (3600, "60:00.0")],
)
def test_format_timestamp(seconds, text):
    assert viz.format_timestamp(seconds) == text


def test_unreduced_tokens_and_portrait_frames_render():
    frames = np.zeros((3, 60, 20, 3), np.uint8)
    tokens = VisualTokens.unreduced(torch.zeros(3, 16, 2), GRID)
    image = viz.render_reduction(frames, tokens, thumb=64)
    assert viz.thumbnail_size((60, 20), 64) == (21, 64)
    assert image.width >= viz.grid_width(3, (60, 20), 8, 64)


@pytest.mark.parametrize("builtin_works", [True, False])
def test_renders_without_ttf_fonts(monkeypatch, builtin_works):
    """No DejaVu on the system: Pillow's built-in font (or, without FreeType, its bitmap font) is used."""
    real_truetype = viz.ImageFont.truetype

    def truetype(font=None, *args, **kwargs):
        if isinstance(font, str) or not builtin_works:
            raise OSError("cannot open resource")
        return real_truetype(font, *args, **kwargs)

    viz._font.cache_clear()
    monkeypatch.setattr(viz.ImageFont, "truetype", truetype)
    try:
        title = "no ttf · τ=0.65 ✓"  # characters the built-in fonts lack must not break rendering
        image = viz.render_reduction(_frames(), _tokens(), timestamps=np.arange(T) * 1.5, title=title, thumb=64)
        font = viz._font(viz.TEXT_SIZE)
        assert isinstance(font, viz.ImageFont.FreeTypeFont) == builtin_works
        assert image.width > 0
        # the header text is really drawn: light text pixels appear in the title row
        title_row = np.asarray(image)[viz.MARGIN : viz.MARGIN + viz.TITLE_SIZE, : image.width // 2]
        assert (title_row.min(axis=-1) > 200).sum() > 20
    finally:
        viz._font.cache_clear()


def test_recomputed_patches_are_tinted_and_reused_ones_dimmed():
    from streamprune.viz import RECOMPUTED_TINT, render_recomputed

    frames = np.full((2, 64, 64, 3), 200, np.uint8)
    recomputed = np.zeros((2, 4), bool)
    recomputed[0] = True  # a keyframe
    recomputed[1, 0] = True  # then only the top-left patch of a 2×2 grid
    image = np.asarray(render_recomputed(frames, recomputed, (2, 2), thumb=64))
    header, pad = 56, 8
    top_left = image[header + 10, pad + 64 + pad + 10]  # frame 1, top-left patch: recomputed
    bottom_right = image[header + 50, pad + 64 + pad + 50]  # frame 1, bottom-right: reused
    expected = 200 * 0.65 + np.array(RECOMPUTED_TINT) * 0.35
    assert np.allclose(top_left, expected, atol=1.5)
    assert np.allclose(bottom_right, 200 * 0.45, atol=1.5)
