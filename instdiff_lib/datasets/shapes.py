"""A procedural "Shapes" world in COCO format: coloured, textured 2-D shapes on light backgrounds.

It serves two purposes: a tiny, fully known dataset for demos, and the synthetic mini-COCO on which the
evaluation code (spec §4) is tested without the 1 GB COCO download. Everything is deterministic from
(seed, split): a rerun writes byte-identical images and JSON files.

Conventions (as everywhere in instdiff_lib):
- images are RGB uint8 arrays indexed [row, col] = [y, x], origin top-left; x = column, y = row;
- COCO boxes are [x, y, w, h] in pixels: the tight box of the *visible* mask, covering whole pixels
  (a pixel at (row r, col c) spans [c, c+1] x [r, r+1]), so they are integers here;
- masks are (H, W) bool arrays; in the JSON they are compressed COCO RLE with `counts` as str.

World rules:
- shapes are drawn back to front in annotation order; a later shape occludes earlier ones, and each
  annotation stores the *visible* part of its shape only. A shape of which less than
  `MIN_VISIBLE_FRACTION` of its own pixels (or fewer than `MIN_VISIBLE_PIXELS`) stays visible is removed
  from the scene and the scene is re-rendered without it, so every annotated instance can be identified
  from what is drawn (removal can only enlarge the visible parts of the others);
- a shape's pixels are exactly its colour (`COLOR_RGB`) or, for a non-solid texture, exactly its
  pattern colour (`PATTERN_RGB`, a darker shade); no noise or anti-aliasing on shapes;
- the background is a light colour with a mild linear gradient and mild noise, at least
  `BACKGROUND_MARGIN` (RGB Euclidean distance) away from every shape and pattern colour, so
  background pixels never equal a shape pixel;
- the drawn colour is independent of the annotation id: the official attribute protocol assigns
  COLORS[ann_id % 8] to an instance (spec §4.1), and here annotation ids are simply sequential
  (1, 2, ... across the split), while the drawn colour is random and stored in the `color` field.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from instdiff_lib.fileio import atomic_write_text
from instdiff_lib.layouts.layout import Instance, Layout, box_xywh_to_xyxy_norm, decode_mask, encode_mask

# -----------------------------------------------------------------------------
# constants

# the paper's 8 attribute colours, in the official evaluation order (color_list of eval_local.py)
COLORS = ["black", "white", "red", "green", "yellow", "blue", "pink", "purple"]
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "yellow": (245, 215, 30),
    "blue": (40, 80, 220),
    "pink": (245, 130, 190),
    "purple": (130, 50, 180),
}
# second colour of a textured shape: half the brightness (black: a dark grey)
PATTERN_RGB: dict[str, tuple[int, int, int]] = {
    c: ((100, 100, 100) if c == "black" else tuple(v // 2 for v in rgb)) for c, rgb in COLOR_RGB.items()
}

TEXTURES = ["solid", "stripes", "dots", "checker"]
TEXTURE_ADJECTIVE = {"solid": "solid", "stripes": "striped", "dots": "dotted", "checker": "checkered"}

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star"]

MIN_VISIBLE_PIXELS = 4  # a shape with fewer visible pixels is dropped
MIN_VISIBLE_FRACTION = 0.6  # ... and so is one with less than this share of its own pixels visible
WORLD_VERSION = 2  # bumped whenever the world's rules change: splits written under another version are rewritten
BACKGROUND_MARGIN = 60.0  # min RGB distance from the background base colour to any shape colour
_BG_RANGE = (150, 236)  # background base colour channels are drawn from [150, 236)
_BG_GRADIENT_MAX = 10.0  # |gradient| <= 10 grey levels
_BG_NOISE_MAX = 4  # |noise| <= 4 grey levels (so a background pixel stays >= 46 from any shape colour)
_RADIUS_RANGE = (0.12, 0.26)  # shape half-extent as a fraction of the image size


# -----------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class ShapeSpec:
    """One shape to draw: its kind, colour, texture, centre (cx = x = column, cy = y = row, in pixels,
    continuous coordinates with the image spanning [0, size]) and half-extent `radius` in pixels."""

    shape: str
    color: str
    texture: str
    cx: float
    cy: float
    radius: float

    @property
    def caption(self) -> str:
        """E.g. "a red striped circle"."""
        return f"a {self.color} {TEXTURE_ADJECTIVE[self.texture]} {self.shape}"


def _polygon_mask(vertices: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of the points (X, Y) against a closed polygon of (k, 2) (x, y) vertices."""
    inside = np.zeros(X.shape, bool)
    xs, ys = vertices[:, 0], vertices[:, 1]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(np.roll(xs, -1), np.roll(ys, -1))):
        if y0 == y1:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (Y >= min(y0, y1)) & (Y < max(y0, y1))
        x_at_y = x0 + (Y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (X < x_at_y)
    return inside


def shape_mask(spec: ShapeSpec, size: int) -> np.ndarray:
    """The (size, size) bool mask of a whole (unoccluded) shape: pixels whose centre lies inside it."""
    X = np.arange(size, dtype=np.float64)[None, :] + 0.5  # pixel-centre x (column)
    Y = np.arange(size, dtype=np.float64)[:, None] + 0.5  # pixel-centre y (row)
    X, Y = np.broadcast_arrays(X, Y)
    dx, dy, r = X - spec.cx, Y - spec.cy, spec.radius
    if spec.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if spec.shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if spec.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if spec.shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if spec.shape == "triangle":  # pointing up
        verts = np.array([[spec.cx, spec.cy - r], [spec.cx + r, spec.cy + r], [spec.cx - r, spec.cy + r]])
        return _polygon_mask(verts, X, Y)
    if spec.shape == "star":  # 5 points, the first pointing up
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        verts = np.stack([spec.cx + radii * np.cos(angles), spec.cy + radii * np.sin(angles)], axis=1)
        return _polygon_mask(verts, X, Y)
    raise ValueError(f"unknown shape {spec.shape!r}; known: {SHAPES}")


def texture_pattern(texture: str, size: int) -> np.ndarray:
    """(size, size) bool: True where a shape with this texture shows its pattern colour (image-anchored)."""
    unit = max(2, round(size / 16))  # 4 px at 64 px
    rows = np.arange(size)[:, None]
    cols = np.arange(size)[None, :]
    if texture == "solid":
        return np.zeros((size, size), bool)
    if texture == "stripes":  # diagonal stripes, `unit` px wide
        return ((rows + cols) // unit) % 2 == 1
    if texture == "checker":
        return ((rows // unit) + (cols // unit)) % 2 == 1
    if texture == "dots":  # one dot per 2*unit cell
        s = 2 * unit
        dx = (cols % s) + 0.5 - s / 2
        dy = (rows % s) + 0.5 - s / 2
        return dx**2 + dy**2 <= (0.3 * s) ** 2
    raise ValueError(f"unknown texture {texture!r}; known: {TEXTURES}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light (size, size, 3) uint8 background: base colour + linear gradient + mono noise."""
    palette = np.array(list(COLOR_RGB.values()) + list(PATTERN_RGB.values()), dtype=np.float64)
    while True:
        base = rng.integers(*_BG_RANGE, size=3).astype(np.float64)
        if np.sqrt(((palette - base) ** 2).sum(axis=1)).min() >= BACKGROUND_MARGIN:
            break
    theta = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0, _BG_GRADIENT_MAX)
    t = (np.arange(size) + 0.5) / size - 0.5  # in [-0.5, 0.5]
    gradient = 2 * amplitude * (np.cos(theta) * t[None, :] + np.sin(theta) * t[:, None]) / np.sqrt(2)
    noise = rng.integers(-_BG_NOISE_MAX, _BG_NOISE_MAX + 1, size=(size, size))
    img = base[None, None, :] + (gradient + noise)[:, :, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(
    specs: list[ShapeSpec], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[ShapeSpec], list[np.ndarray]]:
    """Draw `specs` back to front on a random light background (drawn from `rng`).

    Returns (image (size, size, 3) uint8, kept specs, their visible (size, size) bool masks). Shapes with
    fewer than MIN_VISIBLE_PIXELS visible pixels, or less than MIN_VISIBLE_FRACTION of their own pixels visible,
    are dropped and the scene is drawn without them.
    """
    background = _background(rng, size)
    full = [shape_mask(s, size) for s in specs]
    keep = list(range(len(specs)))
    while True:
        owner = np.full((size, size), -1, dtype=np.int64)  # index into `keep` of the top shape, -1 = none
        for j, i in enumerate(keep):
            owner[full[i]] = j
        visible = [owner == j for j in range(len(keep))]
        small = [j for j, (i, m) in enumerate(zip(keep, visible))
                 if m.sum() < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full[i].sum())]
        if not small:
            break
        keep = [i for j, i in enumerate(keep) if j not in small]
    image = background.copy()
    for i, m in zip(keep, visible):
        spec = specs[i]
        pattern = texture_pattern(spec.texture, size)
        image[m & ~pattern] = COLOR_RGB[spec.color]
        image[m & pattern] = PATTERN_RGB[spec.color]
    return image, [specs[i] for i in keep], visible


def random_specs(rng: np.random.Generator, size: int, n: int) -> list[ShapeSpec]:
    """n random shapes (kind x colour x texture x scale x position), each fully inside the image."""
    specs = []
    for _ in range(n):
        radius = float(rng.uniform(*_RADIUS_RANGE) * size)
        specs.append(
            ShapeSpec(
                shape=SHAPES[rng.integers(len(SHAPES))],
                color=COLORS[rng.integers(len(COLORS))],
                texture=TEXTURES[rng.integers(len(TEXTURES))],
                cx=float(rng.uniform(radius, size - radius)),
                cy=float(rng.uniform(radius, size - radius)),
                radius=radius,
            )
        )
    return specs


def mask_bbox(mask: np.ndarray) -> list[int]:
    """Tight COCO box [x, y, w, h] (x = column, y = row, whole pixels) of a non-empty (H, W) mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask_bbox needs a non-empty mask")
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def global_caption(instance_captions: list[str], max_listed: int = 4) -> str:
    """"a red striped circle and a blue solid square on a light background" (at most `max_listed` named)."""
    listed = instance_captions[:max_listed]
    rest = len(instance_captions) - len(listed)
    if rest:
        listed = listed + [f"{rest} more shape" + ("s" if rest > 1 else "")]
    if not listed:
        return "an empty light background"
    text = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    return f"{text} on a light background"


# -----------------------------------------------------------------------------
# dataset


@dataclass(frozen=True)
class ShapesSplit:
    """Where one split of a Shapes dataset lives (COCO directory layout).

    root/<split>/<image_id:012d>.png, root/annotations/instances_<split>.json,
    root/annotations/captions_<split>.json.
    """

    root: Path
    image_dir: Path
    instances_json: Path
    captions_json: Path
    n_images: int
    split: str = "val"

    @classmethod
    def load(cls, root: str | os.PathLike, split: str = "val") -> ShapesSplit:
        """The split written earlier by `make_shapes_dataset(root, ..., split=split)`."""
        root = Path(root)
        paths = cls._paths(root, split)
        for p in paths.values():
            if not p.exists():
                raise FileNotFoundError(f"{p} not found: not a Shapes dataset split (make_shapes_dataset writes it)")
        n = len(json.loads(paths["instances_json"].read_text())["images"])
        return cls(root=root, n_images=n, split=split, **paths)

    @staticmethod
    def _paths(root: Path, split: str) -> dict[str, Path]:
        return {
            "image_dir": root / split,
            "instances_json": root / "annotations" / f"instances_{split}.json",
            "captions_json": root / "annotations" / f"captions_{split}.json",
        }


def _split_key(split: str) -> int:
    """A stable integer for a split name (Python's hash() is salted per process)."""
    return zlib.crc32(split.encode("utf-8"))


def _write_json(path: Path, obj: dict) -> None:
    """Compact, deterministic JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))


def make_shapes_dataset(
    out_dir: str | os.PathLike,
    n_images: int,
    seed: int,
    size: int = 64,
    split: str = "val",
    min_instances: int = 1,
    max_instances: int = 8,
    image_format: str = "png",
) -> ShapesSplit:
    """Write a Shapes split in COCO format and return its paths.

    Image i (image id i + 1) is drawn from `np.random.default_rng([seed, crc32(split), i])`, so the output is
    identical on every run and image i does not depend on n_images. Each image gets
    n ~ U{min_instances..max_instances} random shapes; occluded-away ones are dropped (module doc), and the
    scene is redrawn from the same generator if fewer than `min_instances` remain.

    instances_<split>.json: COCO `images`, `categories` (id 1.. = SHAPES order, name = shape),
    `annotations` with id (sequential from 1 over the split), image_id, category_id, bbox (tight box of the
    visible mask), segmentation (compressed RLE, str counts), area (visible pixel count), iscrowd 0, and the
    extra fields color, texture and caption ("a red striped circle").
    captions_<split>.json: `images` and one `annotations` entry (id, image_id, caption) per image: the global
    caption listing up to 4 instances in annotation order, e.g.
    "a red striped circle and a blue solid square on a light background".
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if not 1 <= min_instances <= max_instances <= 30:
        raise ValueError(f"need 1 <= min_instances <= max_instances <= 30, got {min_instances}, {max_instances}")
    fmt = image_format.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    ext = "png" if fmt == "png" else "jpg"

    root = Path(out_dir)
    paths = ShapesSplit._paths(root, split)
    paths["image_dir"].mkdir(parents=True, exist_ok=True)
    paths["instances_json"].parent.mkdir(parents=True, exist_ok=True)

    images, annotations, captions = [], [], []
    categories = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    category_id = {s: k + 1 for k, s in enumerate(SHAPES)}
    next_ann_id = 1
    for i in range(n_images):
        rng = np.random.default_rng([seed, _split_key(split), i])
        while True:
            n = int(rng.integers(min_instances, max_instances + 1))
            image, specs, masks = render_scene(random_specs(rng, size, n), size, rng)
            if len(specs) >= min_instances:
                break
        image_id = i + 1
        file_name = f"{image_id:012d}.{ext}"
        pil = Image.fromarray(image)
        if ext == "png":
            pil.save(paths["image_dir"] / file_name, format="PNG")
        else:
            pil.save(paths["image_dir"] / file_name, format="JPEG", quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for spec, mask in zip(specs, masks):
            annotations.append(
                {
                    "id": next_ann_id,
                    "image_id": image_id,
                    "category_id": category_id[spec.shape],
                    "bbox": mask_bbox(mask),
                    "segmentation": encode_mask(mask),
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "color": spec.color,
                    "texture": spec.texture,
                    "caption": spec.caption,
                }
            )
            next_ann_id += 1
        captions.append({"id": image_id, "image_id": image_id, "caption": global_caption([s.caption for s in specs])})

    info = {
        "description": "instdiff Shapes world (procedural, deterministic)",
        "seed": seed,
        "world_version": WORLD_VERSION,
        "split": split,
        "size": size,
        "min_instances": min_instances,
        "max_instances": max_instances,
    }
    _write_json(
        paths["instances_json"],
        {"info": info, "images": images, "categories": categories, "annotations": annotations},
    )
    _write_json(paths["captions_json"], {"info": info, "images": images, "annotations": captions})
    return ShapesSplit(root=root, n_images=n_images, split=split, **paths)


def shapes_layouts(split: ShapesSplit | str | os.PathLike) -> list[tuple[int, str, Layout]]:
    """(image_id, file_name, Layout) per image, sorted by image id: the conditioning that describes it.

    Layout caption = the image's global caption; one Instance per annotation (annotation order), with
    caption = the instance caption, box = the annotation bbox normalised to xyxy, mask = the decoded
    visible mask, category = the shape name. `split` is a ShapesSplit or the root directory of a "val" split.
    """
    if not isinstance(split, ShapesSplit):
        split = ShapesSplit.load(split)
    inst = json.loads(Path(split.instances_json).read_text())
    caps = json.loads(Path(split.captions_json).read_text())
    cat_name = {c["id"]: c["name"] for c in inst["categories"]}
    caption_of: dict[int, str] = {}
    for c in caps["annotations"]:
        caption_of.setdefault(c["image_id"], c["caption"])  # first caption in file order
    anns_of: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    out = []
    for img in sorted(inst["images"], key=lambda im: im["id"]):
        w, h = img["width"], img["height"]
        instances = [
            Instance(
                caption=a["caption"],
                box=box_xywh_to_xyxy_norm(a["bbox"], w, h),
                mask=decode_mask(a["segmentation"], w, h),
                category=cat_name[a["category_id"]],
            )
            for a in anns_of.get(img["id"], [])
        ]
        layout = Layout(caption=caption_of.get(img["id"], ""), width=w, height=h, instances=instances)
        out.append((img["id"], img["file_name"], layout.validate()))
    return out


def current_split(root: str | os.PathLike, split: str, seed: int, size: int = 64,
                  n_images: int | None = None, at_least: int | None = None) -> ShapesSplit | None:
    """The split ``split`` under ``root`` if it was written by this world version with ``seed`` and ``size`` and
    has exactly ``n_images`` (or at least ``at_least``) images; else None (missing, stale or another size)."""
    try:
        found = ShapesSplit.load(Path(root), split)
        info = json.loads(found.instances_json.read_text()).get("info", {})
    except (FileNotFoundError, ValueError, KeyError):
        return None
    if (info.get("seed"), info.get("size"), info.get("world_version")) != (seed, size, WORLD_VERSION):
        return None
    if (n_images is not None and found.n_images != n_images) or (at_least is not None and found.n_images < at_least):
        return None
    return found


def train_split(root: Path, n_images: int, seed: int, size: int) -> ShapesSplit:
    """The Shapes "train" split under ``root``: reused when this world version wrote it with the same seed and size
    and it has at least ``n_images`` images (image i does not depend on the split size), else (re)written."""
    return (current_split(root, "train", seed, size, at_least=n_images)
            or make_shapes_dataset(root, n_images, seed, size=size, split="train"))
