"""Instance layouts: the official demo JSON <-> `Layout` / `Instance` <-> position-net input arrays.

Spec §3.2 (demo JSON format) and §3.3 (preprocessing); mirrors the layout handling of the official
`inference.py` / `utils/input.py`, minus its bugs (spec §6.2 items 5-8): user masks are kept (not
zeroed), scribbles are accepted flat or as pairs and resampled per instance, a single instance keeps
its instance axis, a partial set of `point` keys cannot misalign, and more than 30 instances is an
explicit error (or an explicit, warned truncation).

Conventions used throughout:
- coordinates inside `Instance` are NORMALISED to [0, 1] by the layout frame: x = column / width,
  y = row / height, origin at the top-left corner; boxes are (x0, y0, x1, y1);
- the JSON holds PIXEL coordinates of the `width` x `height` frame: bbox [x, y, w, h], point [x, y],
  scribble [x1, y1, ..., xk, yk]; a non-square frame is squashed into the square output, as in the
  official code;
- masks are bool arrays indexed [row, col] with shape (height, width) of the layout frame.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from instdiff_lib.layouts import derive

N_SLOTS = 30  # instance slots of the position net (official max_objs)
N_SCRIBBLE_POINTS = 20  # points per scribble
N_MASK_POINTS = 256  # points per mask ("polygons": 128 boundary + 128 interior)
TOLERANCE = 1e-6  # how far (as a fraction of the canvas) a coordinate may stray outside [0, 1]

Box = tuple[float, float, float, float]


class LayoutError(ValueError):
    """A layout that cannot be used, with a message naming the problem and the instance."""


# -----------------------------------------------------------------------------
# box conversions


def box_xywh_to_xyxy_norm(box: tuple[float, float, float, float] | list[float], width: int, height: int) -> Box:
    """Pixel [x, y, w, h] in a width x height frame -> normalised (x0, y0, x1, y1)."""
    x, y, w, h = (float(v) for v in box)
    return (x / width, y / height, (x + w) / width, (y + h) / height)


def box_xyxy_norm_to_xywh(box: Box, width: int, height: int) -> tuple[float, float, float, float]:
    """Normalised (x0, y0, x1, y1) -> pixel [x, y, w, h] in a width x height frame."""
    x0, y0, x1, y1 = box
    return (x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height)


def _px(v: float) -> int | float:
    """A pixel value for JSON and messages: rounded to 1e-6, written as an int when integral."""
    r = round(float(v), 6)
    return int(r) if r.is_integer() else r


def _px_list(values: Any) -> list[int | float]:
    return [_px(v) for v in values]


# -----------------------------------------------------------------------------
# masks (COCO RLE / polygons)


def _rle_string_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the inverse of pycocotools' string encoding).

    pycocotools' own decoder does not check its input, so a corrupt string silently yields a wrong mask;
    we parse the runs first to check they cover the mask exactly. Each run is a little-endian base-32
    varint of 5-bit groups stored as chr(48 + group), bit 0x20 = "more groups follow", sign-extended from
    bit 0x10 of the last group; from the third run on, the value is a delta to the run two places back.
    """
    runs: list[int] = []
    p = 0
    while p < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("RLE counts string ends in the middle of a run")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {counts[p]!r} in RLE counts string")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p, shift = p + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift  # negative delta
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _decode_rle(rle: dict) -> np.ndarray:
    """Compressed COCO RLE dict -> (H, W) bool mask."""
    with warnings.catch_warnings():  # pycocotools 2.0.11 trips a numpy 2 DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode([rle])[:, :, 0].astype(bool)


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> COCO RLE dict {"size": [H, W], "counts": str} (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(obj: Any, width: int, height: int) -> np.ndarray | None:
    """A JSON mask -> (H, W) bool array, or None for `[]` / None.

    Accepts a compressed RLE {"size": [H, W], "counts": str}, an uncompressed RLE (counts as a list of
    run lengths) and COCO polygons [[x1, y1, x2, y2, ...], ...] in pixels of the width x height frame.
    Raises ValueError (the caller adds the instance) on anything else.
    """
    if obj is None or (isinstance(obj, list) and len(obj) == 0):
        return None
    if isinstance(obj, dict):
        if "counts" not in obj or "size" not in obj:
            raise ValueError("an RLE mask needs 'size' and 'counts'")
        size = obj["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size)):
            raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
        h, w = int(size[0]), int(size[1])
        counts = obj["counts"]
        if isinstance(counts, str):
            runs = _rle_string_counts(counts)
            if min(runs, default=0) < 0 or sum(runs) != h * w:
                raise ValueError(f"corrupt RLE counts string: its runs do not cover height*width = {h * w} pixels")
            rle = {"size": [h, w], "counts": counts.encode("ascii")}
        elif isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts):
            if sum(counts) != h * w:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, not height*width = {h * w}")
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        else:
            raise ValueError("RLE 'counts' must be a string or a list of non-negative ints")
        try:
            return _decode_rle(rle)
        except Exception as e:  # pycocotools raises assorted errors on corrupt strings
            raise ValueError(f"cannot decode RLE mask ({e})") from None
    if isinstance(obj, list) and all(isinstance(p, list) for p in obj):
        for j, poly in enumerate(obj):
            if len(poly) < 6 or len(poly) % 2 or not all(_is_number(v) for v in poly):
                raise ValueError(f"polygon {j} must be a flat list of at least 3 (x, y) pixel pairs")
        rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in obj], height, width))
        return _decode_rle(rle)
    raise ValueError("mask must be a COCO RLE dict, a list of polygons, or []")


# -----------------------------------------------------------------------------
# dataclasses


@dataclass(eq=False)  # numpy fields make the generated __eq__ meaningless; compare fields explicitly
class Instance:
    """One instance: a caption plus any of box / point / scribble / mask (normalised, see module doc).

    If a mask is given without a box, the box is set to the mask's tight box on construction.
    """

    caption: str
    box: Box | None = None  # normalised (x0, y0, x1, y1)
    point: tuple[float, float] | None = None  # normalised (x, y)
    scribble: np.ndarray | None = None  # (k, 2) normalised (x, y) rows, k >= 1, as drawn by the user
    mask: np.ndarray | None = None  # (height, width) bool, in the layout frame
    category: str | None = None  # informational (official `category_name`)

    def __post_init__(self) -> None:
        if self.box is not None:
            self.box = tuple(float(v) for v in self.box)
        if self.point is not None:
            self.point = tuple(float(v) for v in self.point)
        if self.scribble is not None:
            self.scribble = np.asarray(self.scribble, dtype=np.float64)
        if self.mask is not None:
            self.mask = np.asarray(self.mask).astype(bool)
            if self.box is None and self.mask.ndim == 2:
                self.box = derive.box_from_mask(self.mask)  # None for an empty mask


@dataclass(eq=False)
class Layout:
    """A global caption and up to 30 instances in a width x height pixel frame."""

    caption: str
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)

    # --- JSON in/out -----------------------------------------------------------

    @classmethod
    def from_json(cls, src: str | os.PathLike | dict, truncate: bool = False) -> Layout:
        """Read a layout in the official demo format from a path, a JSON string or a dict, and validate it.

        A str that starts with "{" or "[" is parsed as JSON text, any other str is a path. Errors are
        `LayoutError`s; for a file, the message starts with its path.
        """
        path = None
        if isinstance(src, dict):
            data = src
        elif isinstance(src, (str, os.PathLike)):
            if isinstance(src, str) and src.lstrip()[:1] in ("{", "["):
                text = src
            else:
                path = Path(src)
                try:
                    text = path.read_text()
                except OSError as e:
                    raise LayoutError(f"{path}: cannot read layout file ({e.strerror})") from None
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                where = f"{path}: " if path else ""
                raise LayoutError(f"{where}not valid JSON ({e})") from None
        else:
            raise LayoutError(f"expected a path, a JSON string or a dict, got {type(src).__name__}")
        try:
            return _layout_from_dict(data).validate(truncate=truncate)
        except LayoutError as e:
            if path is None:
                raise
            raise LayoutError(f"{path}: {e}") from None

    def to_json(self) -> dict:
        """The layout as an official-format dict (pixel boxes/points/scribbles, RLE masks with str counts)."""
        annos = []
        for inst in self.instances:
            anno: dict[str, Any] = {"caption": inst.caption}
            if inst.box is not None:
                anno["bbox"] = _px_list(box_xyxy_norm_to_xywh(inst.box, self.width, self.height))
            if inst.point is not None:
                anno["point"] = _px_list((inst.point[0] * self.width, inst.point[1] * self.height))
            if inst.scribble is not None:
                pixels = inst.scribble * np.array([self.width, self.height])
                anno["scribble"] = _px_list(pixels.reshape(-1))
            if inst.mask is not None:
                anno["mask"] = encode_mask(inst.mask)
            if inst.category is not None:
                anno["category_name"] = inst.category
            annos.append(anno)
        return {"caption": self.caption, "width": self.width, "height": self.height, "annos": annos}

    # --- validation ------------------------------------------------------------

    def validate(self, max_instances: int = N_SLOTS, truncate: bool = False) -> Layout:
        """Check the layout; return it (or, with truncate=True, a copy with the first `max_instances`).

        Raises LayoutError naming the instance (index and caption) and the problem.
        """
        for name in ("width", "height"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise LayoutError(f"layout {name} must be a positive integer, got {v!r}")
        if not isinstance(self.caption, str):
            raise LayoutError(f"global caption must be a string, got {type(self.caption).__name__}")
        layout = self
        n = len(self.instances)
        if n > max_instances:
            if not truncate:
                raise LayoutError(
                    f"layout has {n} instances but the model has only {max_instances} instance slots; "
                    f"pass truncate=True (CLI: --truncate) to keep the first {max_instances}"
                )
            warnings.warn(f"layout has {n} instances; keeping the first {max_instances} (truncate=True)")
            layout = replace(self, instances=list(self.instances[:max_instances]))
        for i, inst in enumerate(layout.instances):
            _validate_instance(inst, i, layout.width, layout.height)
        return layout


# -----------------------------------------------------------------------------
# parsing and validation helpers


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _numbers(value: Any, n: int | None, what: str, where: str) -> list[float]:
    """`value` as a list of floats (of length n, if given), or a LayoutError naming `what` and `where`."""
    if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
        raise LayoutError(f"{where}: '{what}' must be a list of numbers, got {value!r}")
    if n is not None and len(value) != n:
        raise LayoutError(f"{where}: '{what}' must have {n} numbers, got {len(value)}: {value!r}")
    return [float(v) for v in value]


def _parse_scribble(value: Any, where: str) -> list[list[float]] | None:
    """Flat [x1, y1, ..., xk, yk] or [[x, y], ...] pixels -> list of [x, y]; [] -> None."""
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return None
    if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
        if len(value) % 2:
            raise LayoutError(f"{where}: flat 'scribble' needs an even number of values, got {len(value)}")
        return [[float(value[j]), float(value[j + 1])] for j in range(0, len(value), 2)]
    if isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in value):
        return [_numbers(p, 2, "scribble", where) for p in value]
    raise LayoutError(f"{where}: 'scribble' must be [x1, y1, ...] or [[x, y], ...] in pixels, got {value!r}")


def _parse_anno(anno: Any, i: int, width: int, height: int) -> Instance:
    """One official `annos` entry -> Instance (pixel coordinates divided by width / height)."""
    if not isinstance(anno, dict):
        raise LayoutError(f"instance {i}: each entry of 'annos' must be an object, got {type(anno).__name__}")
    caption = anno.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise LayoutError(f"instance {i}: missing or empty 'caption' (every instance needs a text caption)")
    where = f"instance {i} ({caption!r})"

    box = None
    if anno.get("bbox") is not None:
        xywh = _numbers(anno["bbox"], 4, "bbox", where)
        if any(v != 0 for v in xywh):  # all-zero = "no box" (official default [0, 0, 0, 0])
            box = box_xywh_to_xyxy_norm(xywh, width, height)
    point = None
    if anno.get("point") is not None:
        x, y = _numbers(anno["point"], 2, "point", where)
        point = (x / width, y / height)
    scribble = None
    if anno.get("scribble") is not None:
        pairs = _parse_scribble(anno["scribble"], where)
        if pairs is not None:
            scribble = np.array(pairs, dtype=np.float64) / np.array([width, height], dtype=np.float64)
    try:
        mask = decode_mask(anno.get("mask"), width, height)
    except ValueError as e:
        raise LayoutError(f"{where}: bad 'mask': {e}") from None
    category = anno.get("category_name")
    if category is not None and not isinstance(category, str):
        raise LayoutError(f"{where}: 'category_name' must be a string, got {category!r}")
    return Instance(caption=caption, box=box, point=point, scribble=scribble, mask=mask, category=category)


def _layout_from_dict(data: Any) -> Layout:
    """Parse (not validate) an official-format dict."""
    if not isinstance(data, dict):
        raise LayoutError(f"top level must be a JSON object, got {type(data).__name__}")
    size = {}
    for name in ("width", "height"):
        v = data.get(name)
        if _is_number(v) and float(v).is_integer():
            v = int(v)
        if not _is_int(v) or v <= 0:
            raise LayoutError(f"'{name}' must be a positive integer (pixels), got {v!r}")
        size[name] = v
    caption = data.get("caption", "")
    if not isinstance(caption, str):
        raise LayoutError(f"'caption' (global) must be a string, got {caption!r}")
    annos = data.get("annos")
    if not isinstance(annos, list):
        raise LayoutError(f"'annos' must be a list of instances, got {annos!r}")
    instances = [_parse_anno(a, i, size["width"], size["height"]) for i, a in enumerate(annos)]
    return Layout(caption=caption, width=size["width"], height=size["height"], instances=instances)


def _validate_instance(inst: Instance, i: int, width: int, height: int) -> None:
    """Raise LayoutError if instance i is unusable; pixel values in messages are in the width x height frame."""
    if not isinstance(inst.caption, str) or not inst.caption.strip():
        raise LayoutError(f"instance {i}: missing or empty caption (every instance needs a text caption)")
    where = f"instance {i} ({inst.caption!r})"
    canvas = f"{width}x{height} canvas"
    lo, hi = -TOLERANCE, 1.0 + TOLERANCE
    if inst.box is None and inst.point is None and inst.scribble is None and inst.mask is None:
        raise LayoutError(f"{where}: no location; give at least one of bbox, point, scribble or mask")

    if inst.box is not None:
        if len(inst.box) != 4:
            raise LayoutError(f"{where}: box must be 4 numbers (x0, y0, x1, y1), got {inst.box}")
        x, y, w, h = box_xyxy_norm_to_xywh(inst.box, width, height)
        shown = f"box {_px_list((x, y, w, h))}"
        if not all(math.isfinite(v) for v in inst.box):
            raise LayoutError(f"{where}: {shown} contains NaN/inf")
        x0, y0, x1, y1 = inst.box
        if x1 <= x0 or y1 <= y0:
            raise LayoutError(f"{where}: {shown} has zero or negative size (w = {_px(w)}, h = {_px(h)}; both must be > 0)")
        if x0 < lo:
            raise LayoutError(f"{where}: {shown} starts left of the {canvas} (x = {_px(x)} < 0)")
        if y0 < lo:
            raise LayoutError(f"{where}: {shown} starts above the {canvas} (y = {_px(y)} < 0)")
        if x1 > hi:
            raise LayoutError(f"{where}: {shown} extends past the {canvas} (x + w = {_px(x + w)} > {width})")
        if y1 > hi:
            raise LayoutError(f"{where}: {shown} extends past the {canvas} (y + h = {_px(y + h)} > {height})")

    if inst.point is not None:
        if len(inst.point) != 2:
            raise LayoutError(f"{where}: point must be 2 numbers (x, y), got {inst.point}")
        px = _px_list((inst.point[0] * width, inst.point[1] * height))
        if not all(math.isfinite(v) for v in inst.point):
            raise LayoutError(f"{where}: point {px} contains NaN/inf")
        if not all(lo <= v <= hi for v in inst.point):
            raise LayoutError(f"{where}: point {px} lies outside the {canvas}")

    if inst.scribble is not None:
        s = inst.scribble
        if s.ndim != 2 or s.shape[1] != 2 or len(s) == 0:
            raise LayoutError(f"{where}: scribble must have shape (k, 2) with k >= 1, got {s.shape}")
        if not np.isfinite(s).all():
            raise LayoutError(f"{where}: scribble contains NaN/inf")
        outside = np.flatnonzero(((s < lo) | (s > hi)).any(axis=1))
        if len(outside):
            j = int(outside[0])
            px = _px_list((s[j, 0] * width, s[j, 1] * height))
            raise LayoutError(f"{where}: scribble point {j} {px} lies outside the {canvas}")

    if inst.mask is not None and inst.mask.shape != (height, width):
        raise LayoutError(
            f"{where}: mask shape {tuple(inst.mask.shape)} does not match the layout's "
            f"(height, width) = ({height}, {width})"
        )


# -----------------------------------------------------------------------------
# grounding arrays (position-net inputs)


def _instance_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for instance `index` (its index in the full layout): independent of other instances."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([seed, index])


def _empty_grounding(n_slots: int, seg_size: int) -> dict[str, np.ndarray]:
    return {
        "boxes": np.zeros((n_slots, 4), np.float32),
        "masks": np.zeros((n_slots,), np.float32),
        "points": np.zeros((n_slots, 2), np.float32),
        "scribbles": np.zeros((n_slots, 2 * N_SCRIBBLE_POINTS), np.float32),
        "polygons": np.zeros((n_slots, 2 * N_MASK_POINTS), np.float32),
        "segs": np.zeros((n_slots, seg_size, seg_size), np.float32),
    }


def _fill_slot(out: dict[str, np.ndarray], slot: int, inst: Instance, rng: np.random.Generator, seg_size: int) -> None:
    """Write one instance's position-net inputs into slot `slot` of `out` (in place)."""
    out["masks"][slot] = 1.0
    if inst.box is not None:
        out["boxes"][slot] = inst.box
    # point: the given one, else the box centre (official), else the scribble's mean (ours: the official
    # would use the centre of an all-zero box, i.e. (0, 0)), else zeros
    if inst.point is not None:
        out["points"][slot] = inst.point
    elif inst.box is not None:
        x0, y0, x1, y1 = inst.box
        out["points"][slot] = ((x0 + x1) / 2, (y0 + y1) / 2)
    elif inst.scribble is not None:
        out["points"][slot] = inst.scribble.mean(axis=0)
    # scribble: the user's, resampled to 20 points; else 20 random mask pixels; else zeros
    if inst.scribble is not None:
        out["scribbles"][slot] = derive.reorder_scribble(inst.scribble, N_SCRIBBLE_POINTS).reshape(-1)
    elif inst.mask is not None:
        out["scribbles"][slot] = derive.scribble_from_mask(inst.mask, rng, N_SCRIBBLE_POINTS).reshape(-1)
    if inst.mask is not None:
        mask_points = derive.mask_points_from_mask(inst.mask, rng, N_MASK_POINTS)
        if mask_points is not None:
            out["polygons"][slot] = mask_points.reshape(-1)
        # nearest resize to seg_size (the official uses skimage's resize; both are the identity for a 512 frame)
        mask = torch.from_numpy(inst.mask.astype(np.float32))[None, None]  # (1, 1, H, W)
        out["segs"][slot] = F.interpolate(mask, size=(seg_size, seg_size), mode="nearest")[0, 0].numpy()


def grounding_arrays(layout: Layout, seed: int, seg_size: int = 512, n_slots: int = N_SLOTS) -> dict[str, np.ndarray]:
    """The per-image position-net inputs of a layout, float32, instance i in slot i.

    Keys and shapes (all coordinates normalised (x, y), see module doc):
      boxes [n_slots, 4] xyxy (zeros: no box); masks [n_slots] (1 = real instance);
      points [n_slots, 2]; scribbles [n_slots, 40] = x0, y0, ..., x19, y19;
      polygons [n_slots, 512] = 256 mask points (zeros: no mask); segs [n_slots, seg_size, seg_size]
      binary masks, nearest-resized, indexed [row, col]. Slots past the last instance are all zero.
    Random derivations (scribbles and, for tiny masks, interior points) use
    `np.random.default_rng([seed, i])` for instance i, so they do not depend on the other instances.
    Instance captions are `[inst.caption for inst in layout.instances]`.
    """
    layout = layout.validate(max_instances=n_slots)
    out = _empty_grounding(n_slots, seg_size)
    for i, inst in enumerate(layout.instances):
        _fill_slot(out, i, inst, _instance_rng(seed, i), seg_size)
    return out


def grounding_for_instance(
    layout: Layout, i: int, seed: int, seg_size: int = 512, n_slots: int = N_SLOTS
) -> dict[str, np.ndarray]:
    """Position-net inputs for instance i alone, in slot 0 (the Multi-Instance Sampler's per-instance input).

    Slot 0 equals slot i of `grounding_arrays(layout, seed, ...)`: the same per-(seed, i) generator is used.
    """
    layout = layout.validate(max_instances=n_slots)
    if not 0 <= i < len(layout.instances):
        raise IndexError(f"instance index {i} out of range for a layout with {len(layout.instances)} instances")
    out = _empty_grounding(n_slots, seg_size)
    _fill_slot(out, 0, layout.instances[i], _instance_rng(seed, i), seg_size)
    return out
