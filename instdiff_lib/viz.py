"""Drawing layouts over images, and image grids.

Plays the role of the official `{start}_boxes.png` (boxes and captions on a white canvas), extended to
all four location types. Normalised layout coordinates (x = column, y = row, origin top-left) are
scaled by the image size: pixel x = x * image width, pixel y = y * image height.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from instdiff_lib.layouts.layout import Layout

# one colour per instance (cycled): high-contrast, colour-blind-friendly-ish (Tableau 10 + extras)
PALETTE: list[tuple[int, int, int]] = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (0, 0, 128), (128, 0, 0), (0, 128, 128), (128, 128, 0), (255, 215, 0),
]
MASK_ALPHA = 0.4  # opacity of mask fills


def _font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled default font at `size` px (a fixed-size bitmap font on Pillow builds without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, font) -> None:
    """Caption text in white on a filled `colour` tag whose top-left corner is at xy."""
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=colour)
    draw.text(xy, text, fill=(255, 255, 255), font=font)


def draw_layout(layout: Layout, image: Image.Image | None = None, size: int = 512) -> Image.Image:
    """The layout's inputs drawn over `image` (or a white size x size canvas); returns a new RGB image.

    Per instance, in its palette colour: mask as a semi-transparent fill, box as a rectangle with the
    caption in a tag at its top-left corner, scribble as a polyline with dots, point as a filled dot
    (instances with no box get their caption tag next to the point / first scribble point).
    The global caption is written in a band along the bottom.
    """
    base = Image.new("RGB", (size, size), "white") if image is None else image.convert("RGB")
    width, height = base.size
    scale = max(width, height) / 512
    font = _font(max(10, round(14 * scale)))
    line = max(2, round(3 * scale))
    dot = max(3, round(6 * scale))

    # masks first, composited on an RGBA layer, so outlines and text stay crisp on top
    canvas = base.convert("RGBA")
    for i, inst in enumerate(layout.instances):
        if inst.mask is None or not inst.mask.any():
            continue
        alpha = Image.fromarray(inst.mask.astype(np.uint8) * round(255 * MASK_ALPHA))
        alpha = alpha.resize((width, height), Image.Resampling.NEAREST)
        fill = Image.new("RGBA", (width, height), PALETTE[i % len(PALETTE)] + (0,))
        fill.putalpha(alpha)
        canvas = Image.alpha_composite(canvas, fill)
    out = canvas.convert("RGB")
    draw = ImageDraw.Draw(out)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (x * width, y * height)

    for i, inst in enumerate(layout.instances):
        colour = PALETTE[i % len(PALETTE)]
        anchor = None  # where the caption tag goes
        if inst.scribble is not None:
            pts = [to_px(x, y) for x, y in inst.scribble]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=line, joint="curve")
            for px, py in pts:
                draw.ellipse([px - dot / 2, py - dot / 2, px + dot / 2, py + dot / 2], fill=colour)
            anchor = (pts[0][0] + dot, pts[0][1] + dot)
        if inst.point is not None:
            px, py = to_px(*inst.point)
            draw.ellipse([px - dot, py - dot, px + dot, py + dot], fill=colour, outline="white", width=max(1, line // 2))
            anchor = (px + dot + 2, py - dot)
        if inst.box is not None:
            x0, y0 = to_px(inst.box[0], inst.box[1])
            x1, y1 = to_px(inst.box[2], inst.box[3])
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
            anchor = (x0 + line + 1, y0 + line + 1)
        if anchor is not None:
            _label(draw, anchor, inst.caption, colour, font)

    if layout.caption:
        char_width = max(1.0, draw.textlength("n", font=font))  # average-ish glyph width
        chars_per_line = max(10, int((width - 2 * line - 4) / char_width))
        text = "\n".join(textwrap.wrap(layout.caption, chars_per_line))
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
        band = bottom - top + 2 * line + 4
        draw.rectangle([0, height - band, width, height], fill=(255, 255, 255))
        draw.multiline_text((line + 2, height - band + line + 2 - top), text, fill=(0, 0, 0), font=font)
    return out


def image_grid(images: list[Image.Image], ncols: int) -> Image.Image:
    """Images pasted row by row into a grid with `ncols` columns on a white background.

    Every cell is as large as the largest image; smaller images sit at their cell's top-left corner.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (ncols * cell_w, nrows * cell_h), "white")
    for k, im in enumerate(images):
        row, col = divmod(k, ncols)
        grid.paste(im.convert("RGB"), (col * cell_w, row * cell_h))
    return grid
