"""The drawing state of the playground: instances drawn, selected, moved, resized and deleted with a pointer.

No widgets here: :class:`Editor` takes pointer events (``press``, ``drag``, ``release``) in normalised canvas
coordinates (x = column / width, y = row / height, origin top-left, as :mod:`instdiff_lib.layouts`) and keeps a
list of :class:`~instdiff_lib.layouts.Instance`. The widget front end (:mod:`.app`) only forwards mouse events
and shows :meth:`Editor.render`. Every coordinate is snapped to the layout frame's pixel grid, so what is drawn
is exactly what the saved official JSON holds (integer pixels).

Tools: ``select`` (click an instance to select it; drag it to move it; drag a corner of its box to resize it),
``box`` (drag), ``point`` (click), ``scribble`` (free-hand stroke), ``polygon`` (click the vertices; click the
first vertex again or call :meth:`Editor.finish` to close it into a mask) and ``paint`` (brush strokes into a
mask: into the selected instance's mask, or a new instance). Refused edits (a box of zero area, a 31st instance)
leave the instances unchanged and set :attr:`Editor.message`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from instdiff_lib.layouts.derive import box_from_mask
from instdiff_lib.layouts.layout import N_SLOTS, Instance, Layout
from instdiff_lib.viz import PALETTE, draw_layout

TOOLS = ("select", "box", "point", "scribble", "polygon", "paint")
HANDLE = 10 / 512  # pick distance for points, scribbles, vertices and box corners (canvas fraction)


@dataclass
class Drag:
    """A pointer drag in progress."""

    kind: str  # "box", "scribble", "paint", "move", "resize"
    start: tuple[float, float]
    current: tuple[float, float]
    original: Instance | None = None  # the instance as it was when a move/resize began
    corner: int = 0  # resize: which corner of the box is dragged (0 tl, 1 tr, 2 br, 3 bl)
    points: list | None = None  # scribble vertices so far


class Editor:
    """Instances on a ``width`` x ``height`` frame, edited by pointer events (see the module docstring)."""

    def __init__(self, width: int = 64, height: int = 64, brush: float = 0.06):
        if width <= 0 or height <= 0:
            raise ValueError(f"the frame must have a positive size, got {width}x{height}")
        self.width, self.height = int(width), int(height)
        self.brush = brush  # paint brush radius, as a fraction of the frame width
        self.instances: list[Instance] = []
        self.selected: int | None = None
        self.tool = "box"
        self.next_caption = ""  # the caption a newly drawn instance gets
        self.message = ""  # why the last edit was refused ("" when it was not)
        self.polygon: list[tuple[float, float]] = []  # vertices of the polygon being drawn
        self.drag: Drag | None = None

    # ---- the layout ------------------------------------------------------------------------------------
    def load(self, layout: Layout) -> None:
        """Replace the instances by a copy of ``layout``'s (its frame becomes the editor's)."""
        self.width, self.height = layout.width, layout.height
        self.instances = [copy.deepcopy(i) for i in layout.instances]
        self.selected, self.drag, self.polygon, self.message = None, None, [], ""

    def clear(self) -> None:
        """A blank canvas (the frame stays)."""
        self.instances, self.selected, self.drag, self.polygon, self.message = [], None, None, [], ""

    def layout(self, caption: str) -> Layout:
        """The instances as a :class:`Layout` (not validated: :meth:`Layout.validate` names what is wrong)."""
        return Layout(caption=caption, width=self.width, height=self.height,
                      instances=[copy.deepcopy(i) for i in self.instances])

    def set_tool(self, tool: str) -> None:
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}; the tools are {TOOLS}")
        self.tool, self.drag, self.polygon = tool, None, []

    def set_caption(self, caption: str) -> None:
        """The caption of the selected instance and of the next one drawn."""
        self.next_caption = caption
        if self.selected is not None:
            self.instances[self.selected].caption = caption

    def select(self, index: int | None) -> None:
        if index is not None and not 0 <= index < len(self.instances):
            raise IndexError(f"no instance {index} (there are {len(self.instances)})")
        self.selected = index
        if index is not None:
            self.next_caption = self.instances[index].caption

    def delete(self) -> bool:
        """Delete the selected instance; False (and a message) when none is selected."""
        if self.selected is None:
            self.message = "select an instance first (tool 'select', then click it)"
            return False
        del self.instances[self.selected]
        self.selected, self.message = None, ""
        return True

    # ---- geometry helpers ------------------------------------------------------------------------------
    def snap(self, x: float, y: float) -> tuple[float, float]:
        """Clamp to the canvas and round to the frame's pixel grid."""
        x = min(max(float(x), 0.0), 1.0)
        y = min(max(float(y), 0.0), 1.0)
        return round(x * self.width) / self.width, round(y * self.height) / self.height

    def _room(self) -> bool:
        if len(self.instances) >= N_SLOTS:
            self.message = (f"the model has {N_SLOTS} instance slots and the layout already has {len(self.instances)} "
                            "instances: delete one before drawing another")
            return False
        return True

    def _add(self, inst: Instance) -> None:
        self.instances.append(inst)
        self.selected = len(self.instances) - 1
        self.message = ""

    def _box(self, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float, float, float] | None:
        """The box spanned by two snapped corners, or None (and a message) when it has no area."""
        (x0, y0), (x1, y1) = self.snap(*a), self.snap(*b)
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            w, h = round((box[2] - box[0]) * self.width), round((box[3] - box[1]) * self.height)
            self.message = (f"a box needs an area: this one is {w} x {h} pixels of the {self.width}x{self.height} "
                            "frame; drag from one corner to the opposite one")
            return None
        return box

    def hit(self, x: float, y: float) -> int | None:
        """The topmost (last drawn) instance under (x, y), or None."""
        for i in range(len(self.instances) - 1, -1, -1):
            inst = self.instances[i]
            if inst.mask is not None and inst.mask.any():
                r = min(int(y * self.height), self.height - 1)
                c = min(int(x * self.width), self.width - 1)
                if inst.mask[r, c]:
                    return i
            if inst.box is not None:
                x0, y0, x1, y1 = inst.box
                if x0 <= x <= x1 and y0 <= y <= y1:
                    return i
            if inst.point is not None and np.hypot(inst.point[0] - x, inst.point[1] - y) <= HANDLE:
                return i
            if inst.scribble is not None and (np.hypot(*(inst.scribble - (x, y)).T) <= HANDLE).any():
                return i
        return None

    def _corner(self, x: float, y: float) -> int | None:
        """The corner of the selected instance's box under (x, y), or None."""
        if self.selected is None or self.instances[self.selected].box is None:
            return None
        x0, y0, x1, y1 = self.instances[self.selected].box
        for k, (cx, cy) in enumerate(((x0, y0), (x1, y0), (x1, y1), (x0, y1))):
            if abs(cx - x) <= HANDLE and abs(cy - y) <= HANDLE:
                return k
        return None

    # ---- pointer events --------------------------------------------------------------------------------
    def press(self, x: float, y: float) -> None:
        self.message = ""
        p = self.snap(x, y)
        if self.tool == "select":
            corner = self._corner(x, y)
            if corner is not None:
                self.drag = Drag("resize", p, p, copy.deepcopy(self.instances[self.selected]), corner)
                return
            hit = self.hit(x, y)
            self.select(hit)
            if hit is not None:
                self.drag = Drag("move", p, p, copy.deepcopy(self.instances[hit]))
        elif self.tool == "box":
            if self._room():
                self.drag = Drag("box", p, p)
        elif self.tool == "scribble":
            if self._room():
                self.drag = Drag("scribble", p, p, points=[p])
        elif self.tool == "paint":
            target = self.selected if self.selected is not None and self.instances[self.selected].mask is not None \
                else None
            if target is None:
                if not self._room():
                    return
                self._add(Instance(self.next_caption, mask=np.zeros((self.height, self.width), bool)))
            self.drag = Drag("paint", p, p)
            self._paint(p, p)
        elif self.tool == "point":
            pass  # placed on release (a click)
        elif self.tool == "polygon":
            self._polygon_vertex(x, y)

    def drag_to(self, x: float, y: float) -> None:
        d = self.drag
        if d is None:
            return
        p = self.snap(x, y)
        if d.kind == "scribble":
            if p != d.points[-1]:
                d.points.append(p)
        elif d.kind == "paint":
            self._paint(d.current, p)
        elif d.kind == "move":
            self._move(d, p)
        elif d.kind == "resize":
            self._resize(d, p)
        d.current = p

    def release(self, x: float, y: float) -> None:
        self.drag_to(x, y)
        d, self.drag = self.drag, None
        if self.tool == "point":
            if self._room():
                self._add(Instance(self.next_caption, point=self.snap(x, y)))
            return
        if d is None:
            return
        if d.kind == "box":
            box = self._box(d.start, d.current)
            if box is not None:
                self._add(Instance(self.next_caption, box=box))
        elif d.kind == "scribble":
            self._add(Instance(self.next_caption, scribble=np.array(d.points, dtype=np.float64)))
        elif d.kind == "paint":
            inst = self.instances[self.selected]
            if not inst.mask.any():
                del self.instances[self.selected]
                self.selected = None
                self.message = "the painted mask is empty"
            else:
                inst.box = box_from_mask(inst.mask)

    def finish(self) -> bool:
        """Close the polygon being drawn into a mask instance (at least 3 vertices)."""
        if len(self.polygon) < 3:
            self.message = f"a polygon needs at least 3 vertices, it has {len(self.polygon)}"
            return False
        img = Image.new("L", (self.width, self.height), 0)
        ImageDraw.Draw(img).polygon([(x * self.width, y * self.height) for x, y in self.polygon], fill=1, outline=1)
        mask = np.asarray(img, dtype=bool)
        self.polygon = []
        if not mask.any():
            self.message = "the polygon covers no pixel of the frame"
            return False
        if not self._room():
            return False
        self._add(Instance(self.next_caption, mask=mask))
        return True

    def _polygon_vertex(self, x: float, y: float) -> None:
        if len(self.polygon) >= 3 and np.hypot(self.polygon[0][0] - x, self.polygon[0][1] - y) <= HANDLE:
            self.finish()
        else:
            self.polygon.append(self.snap(x, y))

    def _paint(self, a: tuple[float, float], b: tuple[float, float]) -> None:
        inst = self.instances[self.selected]
        img = Image.fromarray(inst.mask.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        r = max(0.5, self.brush * self.width)
        pa = (a[0] * self.width, a[1] * self.height)
        pb = (b[0] * self.width, b[1] * self.height)
        draw.line([pa, pb], fill=1, width=max(1, round(2 * r)))
        for px, py in (pa, pb):
            draw.ellipse([px - r, py - r, px + r, py + r], fill=1)
        inst.mask = np.asarray(img, dtype=bool)

    def _move(self, d: Drag, p: tuple[float, float]) -> None:
        """Translate the original instance by the drag, in whole frame pixels, kept inside the canvas."""
        o = d.original
        dx, dy = p[0] - d.start[0], p[1] - d.start[1]
        lo_x, lo_y, hi_x, hi_y = _extent(o)
        dx = min(max(dx, -lo_x), 1 - hi_x)
        dy = min(max(dy, -lo_y), 1 - hi_y)
        ix, iy = round(dx * self.width), round(dy * self.height)
        dx, dy = ix / self.width, iy / self.height
        inst = copy.deepcopy(o)
        if inst.box is not None:
            x0, y0, x1, y1 = inst.box
            inst.box = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
        if inst.point is not None:
            inst.point = (inst.point[0] + dx, inst.point[1] + dy)
        if inst.scribble is not None:
            inst.scribble = inst.scribble + (dx, dy)
        if inst.mask is not None:
            inst.mask = _shift(inst.mask, ix, iy)
        self.instances[self.selected] = inst

    def _resize(self, d: Drag, p: tuple[float, float]) -> None:
        """Move one corner of the original box; points, scribbles and masks follow the box's affine map."""
        o = d.original
        x0, y0, x1, y1 = o.box
        fixed = ((x1, y1), (x0, y1), (x0, y0), (x1, y0))[d.corner]
        box = self._box(fixed, p)
        if box is None:
            return  # keeps the last valid size (the message says why)
        sx, sy = (box[2] - box[0]) / (x1 - x0), (box[3] - box[1]) / (y1 - y0)

        def fwd(xy):
            xy = np.asarray(xy, dtype=np.float64)
            return (xy - (x0, y0)) * (sx, sy) + (box[0], box[1])

        inst = copy.deepcopy(o)
        inst.box = box
        if inst.point is not None:
            inst.point = tuple(float(v) for v in fwd(inst.point))
        if inst.scribble is not None:
            inst.scribble = np.clip(fwd(inst.scribble), 0.0, 1.0)
        if inst.mask is not None:
            inst.mask = _remap_mask(inst.mask, o.box, box)
        self.instances[self.selected] = inst

    # ---- drawing ---------------------------------------------------------------------------------------
    def render(self, caption: str = "", size: int = 512, image: Image.Image | None = None) -> Image.Image:
        """The instances drawn as the saved ``__layout.png`` draws them, plus the selection and the stroke in
        progress; ``image`` (e.g. the last result) goes underneath."""
        shown = self.layout(caption)
        for k, inst in enumerate(shown.instances):
            if not inst.caption.strip():
                inst.caption = f"#{k} (no caption)"
        base = None if image is None else image.convert("RGB").resize((size, size))
        out = draw_layout(shown, image=base, size=size)
        draw = ImageDraw.Draw(out)
        px = lambda x, y: (x * size, y * size)  # noqa: E731
        if self.selected is not None and self.selected < len(self.instances):
            x0, y0, x1, y1 = _extent(self.instances[self.selected])
            draw.rectangle([*px(x0, y0), *px(x1, y1)], outline=(0, 0, 0), width=1)
            if self.instances[self.selected].box is not None:
                bx0, by0, bx1, by1 = self.instances[self.selected].box
                for cx, cy in ((bx0, by0), (bx1, by0), (bx1, by1), (bx0, by1)):
                    hx, hy = px(cx, cy)
                    draw.rectangle([hx - 4, hy - 4, hx + 4, hy + 4], fill=(255, 255, 255), outline=(0, 0, 0))
        colour = PALETTE[len(self.instances) % len(PALETTE)]
        d = self.drag
        if d is not None and d.kind == "box":
            (ax, ay), (bx, by) = px(*d.start), px(*d.current)
            draw.rectangle([min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)], outline=colour, width=2)
        if d is not None and d.kind == "scribble" and len(d.points) > 1:
            draw.line([px(*q) for q in d.points], fill=colour, width=3)
        if self.polygon:
            pts = [px(*q) for q in self.polygon]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for hx, hy in pts:
                draw.ellipse([hx - 4, hy - 4, hx + 4, hy + 4], fill=colour)
        return out


def _extent(inst: Instance) -> tuple[float, float, float, float]:
    """The normalised bounding box of everything an instance holds (box, point, scribble, mask)."""
    xs, ys = [], []
    if inst.box is not None:
        xs += [inst.box[0], inst.box[2]]
        ys += [inst.box[1], inst.box[3]]
    if inst.point is not None:
        xs.append(inst.point[0])
        ys.append(inst.point[1])
    if inst.scribble is not None:
        xs += list(inst.scribble[:, 0])
        ys += list(inst.scribble[:, 1])
    if inst.mask is not None and inst.mask.any():
        mb = box_from_mask(inst.mask)
        xs += [mb[0], mb[2]]
        ys += [mb[1], mb[3]]
    return min(xs), min(ys), max(xs), max(ys)


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``mask`` moved by (dx, dy) pixels, zero-filled (nothing wraps around)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def _remap_mask(mask: np.ndarray, old: tuple, new: tuple) -> np.ndarray:
    """The part of ``mask`` inside box ``old`` stretched (nearest) onto box ``new`` (normalised xyxy)."""
    h, w = mask.shape
    ox0, oy0, ox1, oy1 = (round(old[0] * w), round(old[1] * h), round(old[2] * w), round(old[3] * h))
    nx0, ny0, nx1, ny1 = (round(new[0] * w), round(new[1] * h), round(new[2] * w), round(new[3] * h))
    out = np.zeros_like(mask)
    crop = mask[oy0:oy1, ox0:ox1]
    if crop.size == 0 or nx1 <= nx0 or ny1 <= ny0:
        return mask.copy()
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((nx1 - nx0, ny1 - ny0), Image.Resampling.NEAREST)
    out[ny0:ny1, nx0:nx1] = np.asarray(resized) > 127
    # pixels of the mask outside the old box (none for a box derived from the mask) stay where they were
    outside = mask.copy()
    outside[oy0:oy1, ox0:ox1] = False
    return out | outside
