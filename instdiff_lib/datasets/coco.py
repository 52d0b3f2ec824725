"""COCO val2017 for the paper's zero-shot protocol (spec §4.1): download, 512x512 resizing, protocol items.

Mirrors the data handling of the official `eval_local.py` (image order, annotation order, phrases,
attributes, prompts), minus its plumbing: no paths relative to the working directory, explicit errors
instead of silent skips, and degenerate boxes repaired *and counted*.

Conventions (as everywhere in instdiff_lib):
- COCO boxes are [x, y, w, h] in pixels of the image's width x height frame, x = column, y = row,
  origin top-left; `Instance` boxes are normalised (x0, y0, x1, y1) = ([x, x + w] / width, [y, y + h] / height);
- masks are (height, width) bool arrays indexed [row, col]; COCO segmentations are polygons
  [[x1, y1, x2, y2, ...], ...] in pixels, uncompressed RLE (counts = list, used for crowd annotations)
  or compressed RLE (counts = str); all RLE is column-major with size [height, width].

Nothing here needs torch (the `Layout` class it builds lives in layout.py, which does import it).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from instdiff_lib.layouts.layout import Box, Instance, Layout, LayoutError, decode_mask, encode_mask
from instdiff_lib.datasets.shapes import COLORS

COCO_URLS = {
    "val2017": "http://images.cocodataset.org/zips/val2017.zip",
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
}
# what each part must leave under `root` to count as present (download_coco skips it then)
COCO_PART_CONTENTS = {
    "val2017": ["val2017"],
    "annotations": ["annotations/instances_val2017.json", "annotations/captions_val2017.json"],
}
# official texture_list of eval_local.py (colours: shapes.COLORS, the same order as its color_list)
TEXTURES_COCO = ["rubber", "fluffy", "metallic", "wooden", "plastic", "fabric", "leather", "glass"]
MAX_INSTANCES = 30  # official max_objs

_CHUNK = 1 << 20


class DataError(RuntimeError):
    """Data that cannot be fetched or used, with a message saying what to do by hand."""


# -----------------------------------------------------------------------------
# download


def _part_present(root: Path, part: str) -> bool:
    """True if everything `part` provides is already under root (a directory counts if it has a file)."""
    for rel in COCO_PART_CONTENTS.get(part, [part]):
        p = root / rel
        if p.is_dir():
            if not any(p.iterdir()):
                return False
        elif not p.is_file():
            return False
    return True


def _offline_error(url: str, zip_path: Path, root: Path, part: str, reason: str) -> DataError:
    wanted = ", ".join(str(root / rel) for rel in COCO_PART_CONTENTS.get(part, [part]))
    return DataError(
        f"cannot download {url}: {reason}. This machine appears to be offline (or cannot reach that host). "
        f"Fetch the file by hand on a machine with internet access and put it at {zip_path} "
        f"(then rerun; it will be unzipped), or unzip it yourself so that {wanted} exist."
    )


def _fetch(url: str, dest: Path, timeout: float, progress: bool) -> None:
    """Download url to dest via dest.part: resumes a partial .part (HTTP Range), renames when complete.

    Raises OSError-family / urllib / http.client errors on network problems (the caller wraps them).
    """
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "instdiff"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # .part already as long as the file (or longer): start over
            part.unlink()
            return _fetch(url, dest, timeout, progress)
        raise
    with resp:
        status = getattr(resp, "status", None)
        if offset and status != 206:  # the server (or a file:// URL) ignored the Range: start over
            offset = 0
        length = resp.headers.get("Content-Length") if resp.headers else None
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not progress
        ) as bar:
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)
    os.replace(part, dest)


def _unzip(zip_path: Path, root: Path) -> None:
    """Extract into a temporary folder under root, then move each top-level entry into place.

    A top-level directory that does not exist yet is moved in one rename (atomic); one that exists is
    merged file by file without overwriting existing files (e.g. a resized instances file you put there).
    """
    tmp = root / f".extract-{zip_path.stem}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
    except zipfile.BadZipFile as e:
        zip_path.unlink()
        raise DataError(f"{zip_path} is not a valid zip file ({e}); deleted it, rerun to download again") from None
    for entry in sorted(tmp.iterdir()):
        dst = root / entry.name
        if not dst.exists():
            os.replace(entry, dst)
            continue
        for src in sorted(p for p in entry.rglob("*") if p.is_file()):
            target = dst / src.relative_to(entry)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, target)
    shutil.rmtree(tmp)


def download_coco(
    root: str | os.PathLike,
    parts: Iterable[str] = ("val2017", "annotations"),
    timeout: float = 30,
    urls: Mapping[str, str] | None = None,
    keep_zip: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Download and unzip COCO parts into root (root/val2017/*.jpg, root/annotations/*.json).

    A part whose contents (COCO_PART_CONTENTS) are already present is skipped; a complete zip already at
    root/<name>.zip is unzipped without downloading. Downloads go to <name>.zip.part, resume from a partial
    .part, and are renamed to <name>.zip only when complete. Any network failure raises DataError at once,
    naming the URL and where to put the file by hand. `urls` overrides COCO_URLS (tests, mirrors).
    Returns {part: path} for each requested part (the directory or, for annotations, root/annotations).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    urls = dict(COCO_URLS if urls is None else urls)
    out: dict[str, Path] = {}
    for part in parts:
        if part not in urls:
            raise ValueError(f"unknown COCO part {part!r}; known: {sorted(urls)}")
        out[part] = root / COCO_PART_CONTENTS.get(part, [part])[0].split("/")[0]
        if _part_present(root, part):
            continue
        url = urls[part]
        zip_path = root / Path(urllib.request.url2pathname(url.rsplit("/", 1)[-1])).name
        if not zip_path.exists():
            try:
                _fetch(url, zip_path, timeout, progress)
            except urllib.error.HTTPError as e:
                reason = f"the server answered HTTP {e.code} {e.reason}"
                raise _offline_error(url, zip_path, root, part, reason) from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", None) or e
                raise _offline_error(url, zip_path, root, part, f"{type(e).__name__}: {reason}") from None
        _unzip(zip_path, root)
        if not keep_zip:
            zip_path.unlink()
        if not _part_present(root, part):
            raise DataError(f"{zip_path} did not contain {COCO_PART_CONTENTS.get(part, [part])} (wrong file?)")
    return out


# -----------------------------------------------------------------------------
# 512 x 512 resizing of an instances file


def resize_mask_nearest(mask: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) mask, pixel-centre aligned.

    Output pixel (i, j) takes input pixel (floor((i + 0.5) * H / out_height), floor((j + 0.5) * W / out_width)):
    the convention of PIL's `Image.resize(..., NEAREST)`, which the official code uses for its `segs`.
    """
    h, w = mask.shape
    rows = np.minimum(((np.arange(out_height) + 0.5) * h / out_height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_width) + 0.5) * w / out_width).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def _rle_of(segmentation: dict, height: int, width: int, where: str) -> dict:
    """A COCO RLE dict (compressed or not) -> pycocotools compressed RLE (bytes counts), size checked."""
    size = segmentation.get("size")
    if list(size or []) != [height, width]:
        raise DataError(f"{where}: RLE size {size} does not match the image's [height, width] = [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _valid_polygons(polygons: list) -> list[list[float]]:
    """Polygons with >= 3 points (pycocotools misreads a 4-number "polygon" as a box; such lines have no area)."""
    return [[float(v) for v in p] for p in polygons if len(p) >= 6 and len(p) % 2 == 0]


def resize_instances(src_json: str | os.PathLike, dst_json: str | os.PathLike, size: int = 512) -> dict:
    """Derive the authors' 512 x 512 instances file (spec §4.1) from an original COCO instances file.

    Every image becomes size x size (non-aspect-preserving): with sx = size / width and sy = size / height,
    - bbox [x, y, w, h] -> [x * sx, y * sy, w * sx, h * sy] (floats, not rounded);
    - polygons are scaled point-wise (x by sx, y by sy);
    - RLE masks (compressed, and the uncompressed crowd RLE) are decoded at height x width, resized
      with `resize_mask_nearest` to size x size and re-encoded as compressed RLE with str counts;
    - `area` is RECOMPUTED as the pixel count of the resized mask (polygons rasterised by pycocotools at
      size x size, i.e. `annToMask(ann).sum()` on the new file). This is our choice: the authors' file is
      not public in a checkable form; the alternative, area * sx * sy, differs by rasterisation only, but
      COCOeval's small/medium/large split (32², 96²) reads this field, so we make it agree with the masks.
      Annotations without a segmentation keep area * sx * sy;
    - everything else (ids, order, categories, info, licenses, extra fields) is copied unchanged.
    Writes dst_json atomically and returns the new dataset dict.
    """
    src_json, dst_json = Path(src_json), Path(dst_json)
    data = json.loads(src_json.read_text())
    scale: dict[int, tuple[int, int]] = {}
    for img in data["images"]:
        scale[img["id"]] = (int(img["height"]), int(img["width"]))
        img["width"] = size
        img["height"] = size
    for ann in data["annotations"]:
        where = f"{src_json.name}: annotation {ann.get('id')} (image {ann.get('image_id')})"
        if ann["image_id"] not in scale:
            raise DataError(f"{where}: its image is not in 'images'")
        h, w = scale[ann["image_id"]]
        sx, sy = size / w, size / h
        if "bbox" in ann:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            ann["bbox"] = [x * sx, y * sy, bw * sx, bh * sy]
        seg = ann.get("segmentation")
        if isinstance(seg, dict):
            with warnings.catch_warnings():  # pycocotools 2.0.11 trips a numpy 2 DeprecationWarning
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = mask_utils.decode(_rle_of(seg, h, w, where)).astype(bool)
            resized = resize_mask_nearest(mask, size, size)
            ann["segmentation"] = encode_mask(resized)
            ann["area"] = int(resized.sum())
        elif isinstance(seg, list) and seg:
            ann["segmentation"] = [
                [float(v) * (sx if k % 2 == 0 else sy) for k, v in enumerate(poly)] for poly in seg
            ]
            polys = _valid_polygons(ann["segmentation"])
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, size, size)) if polys else None
            ann["area"] = int(mask_utils.area(rle)) if polys else 0
        elif "area" in ann:
            ann["area"] = float(ann["area"]) * sx * sy
    tmp = dst_json.with_name(dst_json.name + ".tmp")
    dst_json.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, dst_json)
    return data


def is_resized(instances: str | os.PathLike | dict, size: int = 512) -> bool:
    """True if every image is size x size and every RLE segmentation has size [size, size].

    Accepts the authors' own resized file as well as one written by `resize_instances`.
    """
    data = instances if isinstance(instances, dict) else json.loads(Path(instances).read_text())
    images = data.get("images", [])
    if not images or any(img.get("width") != size or img.get("height") != size for img in images):
        return False
    for ann in data.get("annotations", []):
        seg = ann.get("segmentation")
        if isinstance(seg, dict) and list(seg.get("size", [])) != [size, size]:
            return False
    return True


# -----------------------------------------------------------------------------
# protocol items (spec §4.1)


@dataclass(eq=False)
class CocoItem:
    """One image of the protocol: what the official eval_local.py feeds the model for it.

    `phrases`, `attributes`, `ann_ids`, `category_ids`, `categories`, `boxes` and `segmentations` describe the
    conditioned instances (the first `max_instances` annotations, file order); `n_annotations` counts all of them, and
    `prompt` names all of them. `n_fixed_boxes` counts boxes changed to pass validation (see protocol_items).
    `layout` decodes the masks on every access (not cached: 5000 images x ~7 masks x 512² bytes would be
    ~10 GB); scribbles and mask points are derived later by `grounding_arrays(item.layout, seed)`.
    """

    image_id: int
    file_name: str
    width: int
    height: int
    prompt: str
    phrases: list[str]
    attributes: list[str] | None
    ann_ids: list[int]
    category_ids: list[int]
    categories: list[str]  # category names (the phrases without attribute)
    boxes: list[Box]  # normalised xyxy
    n_annotations: int
    n_fixed_boxes: int
    segmentations: list[Any] = field(default_factory=list, repr=False)  # raw COCO segmentation per instance

    def mask(self, i: int) -> np.ndarray | None:
        """The (height, width) bool mask of conditioned instance i (None: the annotation has no segmentation)."""
        seg = self.segmentations[i]
        where = f"image {self.image_id} ({self.file_name}), annotation {self.ann_ids[i]}"
        if isinstance(seg, list) and seg:
            polys = _valid_polygons(seg)
            if not polys:  # only degenerate (< 3 point) polygons: an empty mask, the box still conditions
                return np.zeros((self.height, self.width), bool)
            seg = polys
        elif isinstance(seg, dict) and list(seg.get("size") or []) != [self.height, self.width]:
            raise DataError(
                f"{where}: RLE size {seg.get('size')} does not match the image's [height, width] = "
                f"[{self.height}, {self.width}] (original instances file with a resized one, or vice versa?)"
            )
        try:
            return decode_mask(seg, self.width, self.height)
        except ValueError as e:
            raise DataError(f"{where}: bad segmentation: {e}") from None

    @property
    def layout(self) -> Layout:
        """The validated Layout: caption = prompt, one Instance (phrase, box, mask, category) per conditioned
        annotation, in the width x height frame of the image."""
        instances = [
            Instance(caption=p, box=b, mask=self.mask(i), category=self.categories[i])
            for i, (p, b) in enumerate(zip(self.phrases, self.boxes))
        ]
        layout = Layout(caption=self.prompt, width=self.width, height=self.height, instances=instances)
        try:
            return layout.validate(max_instances=max(MAX_INSTANCES, len(instances)))
        except LayoutError as e:
            raise DataError(f"image {self.image_id} ({self.file_name}): {e}") from None


def _load_json(src: str | os.PathLike | dict) -> dict:
    return src if isinstance(src, dict) else json.loads(Path(src).read_text())


def _clamped_box(bbox: list, width: int, height: int) -> tuple[Box, bool]:
    """COCO [x, y, w, h] -> normalised xyxy, clamped into the frame with w, h >= 1 px; (box, changed)."""
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    x1, y1 = max(x1, x0 + 1.0), max(y1, y0 + 1.0)  # at least one pixel wide and high
    changed = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    return (x0 / width, y0 / height, x1 / width, y1 / height), changed


def protocol_items(
    instances_json: str | os.PathLike | dict,
    captions_json: str | os.PathLike | dict | None,
    attribute: str | None = None,
    max_instances: int = MAX_INSTANCES,
    image_ids: Iterable[int] | None = None,
    phrase_source: str = "official",
) -> list[CocoItem]:
    """The per-image conditioning of the official COCO protocol (spec §4.1, eval_local.py), as CocoItems.

    - images: all ids of the instances file, sorted ascending (or `image_ids`, in that order);
    - instances: ALL annotations of the image, iscrowd=1 included, in annotation-file order; the first
      `max_instances` (30) condition the model;
    - phrase = category name, or f"{attr} {name}" with attr = COLORS[ann_id % 8] (attribute="color") or
      TEXTURES_COCO[ann_id % 8] (attribute="texture");
    - prompt = first caption of the image in captions-file order, immediately followed (no separator) by
      ", ".join(all phrases, not truncated): "A man riding a horse on a beach.person, horse". With
      captions_json=None (official run without --use_captions) the prompt is the phrases alone;
    - boxes: [x, y, w, h] / (width, height) -> normalised xyxy. A box that is degenerate (w or h < 1 px)
      or sticks out of the frame is clamped into the frame with w, h >= 1 px so the Layout validates;
      the instance is kept and counted in `n_fixed_boxes` (never dropped);
    - masks: the annotation's polygons / RLE decoded at the image's width x height (lazily, `item.layout`).
    Images without annotations yield an item with no instances (prompt = caption only).
    Works on any COCO-format pair, e.g. the Shapes dataset's json files.

    ``phrase_source="annotation"`` (the Shapes world): phrase = the annotation's own ``caption`` field ("a red
    striped circle"), attribute = its drawn ``color`` / ``texture`` field (so a real image agrees with its
    attributes), prompt = the first caption alone (the training format of the mini model).
    """
    if phrase_source not in ("official", "annotation"):
        raise ValueError(f"phrase_source must be 'official' or 'annotation', got {phrase_source!r}")
    if attribute not in (None, "color", "texture"):
        raise ValueError(f"attribute must be None, 'color' or 'texture', got {attribute!r}")
    if max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")
    inst = _load_json(instances_json)
    images = {img["id"]: img for img in inst["images"]}
    categories = {c["id"]: c["name"] for c in inst["categories"]}
    anns_of: dict[int, list[dict]] = {i: [] for i in images}
    for ann in inst["annotations"]:
        if ann["image_id"] not in images:
            raise DataError(f"annotation {ann.get('id')} refers to image {ann['image_id']}, which is not in 'images'")
        if ann["category_id"] not in categories:
            raise DataError(f"annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        anns_of[ann["image_id"]].append(ann)
    first_caption: dict[int, str] | None = None
    if captions_json is not None:
        first_caption = {}
        for cap in _load_json(captions_json)["annotations"]:
            first_caption.setdefault(cap["image_id"], cap["caption"])

    ids = sorted(images) if image_ids is None else list(image_ids)
    items = []
    for image_id in ids:
        if image_id not in images:
            raise DataError(f"image id {image_id} is not in the instances file")
        img = images[image_id]
        width, height = int(img["width"]), int(img["height"])
        anns = anns_of[image_id]
        attrs_all = None
        names = [categories[a["category_id"]] for a in anns]
        if phrase_source == "annotation":
            missing = [a["id"] for a in anns if "caption" not in a or (attribute and attribute not in a)]
            if missing:
                raise DataError(f"annotations {missing[:5]} lack the 'caption'/{attribute!r} fields that "
                                "phrase_source='annotation' reads (Shapes-world annotations have them)")
            attrs_all = [a[attribute] for a in anns] if attribute else None
            phrases_all = [a["caption"] for a in anns]
        elif attribute is not None:
            table = COLORS if attribute == "color" else TEXTURES_COCO
            attrs_all = [table[a["id"] % len(table)] for a in anns]
            phrases_all = [f"{t} {n}" for t, n in zip(attrs_all, names)]
        else:
            phrases_all = names
        if phrase_source == "annotation":
            prompt = (first_caption or {}).get(image_id, ", ".join(phrases_all))
        elif first_caption is None:
            prompt = ", ".join(phrases_all)
        else:
            if image_id not in first_caption:
                raise DataError(f"image {image_id} ({img['file_name']}) has no caption in the captions file")
            prompt = first_caption[image_id] + ", ".join(phrases_all)

        used = anns[:max_instances]
        boxes, n_fixed = [], 0
        for a in used:
            box, changed = _clamped_box(a["bbox"], width, height)
            boxes.append(box)
            n_fixed += changed
        items.append(
            CocoItem(
                image_id=image_id,
                file_name=img["file_name"],
                width=width,
                height=height,
                prompt=prompt,
                phrases=phrases_all[: len(used)],
                attributes=None if attrs_all is None else attrs_all[: len(used)],
                ann_ids=[a["id"] for a in used],
                category_ids=[a["category_id"] for a in used],
                categories=names[: len(used)],
                boxes=boxes,
                n_annotations=len(anns),
                n_fixed_boxes=n_fixed,
                segmentations=[a.get("segmentation") for a in used],
            )
        )
    return items
