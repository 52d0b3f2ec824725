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


def fed_layout(layout: Layout, drop, seed: int) -> Layout:
    """The layout as the model is fed it: only the modalities that ``drop`` keeps, with the points and scribbles the
    pipeline derives for ``seed`` (box centres; 20 random mask pixels), so a figure shows what the fusers saw.

    ``drop``: a :class:`~instdiff_lib.model.config.DropFlags` or its ``(boxes, points, scribbles, masks)`` tuple
    (True = dropped). An instance with nothing left is kept with no location (caption only)."""
    from instdiff_lib.layouts.layout import Instance, grounding_arrays

    no_box, no_point, no_scribble, no_mask = drop.as_tuple() if hasattr(drop, "as_tuple") else tuple(drop)
    arrays = grounding_arrays(layout, seed, seg_size=8)  # segs unused here: the smallest size
    out = []
    for i, inst in enumerate(layout.instances):
        scribble = arrays["scribbles"][i].reshape(-1, 2)
        out.append(Instance(inst.caption, box=None if no_box else inst.box,
                            point=None if no_point else tuple(arrays["points"][i]),
                            scribble=None if (no_scribble or not scribble.any()) else scribble,
                            mask=None if no_mask else inst.mask, category=inst.category))
        if no_box:
            out[-1].box = None  # Instance() derives a box from a mask; a dropped box stays dropped
    return Layout(caption=layout.caption, width=layout.width, height=layout.height, instances=out)


def _upscaled(image: Image.Image, size: int) -> Image.Image:
    """``image`` as a size x size RGB cell (nearest when enlarging small images, so pixels stay visible)."""
    image = image.convert("RGB")
    return image.resize((size, size), Image.Resampling.NEAREST if image.width < size else Image.Resampling.BICUBIC)


def draw_detections(image: Image.Image, detections: list[dict], size: int = 256, min_score: float = 0.25,
                    names: dict[int, str] | None = None) -> Image.Image:
    """Detector results (COCO result dicts: ``bbox`` [x, y, w, h] pixels of ``image``, ``score``, ``category_id``,
    optional RLE ``segmentation``) with ``score >= min_score`` drawn over ``image`` at size x size: mask fill, box,
    and a "name score" tag, one palette colour per detection, highest score first."""
    from pycocotools import mask as mask_utils

    scale = size / image.width
    canvas = _upscaled(image, size).convert("RGBA")
    shown = sorted((d for d in detections if d["score"] >= min_score), key=lambda d: -d["score"])
    for k, d in enumerate(shown):
        if d.get("segmentation"):
            m = mask_utils.decode(d["segmentation"]).astype(np.uint8) * round(255 * MASK_ALPHA)
            fill = Image.new("RGBA", (size, size), PALETTE[k % len(PALETTE)] + (0,))
            fill.putalpha(Image.fromarray(m).resize((size, size), Image.Resampling.NEAREST))
            canvas = Image.alpha_composite(canvas, fill)
    out = canvas.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = _font(max(10, size // 20))
    for k, d in enumerate(shown):
        x, y, w, h = (v * scale for v in d["bbox"])
        colour = PALETTE[k % len(PALETTE)]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        name = (names or {}).get(d["category_id"], str(d["category_id"]))
        _label(draw, (x + 2, y + 2), f"{name} {d['score']:.2f}", colour, font)
    return out


def titled_grid(images: list[Image.Image], titles: list[str], ncols: int, size: int = 192) -> Image.Image:
    """:func:`image_grid` of size x size cells, each with its title written in a band above it."""
    if len(titles) != len(images):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    font = _font(max(10, size // 16))
    band = max(14, size // 10) * max([1] + [t.count("\n") + 1 for t in titles])
    cells = []
    for im, title in zip(images, titles):
        cell = Image.new("RGB", (size, size + band), "white")
        cell.paste(_upscaled(im, size) if im.size != (size, size) else im.convert("RGB"), (0, band))
        ImageDraw.Draw(cell).multiline_text((3, 2), title, fill=(0, 0, 0), font=font)
        cells.append(cell)
    return image_grid(cells, ncols)
