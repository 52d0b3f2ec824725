"""Scoring of generated images (spec §4.2–4.3): detector AP/AR, mask IoU, PiM, and the guards around them.

Every metric returns a :class:`MetricResult`: the numbers, how many images were scored, and every image
that was *not* scored with the reason, so nothing is dropped silently.

Conventions (as everywhere in instdiff_lib): COCO boxes are [x, y, w, h] in pixels of the image frame,
x = column, y = row; masks are (H, W) arrays indexed [row, col]; RLE is COCO's column-major compressed RLE
with ``size = [H, W]``. Values are fractions in [0, 1] (the paper prints percent).

Submodules: ``detection`` (YOLO inference -> COCO results, ``coco_ap``, ``mask_iou``), ``pim`` (the function is
``instdiff_lib.evaluation.metrics.pim.pim``; the package attribute ``pim`` is the submodule), ``guards``.
Importing this package does not import torch or ultralytics.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MetricResult",
    "FrameMismatchError",
    "load_coco",
    "load_results",
    "results_by_image",
    "check_result_frames",
    "rle_area",
    "rle_bbox",
    # re-exported lazily from the submodules
    "yolo_predict",
    "load_yolo",
    "coco_ap",
    "mask_iou",
    "GuardError",
    "check_manifest",
    "real_image_copies",
    "assert_generated",
    "sanity_flag_real_like",
]


@dataclass
class MetricResult:
    """One metric over a set of images.

    values: the numbers (floats; NaN where undefined, e.g. COCOeval's -1 "no GT in this area range");
    n_evaluated: images that contributed; n_skipped / skipped: requested images that did not, as
    (image_id, reason) pairs; details: everything else (settings, per-image values, raw arrays, counts).
    """

    values: dict[str, float]
    n_evaluated: int
    n_skipped: int = 0
    skipped: list[tuple[Any, str]] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.n_skipped != len(self.skipped):
            raise ValueError(f"n_skipped={self.n_skipped} but {len(self.skipped)} skipped entries")

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    def summary(self) -> str:
        vals = ", ".join(f"{k}={v:.4f}" for k, v in self.values.items())
        return f"{vals} (n_evaluated={self.n_evaluated}, n_skipped={self.n_skipped})"


class FrameMismatchError(ValueError):
    """A prediction's mask is not in the pixel frame of its GT image (size mismatch)."""


def load_coco(gt: str | os.PathLike | Mapping | Any):
    """A pycocotools ``COCO`` from a path, a parsed dict (deep-copied), or an existing ``COCO`` (returned as is).

    pycocotools' progress prints are swallowed.
    """
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, Mapping):
            c = COCO()
            c.dataset = copy.deepcopy(dict(gt))
            c.createIndex()
            return c
        return COCO(os.fspath(gt))


def load_results(results: str | os.PathLike | Iterable[Mapping]) -> list[dict]:
    """COCO results (a list of dicts, or a path to a results json such as ultralytics' predictions.json)."""
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            results = json.load(f)
    return list(results)


def results_by_image(results: Iterable[Mapping]) -> dict[Any, list[Mapping]]:
    """image_id -> its results, in input order."""
    out: dict[Any, list[Mapping]] = {}
    for r in results:
        out.setdefault(r["image_id"], []).append(r)
    return out


def check_result_frames(gt, results: Iterable[Mapping], *, require_segmentation: bool = False) -> None:
    """Raise if a result's RLE size differs from its GT image's [height, width] (or, with
    ``require_segmentation``, if it has no RLE segmentation). Masks in another frame are a pipeline bug
    (e.g. predictions on original-size photos scored against the 512x512 GT), never something to resize away.
    """
    imgs = gt.imgs
    bad, missing = [], []
    for r in results:
        seg = r.get("segmentation")
        if seg is None or not isinstance(seg, Mapping):
            if require_segmentation:
                missing.append(r["image_id"])
            continue
        info = imgs.get(r["image_id"])
        if info is None:
            continue
        want = [int(info["height"]), int(info["width"])]
        if [int(v) for v in seg["size"]] != want:
            bad.append((r["image_id"], list(seg["size"]), want))
    if missing:
        raise ValueError(f"{len(missing)} results have no RLE 'segmentation' (first image ids: {missing[:5]}); "
                         "mask metrics need masks")
    if bad:
        first = "; ".join(f"image {i}: mask size {s} vs GT [h, w] {w}" for i, s, w in bad[:5])
        raise FrameMismatchError(f"{len(bad)} result masks are not in their GT image frame ({first})")


_RLE_CHUNK = 255  # pycocotools 2.0.11 + numpy 2: area()/toBbox() of > 255 RLEs at once raise OverflowError


def rle_area(rles: Sequence[Mapping]):
    """``maskUtils.area`` of a list of RLEs (any length), as an int64 array."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rles = list(rles)
    parts = [np.asarray(mask_utils.area(rles[i:i + _RLE_CHUNK])).reshape(-1)
             for i in range(0, len(rles), _RLE_CHUNK)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def rle_bbox(rles: Sequence[Mapping]):
    """``maskUtils.toBbox`` of a list of RLEs (any length): (N, 4) [x, y, w, h] float array (zeros if empty)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rles = list(rles)
    parts = [np.asarray(mask_utils.toBbox(rles[i:i + _RLE_CHUNK])).reshape(-1, 4)
             for i in range(0, len(rles), _RLE_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, 4))


def _sorted_ids(ids: Iterable) -> list:
    ids = list(dict.fromkeys(ids))  # unique, first-seen order
    try:
        return sorted(ids)
    except TypeError:
        return ids


def _requested_ids(gt, image_ids: Sequence | None, results) -> tuple[list, list[tuple[Any, str]]]:
    """(ids to evaluate, skipped): requested ids that are in the GT and were not skipped by the predictor.

    image_ids None: the images the predictor was given when ``results`` records them (``YoloPredictions``:
    ``image_ids`` + ``skipped``), else every GT image."""
    pred_skipped = dict(getattr(results, "skipped", []) or [])
    run_ids = getattr(results, "image_ids", None)
    run_ids = set(run_ids) if run_ids is not None else None
    if image_ids is None and run_ids is not None:
        image_ids = list(run_ids) + list(pred_skipped)
    requested = _sorted_ids(gt.getImgIds() if image_ids is None else image_ids)
    keep, skipped = [], []
    for i in requested:
        if i not in gt.imgs:
            skipped.append((i, "image id not in the GT json"))
        elif i in pred_skipped:
            skipped.append((i, f"not predicted: {pred_skipped[i]}"))
        elif run_ids is not None and i not in run_ids:
            skipped.append((i, "not predicted: not in the files given to the detector"))
        else:
            keep.append(i)
    return keep, skipped
