"""Detector-based scores of generated images (spec §4.2): YOLO -> COCO results -> COCOeval AP/AR, mask IoU.

Protocol. The paper runs ``yolo val segment model=yolov8m-seg.pt data=coco.yaml`` (ultralytics 8.0.119) on a
COCO folder whose ``val2017`` was swapped for the generated images, and scores ``predictions.json`` with
pycocotools against the 512x512 GT json. That folder swap is how an earlier reproduction ended up scoring the
*real* photos (shared/spec/prior_reproductions.md §0). Here the detector never sees a dataset folder: it gets an
explicit list of ``(image_id, path)`` and each result carries the id it was given.

:func:`yolo_predict` reproduces what ``yolo val`` does to each image, with ultralytics' own building blocks
(``LetterBox``, ``AutoBackend``, ``non_max_suppression``, ``process_mask_native``), not ``model.predict``:

=========================  =====================================================  ====================================
step                       ``yolo val`` (the protocol, what we do)                ``model.predict`` (not used)
=========================  =====================================================  ====================================
resize                     long side -> imgsz (cv2 INTER_LINEAR), then letterbox  one letterbox resize
canvas                     "rect" batches: images sorted by aspect ratio, each    smallest stride multiple (512² ->
                           batch padded to ceil(shape*imgsz/stride + 0.5)*stride  640x640)
                           (512² -> 640 content centred in a 672x672 canvas)
NMS                        multi-label (a box may be kept for several classes),   best class only
                           conf 0.001, IoU 0.7, max_det 300
masks                      prototype logits upsampled to the input, > 0, cropped  masks with no pixel are dropped
                           to the box; kept even if empty
=========================  =====================================================  ====================================

Apart from the two points below, the rows are those of ``yolo val``'s predictions.json with the installed
ultralytics 8.4.190 (tests/test_detection.py runs both and compares them row by row, RLE included). Two deliberate
differences from that validator, both towards 8.0.119 (the paper's pin):

* masks are brought back to the original frame by cropping the exact letterbox content, bilinear interpolation
  and a 0.5 threshold, the intent of 8.0.119's ``scale_image`` (a cv2 resize of the 0/1 uint8 stack);
  8.4.190 interpolates in float and truncates with ``.byte()``, which keeps only pixels whose interpolated value
  is exactly 1 and erodes every mask edge by up to one pixel (``mask_resize="ultralytics"`` selects that);
* NMS runs without ultralytics' wall-clock time limit (which can silently truncate a slow CPU batch).

Results follow ultralytics' ``predictions.json``: bbox ``[x, y, w, h]`` rounded to 3 decimals, score to 5,
category via ``class_map`` (80 COCO classes -> 91-id COCO categories by default), mask as compressed RLE at the
original image size with ``counts`` as str.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from instdiff_lib.evaluation.metrics import (
    MetricResult,
    _requested_ids,
    check_result_frames,
    load_coco,
    load_results,
    results_by_image,
)

__all__ = [
    "PROTOCOL",
    "COCO_STATS",
    "YoloPredictions",
    "load_yolo",
    "yolo_predict",
    "rect_batches",
    "letterbox_to_coco",
    "results_to_frame",
    "rle_encode",
    "coco_ap",
    "mask_iou",
]

# Detector settings of the official evaluation (ultralytics val defaults, spec §4.2).
PROTOCOL = {"imgsz": 640, "conf": 0.001, "iou": 0.7, "max_det": 300, "batch": 16}
RECT_PAD = 0.5  # val pads rect batch shapes by half a stride (ultralytics build_yolo_dataset, mode != "train")
NMS_NO_TIME_LIMIT = 1e9  # seconds per image: never stop NMS early
# COCOeval.stats[0..8]
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


class YoloPredictions(list):
    """COCO results (a ``list`` of dicts) plus what was run: ``image_ids`` (processed, possibly with no
    detection), ``skipped`` ([(image_id, reason)] of files that could not be read) and ``settings``.
    ``coco_ap`` / ``mask_iou`` / ``pim`` read ``skipped`` and report those images as skipped.
    """

    def __init__(self, rows=(), *, image_ids=(), skipped=(), settings=None):
        super().__init__(rows)
        self.image_ids = list(image_ids)
        self.skipped = list(skipped)
        self.settings = dict(settings or {})


# ----------------------------------------------------------------------------------------------------------
# model


def load_yolo(spec):
    """An ``ultralytics.YOLO`` from a YOLO object (returned as is), a ``.yaml`` config (a bundled name such as
    ``"yolov8n-seg.yaml"`` builds a randomly initialised model), or a local weights file.

    Never downloads: a weights name that is not a local file raises ``FileNotFoundError`` (ultralytics would
    try GitHub). Sets the offline environment first if ultralytics is not imported yet.
    """
    if "ultralytics" not in sys.modules:
        from instdiff_lib.offline import setup_offline_env

        setup_offline_env()
    from ultralytics import YOLO

    if isinstance(spec, YOLO):
        return spec
    s = os.fspath(spec)
    if Path(s).suffix.lower() in (".yaml", ".yml"):
        return YOLO(s)
    if Path(s).is_file():
        return YOLO(s)
    raise FileNotFoundError(
        f"YOLO weights {s!r} not found locally, and this project never downloads them (ultralytics would fetch "
        f"{Path(s).name!r} from its GitHub assets release). On a machine with internet run "
        f"`python -c \"from ultralytics import YOLO; YOLO('{Path(s).name}')\"` (it saves the file in the working "
        "directory), copy the file here and pass its path. For tests, build a random model from its config, "
        "e.g. load_yolo('yolov8n-seg.yaml').")


def _resolve_class_map(class_map, names: Mapping[int, str]) -> Mapping[int, int] | Sequence[int]:
    nc = len(names)
    if class_map is None:
        class_map = "coco80" if nc == 80 else "index+1"
    if isinstance(class_map, str):
        if class_map == "coco80":
            if nc != 80:
                raise ValueError(f"class_map='coco80' needs an 80-class model, this one has {nc} classes")
            from ultralytics.data.converter import coco80_to_coco91_class

            return coco80_to_coco91_class()
        if class_map == "index+1":
            return list(range(1, nc + 1))
        raise ValueError(f"class_map must be None, 'coco80', 'index+1', a list or a dict, got {class_map!r}")
    return class_map


def _map_class(class_map, c: int) -> int:
    try:
        return int(class_map[c])
    except (KeyError, IndexError):
        raise ValueError(f"class index {c} has no entry in class_map") from None


def _make_backend(yolo, device: str, half: bool):
    """The model as ``yolo val`` runs it: AutoBackend (conv+BN fused) in eval mode, on a copy of the module."""
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    backend = AutoBackend(model=copy.deepcopy(yolo.model), device=torch.device(device), fp16=half, fuse=True,
                          verbose=False)
    backend.eval()
    return backend


# ----------------------------------------------------------------------------------------------------------
# geometry


def rect_batches(shapes_hw: Sequence[tuple[int, int]], batch: int, imgsz: int, stride: int,
                 pad: float = RECT_PAD) -> list[tuple[list[int], tuple[int, int]]]:
    """``yolo val``'s rectangular batches: [(indices into shapes_hw, canvas (h, w))].

    Images are sorted by aspect ratio h/w and cut into batches of ``batch``; a batch whose ratios are all < 1
    gets canvas ratio [max, 1], all > 1 gets [1, 1/min], otherwise [1, 1]; the canvas is
    ceil(ratio * imgsz / stride + pad) * stride.
    """
    if not shapes_hw:
        return []
    s = np.asarray(shapes_hw, dtype=np.float64)
    ar = s[:, 0] / s[:, 1]
    order = np.argsort(ar, kind="stable")
    out = []
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        lo, hi = ar[idx].min(), ar[idx].max()
        ratio = [hi, 1.0] if hi < 1 else ([1.0, 1.0 / lo] if lo > 1 else [1.0, 1.0])
        canvas = np.ceil(np.array(ratio) * imgsz / stride + pad).astype(int) * int(stride)
        out.append(([int(i) for i in idx], (int(canvas[0]), int(canvas[1]))))
    return out


def _val_letterbox(img: np.ndarray, imgsz: int, canvas_hw: tuple[int, int]):
    """(letterboxed image, ratio_pad) exactly as ``yolo val`` loads an image: resize the long side to imgsz
    (cv2 INTER_LINEAR; ultralytics BaseDataset.load_image), then LetterBox(scaleup=False) centred in the batch
    canvas. ratio_pad = ((gain_h, gain_w), (pad_left, pad_top)) maps input pixels back to the original frame."""
    import cv2
    from ultralytics.data.augment import LetterBox

    h0, w0 = img.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        w, h = min(math.ceil(w0 * r), imgsz), min(math.ceil(h0 * r), imgsz)
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    h, w = img.shape[:2]
    labels = LetterBox(new_shape=(imgsz, imgsz), scaleup=False)(
        labels={"img": img, "rect_shape": canvas_hw, "ratio_pad": (h / h0, w / w0)})
    return labels["img"], labels["ratio_pad"]


def _masks_to_original(masks, ratio_pad, orig_hw: tuple[int, int], mode: str = "threshold"):
    """(N, H_in, W_in) 0/1 masks on the letterboxed input (torch, any device) -> (N, h0, w0) uint8 0/1 masks in the
    original frame, on the same device.

    "threshold" (default; what 8.0.119's ``scale_image`` meant to do): crop the letterbox content, bilinear
    interpolation (half-pixel centres, no antialiasing) to the original size, keep values >= 0.5.
    "ultralytics" (the installed 8.4.190 validator): ``ops.scale_masks`` then ``.byte()``, which truncates, so only
    pixels interpolated to exactly 1 survive and mask edges lose up to one pixel.
    (8.0.119 resized the uint8 stack with cv2 INTER_LINEAR; OpenCV 5's uint8 path does not round like the float
    interpolation, e.g. a 0.625 pixel becomes 0, so cv2 is not used as the reference here.)"""
    import torch
    import torch.nn.functional as F

    masks = torch.as_tensor(masks)
    if mode == "ultralytics":
        from ultralytics.utils import ops

        return ops.scale_masks(masks.to(torch.uint8)[None], orig_hw, ratio_pad=ratio_pad)[0].byte()
    if mode != "threshold":
        raise ValueError(f"mask_resize must be 'threshold' or 'ultralytics', got {mode!r}")
    (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    h0, w0 = orig_hw
    top, left = int(round(pad_h)), int(round(pad_w))
    bottom, right = top + max(round(h0 * gain_h), 1), left + max(round(w0 * gain_w), 1)
    content = masks[:, top:bottom, left:right]
    out = torch.empty((len(masks), h0, w0), dtype=torch.uint8, device=masks.device)
    for s in range(0, len(masks), 32):  # bounded float intermediate
        c = content[s:s + 32].float()[None]
        if c.shape[-2:] != (h0, w0):
            c = F.interpolate(c, size=(h0, w0), mode="bilinear", align_corners=False)
        out[s:s + 32] = (c[0] >= 0.5).to(torch.uint8)
    return out


def rle_encode(masks) -> list[dict]:
    """(N, H, W) 0/1 masks (torch on any device, or numpy) -> COCO compressed RLEs with ``counts`` as str.

    Run boundaries are found on the masks' device; only their positions travel to the CPU, where pycocotools
    compresses the counts (``frPyObjects`` of uncompressed RLE), so the result equals ``maskUtils.encode``.
    """
    import torch

    masks = torch.as_tensor(masks)
    n, h, w = masks.shape
    if n == 0:
        return []
    flat = masks.transpose(1, 2).reshape(n, h * w) != 0  # column-major, as COCO RLE
    rows, pos = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
    rows, pos = rows.cpu().numpy(), pos.cpu().numpy() + 1
    first = flat[:, 0].cpu().numpy()
    bounds = np.searchsorted(rows, np.arange(n + 1))
    objs = []
    for i in range(n):
        edges = np.concatenate(([0], pos[bounds[i]:bounds[i + 1]], [h * w]))
        counts = np.diff(edges).tolist()
        objs.append({"size": [h, w], "counts": ([0] + counts) if first[i] else counts})
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
            for r in mask_utils.frPyObjects(objs, h, w)]


def letterbox_to_coco(image_id, boxes_xyxy, scores, classes, masks, ratio_pad, orig_hw: tuple[int, int],
                      class_map, mask_resize: str = "threshold") -> list[dict]:
    """Detections on the letterboxed input -> COCO result dicts in the ORIGINAL image frame.

    boxes_xyxy: (N, 4) input-frame pixels; scores, classes: (N,); masks: (N, H_in, W_in) 0/1 (torch or numpy)
    or None; ratio_pad = ((gain_h, gain_w), (pad_left, pad_top)): input = original * gain + pad.
    Boxes are un-padded, divided by the gain and clipped to the image (ultralytics ``scale_boxes``).
    """
    # float32, in ultralytics' order of operations (scale_boxes, xyxy2xywh, centre -> corner), so the rounded
    # numbers are the ones `yolo val` writes
    b = np.array(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    classes = np.asarray(classes).reshape(-1)
    (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    h0, w0 = orig_hw
    b[:, [0, 2]] = ((b[:, [0, 2]] - np.float32(pad_w)) / np.float32(gain_w)).clip(0, w0)
    b[:, [1, 3]] = ((b[:, [1, 3]] - np.float32(pad_h)) / np.float32(gain_h)).clip(0, h0)
    wh = b[:, 2:] - b[:, :2]
    xy = (b[:, :2] + b[:, 2:]) / np.float32(2) - wh / np.float32(2)
    rles = None
    if masks is not None:
        rles = rle_encode(_masks_to_original(masks, ratio_pad, orig_hw, mask_resize))
    rows = []
    for k in range(len(b)):
        row = {
            "image_id": image_id,
            "category_id": _map_class(class_map, int(classes[k])),
            "bbox": [round(float(v), 3) for v in (xy[k, 0], xy[k, 1], wh[k, 0], wh[k, 1])],
            "score": round(float(scores[k]), 5),
        }
        if rles is not None:
            row["segmentation"] = rles[k]
        rows.append(row)
    return rows


def results_to_frame(preds: "YoloPredictions", frames: Mapping[Any, tuple[tuple[int, int], tuple[int, int]]]
                     ) -> "YoloPredictions":
    """Detections made on the original photos, mapped into another pixel frame the way ``resize_instances`` maps the
    ground truth: ``frames[image_id] = ((h0, w0), (h, w))``; boxes scaled by (w / w0, h / h0), masks resized with the
    nearest pixel centre. Axis-aligned scaling keeps box IoUs exactly, so AP in the new frame is the detector's AP on
    the photos (the real-image control: YOLO sees each photo at its own aspect ratio, as in its published numbers)."""
    import torch

    by_img: dict[Any, list[dict]] = {}
    for r in preds:
        by_img.setdefault(r["image_id"], []).append(dict(r))
    out = []
    for image_id, rows in by_img.items():
        (h0, w0), (h, w) = frames[image_id]
        sx, sy = w / w0, h / h0
        for r in rows:
            x, y, bw, bh = r["bbox"]
            r["bbox"] = [round(x * sx, 3), round(y * sy, 3), round(bw * sx, 3), round(bh * sy, 3)]
        segs = [r["segmentation"] for r in rows if "segmentation" in r]
        if segs:
            masks = mask_utils.decode([{"size": s["size"], "counts": s["counts"].encode("ascii")} for s in segs])
            ri = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(np.int64), h0 - 1)
            ci = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(np.int64), w0 - 1)
            resized = torch.from_numpy(np.ascontiguousarray(masks[ri][:, ci].transpose(2, 0, 1)))
            for r, rle in zip((r for r in rows if "segmentation" in r), rle_encode(resized)):
                r["segmentation"] = rle
        out.extend(rows)
    return YoloPredictions(out, image_ids=preds.image_ids, skipped=preds.skipped,
                           settings={**preds.settings, "frame": "mapped from each photo to the ground-truth frame"})


def _image_size(path: Path) -> tuple[int, int]:
    """(h, w) from the file header, EXIF orientation applied (cv2 decodes rotated images upright)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        with contextlib.suppress(Exception):
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w
    return h, w


# ----------------------------------------------------------------------------------------------------------
# inference


def yolo_predict(model, files: Sequence[tuple[Any, str | os.PathLike]], *, imgsz: int = PROTOCOL["imgsz"],
                 conf: float = PROTOCOL["conf"], iou: float = PROTOCOL["iou"], max_det: int = PROTOCOL["max_det"],
                 batch: int = PROTOCOL["batch"], device: str = "cpu", class_map=None, half: bool = False,
                 mask_resize: str = "threshold", progress: bool = False) -> YoloPredictions:
    """Run a YOLO detector/segmenter over ``files`` = [(image_id, path)] the way ``yolo val`` does (module doc).

    model: an ``ultralytics.YOLO``, a ``.yaml`` config or a local weights path (:func:`load_yolo`).
    class_map: model class index -> COCO category id. None: ultralytics' coco80->coco91 table for an 80-class
    model (the COCO protocol), else index + 1. Also 'coco80', 'index+1', a list or a dict.
    half: fp16 (GPU only; the protocol is fp32).
    mask_resize: "threshold" (default: bilinear, >= 0.5, as 8.0.119 intended) or "ultralytics" (the installed
    8.4.190 validator's truncation); with "ultralytics" the rows equal ``yolo val``'s predictions.json (minus its
    ``file_name``), which tests/test_detection.py checks.

    Returns a :class:`YoloPredictions` (a list of COCO result dicts, module doc) with ``image_ids`` (every
    file that was run, detections or not) and ``skipped`` (missing / unreadable files, with the reason).
    """
    import torch
    import torchvision  # noqa: F401 -- once imported, ultralytics' NMS uses torchvision.ops.nms (as 8.0.119 always
    from ultralytics.utils import nms, ops  # did) instead of a pure-torch loop that is ~100x slower on CPU
    from ultralytics.utils.patches import imread

    if mask_resize not in ("threshold", "ultralytics"):
        raise ValueError(f"mask_resize must be 'threshold' or 'ultralytics', got {mask_resize!r}")
    yolo = load_yolo(model)
    counts = Counter(i for i, _ in files)
    dup = [i for i, c in counts.items() if c > 1]
    if dup:
        raise ValueError(f"duplicate image ids in files: {dup[:5]}")
    names = yolo.names
    task = yolo.task
    if task not in ("segment", "detect"):
        raise ValueError(f"need a detect or segment model, got task {task!r}")
    seg = task == "segment"
    cmap = _resolve_class_map(class_map, names)
    stride = int(max(yolo.model.stride.max().item(), 32)) if hasattr(yolo.model, "stride") else 32
    end2end = bool(getattr(yolo.model, "end2end", False))

    skipped: list[tuple[Any, str]] = []
    ok: list[tuple[Any, Path, tuple[int, int]]] = []
    for image_id, path in files:
        p = Path(path)
        if not p.is_file():
            skipped.append((image_id, f"file not found: {p}"))
            continue
        try:
            ok.append((image_id, p, _image_size(p)))
        except Exception as e:  # noqa: BLE001 -- any decoder error means "unreadable"
            if isinstance(e, ImportError) and e.__context__ is not None:  # ultralytics' HEIF fallback for PIL.open
                e = e.__context__
            skipped.append((image_id, f"unreadable image {p}: {type(e).__name__}: {e}"))

    backend = _make_backend(yolo, device, half) if ok else None
    batches = rect_batches([s for _, _, s in ok], batch, imgsz, stride)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="yolo", unit="batch")
    per_index: dict[int, list[dict]] = {}
    for idxs, canvas in it:
        ims, metas = [], []
        for k in idxs:
            image_id, p, _ = ok[k]
            im = imread(p)  # BGR, as the val dataloader reads it
            if im is None:
                skipped.append((image_id, f"unreadable image {p}: cv2 could not decode it"))
                continue
            lb, ratio_pad = _val_letterbox(im, imgsz, canvas)
            ims.append(lb)
            metas.append((k, image_id, im.shape[:2], ratio_pad))
        if not ims:
            continue
        x = np.ascontiguousarray(np.stack(ims)[..., ::-1].transpose(0, 3, 1, 2))  # BGR -> RGB, BHWC -> BCHW
        x = torch.from_numpy(x).to(device)
        x = (x.half() if half else x.float()) / 255
        with torch.inference_mode():
            preds = backend(x)
            if seg:
                proto = preds[0][1] if isinstance(preds[0], tuple) else preds[1]
                preds = preds[0]
            dets = nms.non_max_suppression(preds, conf, iou, nc=len(names) if seg else 0, multi_label=True,
                                           agnostic=False, max_det=max_det, end2end=end2end,
                                           max_time_img=NMS_NO_TIME_LIMIT)
            input_hw = tuple(x.shape[2:])
            for j, (k, image_id, orig_hw, ratio_pad) in enumerate(metas):
                d = dets[j]
                masks = None
                if seg:  # stays on the device until the RLE run boundaries
                    masks = ops.process_mask_native(proto[j], d[:, 6:], d[:, :4], input_hw)
                per_index[k] = letterbox_to_coco(image_id, d[:, :4].float().cpu().numpy(),
                                                 d[:, 4].float().cpu().numpy(), d[:, 5].cpu().numpy(), masks,
                                                 ratio_pad, orig_hw, cmap, mask_resize)
    rows = [r for k in sorted(per_index) for r in per_index[k]]
    import ultralytics

    settings = {"imgsz": imgsz, "conf": conf, "iou": iou, "max_det": max_det, "batch": batch, "device": device,
                "half": half, "mask_resize": mask_resize, "task": task, "nc": len(names), "multi_label_nms": True,
                "rect_pad": RECT_PAD, "ultralytics": ultralytics.__version__,
                "class_map": class_map if isinstance(class_map, str) or class_map is None else "custom"}
    return YoloPredictions(rows, image_ids=[ok[k][0] for k in sorted(per_index)], skipped=skipped,
                           settings=settings)


# ----------------------------------------------------------------------------------------------------------
# scores


def _empty_results_coco(gt):
    """A results COCO with no detections (pycocotools' loadRes cannot take an empty list)."""
    from pycocotools.coco import COCO

    dt = COCO()
    dt.dataset = {"images": list(gt.dataset.get("images", [])), "categories": copy.deepcopy(gt.dataset.get(
        "categories", [])), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def coco_ap(gt_json, results, iou_type: str = "bbox", image_ids: Sequence | None = None) -> MetricResult:
    """pycocotools COCOeval (``bbox`` or ``segm``) restricted to ``image_ids`` (default: every GT image).

    values: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100 = ``COCOeval.stats[0..8]`` (the paper's "AR" is
    AR100), as fractions; COCOeval's -1 (no GT in that area range) becomes NaN. No detections at all -> AP = AR = 0
    where there is GT.
    Skipped: requested ids not in the GT json, and ids the predictor could not read (``results.skipped``).
    An image that was run but has no detection is evaluated (its GT counts as missed).
    Results for images outside the evaluated ids are left out and counted in ``details``.
    As in the official pipeline, a result with both ``bbox`` and ``segmentation`` keeps pycocotools' ``loadRes``
    behaviour: its ``area`` is the box area (used for the small/medium/large split of detections).
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    gt = load_coco(gt_json)
    res_list = load_results(results)
    eval_ids, skipped = _requested_ids(gt, image_ids, results)
    keep = set(eval_ids)
    dets = [dict(r) for r in res_list if r["image_id"] in keep]  # loadRes writes into the dicts: copy them
    details = {"iou_type": iou_type, "n_results": len(dets), "n_results_outside": len(res_list) - len(dets),
               "n_images_without_results": len(keep - {r["image_id"] for r in dets})}
    if iou_type == "segm":
        check_result_frames(gt, dets, require_segmentation=True)
    if not eval_ids:
        nan = float("nan")
        return MetricResult({k: nan for k in COCO_STATS}, 0, len(skipped), skipped,
                            {**details, "note": "no image to evaluate"})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dt = gt.loadRes(dets) if dets else _empty_results_coco(gt)
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = list(eval_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    values = {k: (s if s >= 0 else float("nan")) for k, s in zip(COCO_STATS, stats)}
    details["stats"] = stats  # raw COCOeval.stats (-1 kept)
    details["summary"] = "\n".join(line for line in out.getvalue().splitlines() if line.startswith(" Average"))
    return MetricResult(values, len(eval_ids), len(skipped), skipped, details)


def mask_iou(gt_json, results, image_ids: Sequence | None = None, *, max_instances: int = 30,
             min_score: float = 0.0) -> MetricResult:
    """The paper's mask "IoU" column (its code has no scorer; this is our definition).

    For every GT instance among the first ``max_instances`` annotations of an image (file order, the instances
    the generator was conditioned on) that is not a crowd annotation: the IoU between its GT mask and the
    best-overlapping predicted mask of the same category with score >= ``min_score`` (0 if there is none).
    values: ``IoU`` = mean over all such instances; ``IoU_image`` = mean over images of the per-image mean.
    With the protocol's conf 0.001 detections this is a best-case overlap (any low-score mask can be the best).
    Images with no such GT instance are skipped; images without predictions are scored (IoU 0).
    """
    gt = load_coco(gt_json)
    res_list = load_results(results)
    eval_ids, skipped = _requested_ids(gt, image_ids, results)
    by_img = results_by_image(r for r in res_list if r.get("score", 1.0) >= min_score)
    check_result_frames(gt, [r for i in eval_ids for r in by_img.get(i, [])], require_segmentation=True)
    per_instance, per_image = [], {}
    for img_id in eval_ids:
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[img_id]))[:max_instances] if not a.get("iscrowd", 0)]
        if not anns:
            skipped.append((img_id, "no non-crowd GT instance"))
            continue
        gt_rles = [gt.annToRLE(a) for a in anns]
        preds = by_img.get(img_id, [])
        best = np.zeros(len(anns))
        if preds:
            ious = np.asarray(mask_utils.iou([p["segmentation"] for p in preds], gt_rles, [0] * len(anns)))
            same = (np.array([p["category_id"] for p in preds])[:, None]
                    == np.array([a["category_id"] for a in anns])[None, :])
            best = np.where(same, ious, 0.0).max(axis=0)
        per_instance.extend(best.tolist())
        per_image[img_id] = float(best.mean())
    nan = float("nan")
    values = {"IoU": float(np.mean(per_instance)) if per_instance else nan,
              "IoU_image": float(np.mean(list(per_image.values()))) if per_image else nan}
    details = {"n_instances": len(per_instance), "per_image": per_image, "max_instances": max_instances,
               "min_score": min_score}
    return MetricResult(values, len(per_image), len(skipped), skipped, details)
