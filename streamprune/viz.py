"""Render what a token reduction did to a video as one PNG: frames, segments and per-token fates.

Layout (top to bottom): a header (title, token counts, legend, a segment timeline), then the sampled
frames as a grid of thumbnails, `max_columns` per row. Each thumbnail sits in a frame of its segment's
colour with a thick bar underneath; the bar runs on across the gap while the segment continues in the
same row, and a new segment starts with a coloured stripe on its left and the label "seg k: frames a–b".
On each thumbnail the token grid is overlaid: KEPT cells stay clear (thin white outline where they border
non-kept cells), MERGED cells are desaturated, tinted blue and hatched, DROPPED cells are darkened almost
to black. A yellow dot on a kept cell marks an output token standing for several originals (area ∝ `size`).

PIL + numpy only, so it is fast enough to run on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from streamprune.tokens import Fate, VisualTokens

# ---- look ---------------------------------------------------------------------------------------------

BACKGROUND = (22, 24, 29)
TEXT = (236, 238, 242)
TEXT_DIM = (150, 156, 168)
KEPT_OUTLINE = (255, 255, 255)
MERGED_TINT = (40, 120, 255)
MERGED_ALPHA = 0.45
MERGED_HATCH = 6  # every 6th anti-diagonal of a merged cell is lightened
MERGED_HATCH_RGB = (190, 215, 255)
DROPPED_TINT = (30, 0, 0)
DROPPED_ALPHA = 0.78
DOT_FILL = (255, 214, 10)
DOT_EDGE = (0, 0, 0)

# Bright, mutually distinct segment colours that avoid the blue (merged) and near-black (dropped) states.
SEGMENT_COLOURS = [
    (255, 159, 28),  # orange
    (46, 196, 182),  # teal
    (236, 72, 153),  # pink
    (163, 230, 53),  # lime
    (167, 139, 250),  # lavender
    (250, 204, 21),  # yellow
    (248, 113, 113),  # coral
    (34, 211, 238),  # cyan
    (74, 222, 128),  # green
    (244, 114, 182),  # rose
    (253, 186, 116),  # peach
    (192, 132, 252),  # purple
]

MARGIN = 18  # outer margin
GAP = 14  # horizontal gap between cells (segment-start stripes live here)
ROW_GAP = 16  # vertical gap between rows
BORDER = 3  # segment-coloured frame around each thumbnail
CAPTION_H = 20  # frame index / timestamp line above a thumbnail
BAR_H = 20  # segment bar under a thumbnail
STRIPE_W = 5  # segment-start stripe width

TITLE_SIZE = 22
TEXT_SIZE = 14
SMALL_SIZE = 12


# ---- fonts --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans if installed, else Pillow's built-in scalable font, else its fixed bitmap font."""
    names = ["DejaVuSans-Bold.ttf", "DejaVuSans.ttf"] if bold else ["DejaVuSans.ttf"]
    for name in names:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or no FreeType: one small bitmap font
        return ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else (
            ImageFont.load_default()
        )


# Pillow's built-in fonts lack →, ∝, – …; spell the few non-ASCII characters we use in ASCII for them.
_ASCII = str.maketrans({"→": "->", "∝": "~", "–": "-", "…": "...", "·": "|", "×": "x", "τ": "tau"})


def _fit_font(text: str, font) -> str:
    if isinstance(font, ImageFont.FreeTypeFont):
        return text if isinstance(getattr(font, "path", None), str) else text.translate(_ASCII)
    return text.translate(_ASCII).encode("latin-1", "replace").decode("latin-1")  # bitmap: Latin-1 only


def _text_w(text: str, font) -> int:
    left, _, right, _ = font.getbbox(_fit_font(text, font))
    return int(np.ceil(right - left))


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill, anchor="lm") -> None:
    text = _fit_font(text, font)
    if isinstance(font, ImageFont.FreeTypeFont):
        draw.text(xy, text, font=font, fill=fill, anchor=anchor)
        return
    # bitmap fonts do not support anchors: centre vertically, align horizontally by hand
    left, top, right, bottom = font.getbbox(text)
    x, y = xy
    x -= {"l": 0, "m": (right - left) / 2, "r": right - left}[anchor[0]]
    draw.text((x, y - (bottom - top) / 2 - top), text, font=font, fill=fill)


# ---- small helpers ------------------------------------------------------------------------------------


def segment_colour(index: int) -> tuple[int, int, int]:
    """Colour of segment `index`; neighbouring segments always differ."""
    return SEGMENT_COLOURS[index % len(SEGMENT_COLOURS)]


def format_timestamp(seconds: float) -> str:
    """`mm:ss.s`, e.g. 83.25 -> '01:23.2' (rounded to tenths before splitting, so never '00:60.0')."""
    tenths = int(round(float(seconds) * 10))
    sign = "-" if tenths < 0 else ""
    tenths = abs(tenths)
    return f"{sign}{tenths // 600:02d}:{(tenths % 600) // 10:02d}.{tenths % 10}"


def thumbnail_size(frame_hw: tuple[int, int], thumb: int) -> tuple[int, int]:
    """(width, height) of a thumbnail: the frame's aspect kept, longest side `thumb`."""
    h, w = frame_hw
    if w >= h:
        return thumb, max(1, round(thumb * h / w))
    return max(1, round(thumb * w / h)), thumb


def make_thumbnail(frame: np.ndarray, thumb: int) -> np.ndarray:
    """The frame resized to `thumbnail_size`, as uint8 [h, w, 3]."""
    tw, th = thumbnail_size(frame.shape[:2], thumb)
    return np.asarray(Image.fromarray(frame).resize((tw, th), Image.Resampling.BILINEAR))


# ---- validation ---------------------------------------------------------------------------------------


def _check_inputs(frames: np.ndarray, tokens: VisualTokens, timestamps: np.ndarray | None) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        scale = 255.0 if np.issubdtype(frames.dtype, np.floating) and frames.max(initial=0) <= 1.0 else 1.0
        frames = np.clip(frames * scale, 0, 255).astype(np.uint8)
    t, n = tuple(tokens.origin.shape)
    if t == 0:
        raise ValueError("tokens cover no frames; nothing to render")
    if frames.shape[0] != t:
        raise ValueError(
            f"frames has {frames.shape[0]} frames but tokens cover {t} (tokens.origin is [{t}, {n}]); "
            "pass the same sampled frames the reduction ran on"
        )
    gh, gw = tokens.grid_hw
    if gh * gw != n:
        raise ValueError(f"tokens.grid_hw {gh}×{gw} = {gh * gw} does not match {n} tokens per frame")
    if timestamps is not None and len(timestamps) != t:
        raise ValueError(f"timestamps has {len(timestamps)} entries for {t} frames")
    expected = 0
    for start, end in tokens.segments:
        if start != expected or end < start:
            raise ValueError(
                f"tokens.segments must be inclusive (start, end) ranges covering frames 0..{t - 1} in order; "
                f"got {tokens.segments}"
            )
        expected = end + 1
    if expected != t:
        raise ValueError(f"tokens.segments cover frames 0..{expected - 1} but there are {t} frames")
    return frames


# ---- layout -------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where everything goes. `thumb_boxes[i]` is the (x0, y0, x1, y1) of frame i's thumbnail pixels."""

    width: int
    height: int
    header_h: int
    columns: int
    thumb_w: int
    thumb_h: int
    thumb_boxes: list[tuple[int, int, int, int]]

    @property
    def cell_w(self) -> int:
        return self.thumb_w + 2 * BORDER

    @property
    def cell_h(self) -> int:
        return CAPTION_H + self.thumb_h + 2 * BORDER + BAR_H


def header_height() -> int:
    """Title + counts + legend + segment timeline; depends only on the (fixed) font sizes."""
    return MARGIN + TITLE_SIZE + 10 + TEXT_SIZE + 14 + 20 + 14 + 16 + 18


def grid_width(num_frames: int, frame_hw: tuple[int, int], max_columns: int = 8, thumb: int = 224) -> int:
    """Width of the frame grid alone: margins plus `columns` cells of thumbnail + border, with gaps."""
    columns = max(1, min(max_columns, num_frames))
    tw, _ = thumbnail_size(frame_hw, thumb)
    return 2 * MARGIN + columns * (tw + 2 * BORDER) + (columns - 1) * GAP


def compute_layout(
    num_frames: int, frame_hw: tuple[int, int], max_columns: int = 8, thumb: int = 224, min_width: int = 0
) -> Layout:
    """Header on top, then `num_frames` cells left-aligned in rows of up to `max_columns`."""
    if max_columns < 1 or thumb < 8:
        raise ValueError(f"max_columns must be >= 1 and thumb >= 8, got {max_columns} and {thumb}")
    columns = max(1, min(max_columns, num_frames))
    rows = -(-num_frames // columns)
    tw, th = thumbnail_size(frame_hw, thumb)
    cell_w, cell_h = tw + 2 * BORDER, CAPTION_H + th + 2 * BORDER + BAR_H
    top = header_height()
    boxes = []
    for i in range(num_frames):
        r, c = divmod(i, columns)
        x0 = MARGIN + c * (cell_w + GAP) + BORDER
        y0 = top + r * (cell_h + ROW_GAP) + CAPTION_H + BORDER
        boxes.append((x0, y0, x0 + tw, y0 + th))
    width = max(grid_width(num_frames, frame_hw, max_columns, thumb), min_width)
    height = top + rows * cell_h + (rows - 1) * ROW_GAP + MARGIN
    return Layout(width, height, top, columns, tw, th, boxes)


# ---- per-thumbnail overlay ----------------------------------------------------------------------------


def _cell_index(length: int, cells: int) -> np.ndarray:
    """For each pixel along an axis of `length` pixels, the token cell (0..cells-1) it falls in."""
    return np.minimum((np.arange(length) * cells) // length, cells - 1)


def overlay_fates(thumb: np.ndarray, fate_grid: np.ndarray) -> np.ndarray:
    """Tint a thumbnail [h, w, 3] by the fate [gh, gw] of each token cell; returns a new uint8 image.

    KEPT cells keep their pixels (a 1-px white outline on their edges that face non-kept cells),
    MERGED cells are desaturated, tinted blue and hatched, DROPPED cells are darkened to ~1/5 brightness.
    """
    h, w = thumb.shape[:2]
    gh, gw = fate_grid.shape
    fate_px = fate_grid[_cell_index(h, gh)[:, None], _cell_index(w, gw)[None, :]]
    out = thumb.astype(np.float32)
    merged = fate_px == Fate.MERGED
    dropped = fate_px == Fate.DROPPED
    if merged.any():
        # desaturate, tint blue and hatch, so merged cells read as "absorbed" even over blue content
        luma = out[merged] @ np.array([0.299, 0.587, 0.114], np.float32)
        tinted = (1 - MERGED_ALPHA) * luma[:, None] + MERGED_ALPHA * np.array(MERGED_TINT, np.float32)
        yy, xx = np.nonzero(merged)
        hatch = ((xx + yy) % MERGED_HATCH == 0)[:, None]
        out[merged] = np.where(hatch, 0.5 * tinted + 0.5 * np.array(MERGED_HATCH_RGB, np.float32), tinted)
    out[dropped] = (1 - DROPPED_ALPHA) * out[dropped] + DROPPED_ALPHA * np.array(DROPPED_TINT, np.float32)

    kept = fate_px == Fate.KEPT
    if kept.any() and not kept.all():
        padded = np.pad(kept, 1, constant_values=True)  # no outline along the thumbnail's own edge
        faces_other = (
            ~padded[:-2, 1:-1] | ~padded[2:, 1:-1] | ~padded[1:-1, :-2] | ~padded[1:-1, 2:]
        )
        out[kept & faces_other] = KEPT_OUTLINE
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _cell_box(position: int, grid_hw: tuple[int, int], size_wh: tuple[int, int]) -> tuple[float, ...]:
    gh, gw = grid_hw
    w, h = size_wh
    r, c = divmod(int(position), gw)
    return c * w / gw, r * h / gh, (c + 1) * w / gw, (r + 1) * h / gh


def draw_size_dots(
    draw: ImageDraw.ImageDraw,
    origin_xy: tuple[int, int],
    size_wh: tuple[int, int],
    grid_hw: tuple[int, int],
    positions: np.ndarray,
    sizes: np.ndarray,
    max_size: int,
) -> None:
    """A dot per kept token with size > 1, centred in its cell; area ∝ size, the largest ~80% cell wide."""
    gh, gw = grid_hw
    cell = min(size_wh[0] / gw, size_wh[1] / gh)
    r_max = max(2.0, 0.42 * cell)
    for pos, size in zip(positions.tolist(), sizes.tolist(), strict=True):
        if size <= 1:
            continue
        x0, y0, x1, y1 = _cell_box(pos, grid_hw, size_wh)
        cx, cy = origin_xy[0] + (x0 + x1) / 2, origin_xy[1] + (y0 + y1) / 2
        r = max(1.5, r_max * np.sqrt(size / max_size))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=DOT_FILL, outline=DOT_EDGE, width=1)


# ---- header -------------------------------------------------------------------------------------------


def summary_line(tokens: VisualTokens, newlines: int = 0) -> str:
    """'6272 tokens → 627 kept (10.0%), 3100 merged, 2545 dropped, 5 segments'; with `newlines` layout tokens
    the model adds, the count the LLM gets, as the text report gives it: '628 into the LLM (627 kept
    (10.0%) + 1 newline), …'."""
    fate = np.asarray(tokens.fate).astype(np.int64)
    total = fate.size
    kept = len(tokens)
    merged = int((fate == Fate.MERGED).sum())
    dropped = int((fate == Fate.DROPPED).sum())
    pct = 100.0 * kept / total if total else 0.0
    nseg = len(tokens.segments)
    into = (f"{kept + newlines} into the LLM ({kept} kept ({pct:.1f}%) + {newlines} newline{'s' * (newlines != 1)})"
            if newlines else f"{kept} kept ({pct:.1f}%)")
    return (
        f"{total} tokens → {into}, {merged} merged, {dropped} dropped, "
        f"{nseg} segment{'s' if nseg != 1 else ''}"
    )


def _detail_line(tokens: VisualTokens) -> str:
    """'   ·   16 frames × 14×14 grid, 4410 left after temporal merge' (dimmed, after the summary)."""
    t, _ = tuple(tokens.origin.shape)
    gh, gw = tokens.grid_hw
    text = f"   ·   {t} frames × {gh}×{gw} grid"
    after = getattr(tokens, "after_temporal", None)
    if after is not None and len(tokens.segments) < t:
        text += f", {after} left after temporal merge"
    return text


def _dot_label(max_size: int) -> str:
    return f"originals a kept token stands for (area ∝ count, max {max_size})"


def _legend_swatch(fate: Fate, w: int, h: int) -> np.ndarray:
    """A neutral textured patch rendered with the real overlay, so the legend matches the frames."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = (150 + 40 * np.sin(xx / 3.0) * np.cos(yy / 4.0)).astype(np.uint8)
    patch = np.repeat(base[:, :, None], 3, axis=2)
    grid = np.full((1, 3), Fate.DROPPED, dtype=np.uint8)  # neighbours make the kept outline appear
    grid[0, 1] = fate
    wide = np.concatenate([patch, patch, patch], axis=1)
    return overlay_fates(wide, grid)[:, w : 2 * w]


def draw_header(
    canvas: Image.Image, tokens: VisualTokens, title: str, max_size: int, show_sizes: bool, newlines: int = 0
) -> None:
    draw = ImageDraw.Draw(canvas)
    x, y = MARGIN, MARGIN
    _text(draw, (x, y + TITLE_SIZE / 2), title or "Token reduction", _font(TITLE_SIZE, bold=True), TEXT)
    y += TITLE_SIZE + 10
    detail = _detail_line(tokens)
    line = summary_line(tokens, newlines)
    _text(draw, (x, y + TEXT_SIZE / 2), line, _font(TEXT_SIZE, bold=True), TEXT)
    _text(draw, (x + _text_w(line, _font(TEXT_SIZE, bold=True)), y + TEXT_SIZE / 2), detail,
          _font(TEXT_SIZE), TEXT_DIM)
    y += TEXT_SIZE + 14

    # legend: three fate swatches (+ the size dot)
    sw, sh = 30, 20
    font = _font(SMALL_SIZE)
    entries = [
        (Fate.KEPT, "kept (clear, outlined)"),
        (Fate.MERGED, "merged into another token"),
        (Fate.DROPPED, "dropped"),
    ]
    for fate, label in entries:
        canvas.paste(Image.fromarray(_legend_swatch(fate, sw, sh)), (x, y))
        draw.rectangle((x - 1, y - 1, x + sw, y + sh), outline=TEXT_DIM)
        _text(draw, (x + sw + 7, y + sh / 2), label, font, TEXT)
        x += sw + 7 + _text_w(label, font) + 22
    if show_sizes and max_size > 1:
        r = 6
        cx, cy = x + r, y + sh / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=DOT_FILL, outline=DOT_EDGE)
        label = _dot_label(max_size)
        _text(draw, (x + 2 * r + 7, y + sh / 2), label, font, TEXT)
    y += sh + 14

    draw_timeline(draw, tokens, MARGIN, y, canvas.width - 2 * MARGIN, 16)


def draw_timeline(draw: ImageDraw.ImageDraw, tokens: VisualTokens, x: int, y: int, w: int, h: int) -> None:
    """One slot per frame, coloured by segment, with the segment number where it fits."""
    t = tokens.num_frames
    font = _font(SMALL_SIZE - 1, bold=True)
    label = "segments"
    _text(draw, (x, y + h / 2), label, _font(SMALL_SIZE), TEXT_DIM)
    x0 = x + _text_w(label, _font(SMALL_SIZE)) + 10
    span = max(1, w - (x0 - x))
    for k, (start, end) in enumerate(tokens.segments):
        a = x0 + round(span * start / t)
        b = x0 + round(span * (end + 1) / t) - 2
        draw.rectangle((a, y, max(a, b), y + h - 1), fill=segment_colour(k))
        name = str(k)
        if _text_w(name, font) + 4 <= b - a:
            _text(draw, ((a + b) / 2, y + h / 2), name, font, BACKGROUND, anchor="mm")


# ---- frame cells --------------------------------------------------------------------------------------


def _segment_of_frames(segments: list[tuple[int, int]], t: int) -> np.ndarray:
    seg = np.empty(t, dtype=np.int64)
    for k, (start, end) in enumerate(segments):
        seg[start : end + 1] = k
    return seg


def _segment_label(k: int, start: int, end: int, room: int, font, cont: bool = False) -> str:
    """The longest of 'seg k: frames a–b' / 'seg k: a–b' / 'seg k' / 'k' that fits in `room` pixels."""
    span = f"frame {start}" if start == end else f"frames {start}–{end}"
    short = f"{start}" if start == end else f"{start}–{end}"
    for text in (f"seg {k}: {span}", f"seg {k}: {short}", f"seg {k}", f"{k}"):
        if cont:
            text = f"… {text} (cont.)"
        if _text_w(text, font) <= room:
            return text
    return ""


def draw_frame_cell(
    canvas: Image.Image,
    layout: Layout,
    i: int,
    thumb_img: np.ndarray,
    tokens: VisualTokens,
    seg_of: np.ndarray,
    timestamps: np.ndarray | None,
    kept_in_frame: int,
) -> None:
    """Caption, segment frame, bar and start marker of frame i; `thumb_img` is already overlaid."""
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = layout.thumb_boxes[i]
    k = int(seg_of[i])
    start, end = tokens.segments[k]
    colour = segment_colour(k)
    col = i % layout.columns
    continues = i + 1 < len(seg_of) and seg_of[i + 1] == k and col + 1 < layout.columns

    # caption: "#i · mm:ss.s" left, kept count right
    cy = y0 - BORDER - CAPTION_H / 2 - 1
    caption = f"#{i}" + (f"  {format_timestamp(timestamps[i])}" if timestamps is not None else "")
    _text(draw, (x0 - BORDER, cy), caption, _font(SMALL_SIZE + 1, bold=True), TEXT)
    right = f"{kept_in_frame} kept"
    small = _font(SMALL_SIZE)
    if _text_w(caption, _font(SMALL_SIZE + 1, bold=True)) + _text_w(right, small) + 8 <= layout.cell_w:
        _text(draw, (x1 + BORDER, cy), right, small, TEXT_DIM, anchor="rm")

    # segment frame + bar (the bar reaches across the gap while the segment goes on in this row)
    draw.rectangle((x0 - BORDER, y0 - BORDER, x1 + BORDER - 1, y1 + BORDER - 1), fill=colour)
    bar_top, bar_bottom = y1 + BORDER, y1 + BORDER + BAR_H - 1
    bar_right = x1 + BORDER - 1 + (GAP if continues else 0)
    draw.rectangle((x0 - BORDER, bar_top, bar_right, bar_bottom), fill=colour)
    canvas.paste(Image.fromarray(thumb_img), (x0, y0))

    if i == start:
        # start marker: a stripe in the gap to the left of the cell and a ▶ flag in the bar
        sx = x0 - BORDER - STRIPE_W - 4
        draw.rectangle((sx, y0 - BORDER - CAPTION_H + 2, sx + STRIPE_W - 1, bar_bottom), fill=colour)
        ty = (bar_top + bar_bottom) / 2
        draw.polygon([(x0, ty - 5), (x0, ty + 5), (x0 + 8, ty)], fill=BACKGROUND)


def draw_segment_label(
    draw: ImageDraw.ImageDraw, layout: Layout, i: int, tokens: VisualTokens, seg_of: np.ndarray
) -> None:
    """'seg k: frames a–b' in the bar of a segment's first frame ('… (cont.)' at the start of a later row).

    Drawn after all cells, because the label may run on along the bar over the following cells of its row.
    """
    k = int(seg_of[i])
    start, end = tokens.segments[k]
    col = i % layout.columns
    if i != start and col != 0:
        return
    x0, _, _, y1 = layout.thumb_boxes[i]
    run_end = min(end, i - col + layout.columns - 1)  # last frame of this segment in this row
    room = (run_end - i) * (layout.cell_w + GAP) + layout.cell_w - 8
    font = _font(SMALL_SIZE, bold=True)
    text_x = x0 + 12 if i == start else x0 + 2
    label = _segment_label(k, start, end, room - (text_x - x0), font, cont=i != start)
    if label:
        _text(draw, (text_x, y1 + BORDER + (BAR_H - 1) / 2), label, font, BACKGROUND)


# ---- entry point --------------------------------------------------------------------------------------


def _header_min_width(tokens: VisualTokens, title: str, max_size: int, show_sizes: bool, newlines: int = 0) -> int:
    """Width the header text needs; the image is widened to it when the frame grid is narrower."""
    line = summary_line(tokens, newlines)
    w = _text_w(line, _font(TEXT_SIZE, bold=True)) + _text_w(_detail_line(tokens), _font(TEXT_SIZE))
    w = max(w, _text_w(title or "Token reduction", _font(TITLE_SIZE, bold=True)))
    legend = sum(30 + 7 + _text_w(s, _font(SMALL_SIZE)) + 22
                 for s in ("kept (clear, outlined)", "merged into another token", "dropped"))
    if show_sizes and max_size > 1:
        legend += 19 + _text_w(_dot_label(max_size), _font(SMALL_SIZE))
    return 2 * MARGIN + max(w, legend)


def render_reduction(
    frames: np.ndarray,
    tokens: VisualTokens,
    timestamps: np.ndarray | None = None,
    title: str = "",
    path: str | Path | None = None,
    max_columns: int = 8,
    thumb: int = 224,
    show_sizes: bool = True,
    newlines: int = 0,
) -> Image.Image:
    """Draw the sampled `frames` [T, H, W, 3] uint8 with each token's fate, segments and a summary.

    timestamps: optional [T] seconds, shown as mm:ss.s next to each frame index.
    path: if given, the image is written there (parent directories are created).
    max_columns: thumbnails per row; thumb: longest thumbnail side in pixels (aspect is kept).
    show_sizes: draw a dot (area ∝ size) on kept tokens that stand for more than one original.
    newlines: layout (newline) tokens the model adds to the kept ones (the header then counts what the LLM gets).
    path: written in its suffix's format; a PNG also carries the header's count line as its Description.
    Returns the RGB image. Raises ValueError when frames and tokens do not describe the same video.
    """
    frames = _check_inputs(frames, tokens, timestamps)
    t = frames.shape[0]
    fate = np.asarray(tokens.fate).astype(np.uint8).reshape(t, *tokens.grid_hw)
    sizes = np.asarray(tokens.size).astype(np.int64)
    token_frame = np.asarray(tokens.frame).astype(np.int64)
    token_pos = np.asarray(tokens.position).astype(np.int64)
    max_size = int(sizes.max(initial=1))

    min_width = _header_min_width(tokens, title, max_size, show_sizes, newlines)
    layout = compute_layout(t, frames.shape[1:3], max_columns, thumb, min_width)
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw_header(canvas, tokens, title, max_size, show_sizes, newlines)

    seg_of = _segment_of_frames(tokens.segments, t)
    kept_per_frame = (fate == Fate.KEPT).reshape(t, -1).sum(axis=1)
    draw = ImageDraw.Draw(canvas)
    for i in range(t):
        thumb_img = overlay_fates(make_thumbnail(frames[i], thumb), fate[i])
        draw_frame_cell(canvas, layout, i, thumb_img, tokens, seg_of, timestamps, int(kept_per_frame[i]))
        if show_sizes and max_size > 1:
            mine = token_frame == i
            x0, y0, x1, y1 = layout.thumb_boxes[i]
            draw_size_dots(draw, (x0, y0), (x1 - x0, y1 - y0), tokens.grid_hw, token_pos[mine], sizes[mine],
                           max_size)
    for i in range(t):
        draw_segment_label(draw, layout, i, tokens, seg_of)

    if path is not None:
        save_image(canvas, path, title or "Token reduction", summary_line(tokens, newlines))
    return canvas


def save_image(canvas: Image.Image, path: str | Path, title: str = "", description: str = "") -> None:
    """Write `canvas` in the format its suffix names (.png, .jpg/.jpeg, .webp; parent folders created); a PNG
    carries the `title` and `description` drawn in it as text chunks (so tools and tests can read them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        info = PngImagePlugin.PngInfo()
        for key, text in (("Title", title), ("Description", description)):
            if text:
                info.add_text(key, text)
        canvas.save(path, format="PNG", pnginfo=info)
    else:
        canvas.save(path)  # Pillow picks JPEG / WEBP from the suffix


# ---- encoder-side reduction: which patches the vision tower recomputed ---------------------------------

RECOMPUTED_TINT = (255, 140, 0)
RECOMPUTED_ALPHA = 0.35
REUSED_DIM = 0.45  # reused patches keep this share of their brightness


def render_recomputed(frames: np.ndarray, recomputed: np.ndarray, grid_hw: tuple[int, int], title: str = "",
                      path: str | Path | None = None, max_columns: int = 8, thumb: int = 160) -> Image.Image:
    """Draw the sampled `frames` [T, H, W, 3] uint8 with the patches the vision tower recomputed tinted orange
    and the reused ones (features taken from the previous encode) dimmed; recomputed [T, H'·W'] bool on the
    patch grid `grid_hw` (stretched over the frame, as the processor resizes it). Returns the RGB image."""
    frames = np.asarray(frames)
    recomputed = np.asarray(recomputed, dtype=bool).reshape(len(frames), *grid_hw)
    tw, th = thumbnail_size(frames.shape[1:3], thumb)
    font, small = _font(15, bold=True), _font(12)
    pad, label_h, header_h = 8, 18, 56
    columns = min(max_columns, len(frames))
    rows = -(-len(frames) // columns)
    canvas = Image.new("RGB", (pad + columns * (tw + pad), header_h + rows * (th + label_h + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    share = recomputed.mean()
    _text(draw, (pad, 16), title or "vision tower: recomputed patches", font, TEXT)
    _text(draw, (pad, 38), f"orange: recomputed ({share:.0%} of all patches) · dimmed: reused from the previous "
                           f"encode · keyframes encoded whole", small, TEXT_DIM)
    for i, frame in enumerate(frames):
        image = make_thumbnail(frame, thumb).astype(np.float32)
        ys = _cell_index(image.shape[0], grid_hw[0])
        xs = _cell_index(image.shape[1], grid_hw[1])
        mask = recomputed[i][ys][:, xs][..., None]
        tinted = image * (1 - RECOMPUTED_ALPHA) + np.array(RECOMPUTED_TINT) * RECOMPUTED_ALPHA
        image = np.where(mask, tinted, image * REUSED_DIM).clip(0, 255).astype(np.uint8)
        r, c = divmod(i, columns)
        x, y = pad + c * (tw + pad), header_h + r * (th + label_h + pad)
        canvas.paste(Image.fromarray(image), (x, y))
        whole = recomputed[i].all()
        _text(draw, (x, y + th + label_h / 2 + 1), f"{i}: " + ("keyframe" if whole else f"{recomputed[i].mean():.0%}"),
              small, TEXT if whole else TEXT_DIM)
    if path is not None:
        save_image(canvas, path)
    return canvas
