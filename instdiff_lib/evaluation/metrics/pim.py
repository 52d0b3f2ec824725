"""PiM, points-in-mask (spec §4.3; official ``eval/eval_pim.py``), vectorised.

Per image:

1. GT = ALL annotations of the image in file order (crowd ones too, no 30-instance cut), masks from the GT json
   (``annToRLE``); predictions = ALL results for the image (any class, any score).
2. Greedy class-agnostic matching in GT order: each GT takes the not-yet-used prediction with the highest mask
   IoU. The official threshold is 0.0 with ``best = -1``, so a GT is matched even at IoU 0 while unused
   predictions remain; ties go to the first prediction in results order; an undefined IoU (GT and prediction
   both empty, 0/0 = NaN in the official code) is never chosen. Unmatched GTs are not counted.
3. Point: a pair scores 1 if the predicted mask contains the GT point, the integer centre
   ``(int((xmin + xmax) / 2), int((ymin + ymax) / 2))`` of the tight box of the GT MASK (inclusive pixel
   indices), looked up as ``mask[y, x]`` (row = y). Scribble: the fraction of 20 random GT-mask pixels
   (without replacement, or with replacement when the mask has fewer than 20 pixels, as the official sampler)
   that lie in the predicted mask. Pairs whose GT mask is empty are not scored in either mode (they still
   consume a prediction in step 2, as in the official code).
4. Image score = mean over its scored pairs; PiM = mean over images with at least one scored pair.

Seeding: the official scribble sampling is unseeded; here image ``i`` draws from
``np.random.default_rng([seed, i])`` (integer ids), so a per-image score does not depend on which other images
are evaluated or in which order.

Vectorised: one ``maskUtils.iou`` call per image for the IoU matrix, ``maskUtils.toBbox`` for the GT boxes
(in chunks of 255: pycocotools 2.0.11's ``area``/``toBbox`` overflow on longer lists under numpy 2),
fancy indexing for the point/scribble lookups; the only Python loops are over GTs (matching) and pairs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from instdiff_lib.evaluation.metrics import (
    MetricResult,
    _requested_ids,
    check_result_frames,
    load_coco,
    load_results,
    results_by_image,
    rle_area,
    rle_bbox,
)

__all__ = ["pim", "greedy_match", "mask_center_points", "N_SCRIBBLE_POINTS"]

N_SCRIBBLE_POINTS = 20


def greedy_match(ious: np.ndarray) -> list[tuple[int, int]]:
    """Official greedy matching on an IoU matrix of shape (n_pred, n_gt): [(gt index, pred index)] in GT order.

    NaN entries are never chosen; IoU 0 is (threshold 0.0, best starts at -1); ties -> lowest pred index.
    """
    ious = np.asarray(ious, dtype=np.float64)
    n_pred, n_gt = ious.shape if ious.ndim == 2 else (0, 0)
    avail = np.where(np.isnan(ious), -np.inf, ious)
    pairs = []
    for g in range(n_gt):
        col = avail[:, g]
        p = int(np.argmax(col)) if n_pred else -1
        if p < 0 or col[p] == -np.inf:
            continue
        pairs.append((g, p))
        avail[p, :] = -np.inf  # used
    return pairs


def mask_center_points(rles: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, nonempty) of the integer centre of each mask's tight box: x = int((xmin + xmax) / 2) with
    inclusive pixel bounds (xmax = x0 + w - 1), same for y."""
    if not rles:
        z = np.zeros(0, dtype=np.int64)
        return z, z, np.zeros(0, dtype=bool)
    bb = rle_bbox(rles).astype(np.int64)  # x, y, w, h (0s if empty)
    nonempty = rle_area(rles) > 0
    x = (2 * bb[:, 0] + bb[:, 2] - 1) // 2  # floor == int() for the non-negative sums of non-empty masks
    y = (2 * bb[:, 1] + bb[:, 3] - 1) // 2
    return x, y, nonempty


def _image_rng(seed: int, image_id) -> np.random.Generator:
    key = int(image_id) if isinstance(image_id, (int, np.integer)) and image_id >= 0 else zlib.crc32(
        str(image_id).encode())
    return np.random.default_rng([int(seed), key])


def pim(gt_json, results, image_ids: Sequence | None = None, mode: str = "point", seed: int = 0) -> MetricResult:
    """Points-in-mask (module doc). ``mode`` = "point" or "scribble"; values: ``PiM`` (fraction).

    n_evaluated = images with >= 1 scored pair; every other requested image is in ``skipped`` with the reason
    (not in GT, not predicted, no GT annotation, no prediction, only empty GT masks matched).
    details: per_image scores, n_pairs (scored), n_gt, n_pred, n_unmatched_gt, n_empty_gt_pairs.
    """
    if mode not in ("point", "scribble"):
        raise ValueError(f"mode must be 'point' or 'scribble', got {mode!r}")
    gt = load_coco(gt_json)
    res_list = load_results(results)
    eval_ids, skipped = _requested_ids(gt, image_ids, results)
    by_img = results_by_image(res_list)
    check_result_frames(gt, [r for i in eval_ids for r in by_img.get(i, [])], require_segmentation=True)

    per_image: dict = {}
    n_pairs = n_gt_total = n_pred_total = n_unmatched = n_empty = 0
    for img_id in eval_ids:
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[img_id]))
        preds = by_img.get(img_id, [])
        n_gt_total += len(anns)
        n_pred_total += len(preds)
        if not anns:
            skipped.append((img_id, "no GT annotation"))
            continue
        if not preds:
            n_unmatched += len(anns)
            skipped.append((img_id, "no prediction"))
            continue
        gt_rles = [gt.annToRLE(a) for a in anns]
        pred_rles = [p["segmentation"] for p in preds]
        ious = np.asarray(mask_utils.iou(pred_rles, gt_rles, [0] * len(gt_rles)), dtype=np.float64)
        gt_area = rle_area(gt_rles)
        pred_area = rle_area(pred_rles)
        ious[(pred_area[:, None] == 0) & (gt_area[None, :] == 0)] = np.nan  # 0/0 in the official IoU
        pairs = greedy_match(ious)
        n_unmatched += len(anns) - len(pairs)
        pairs = [(g, p) for g, p in pairs if gt_area[g] > 0]
        n_empty += sum(1 for g in range(len(anns)) if gt_area[g] == 0)
        if not pairs:
            skipped.append((img_id, "no scorable pair (matched GT masks are empty)"))
            continue
        g_idx = np.array([g for g, _ in pairs])
        p_idx = np.array([p for _, p in pairs])
        pred_masks = mask_utils.decode([pred_rles[p] for p in p_idx])  # (H, W, K)
        k = np.arange(len(pairs))
        if mode == "point":
            x, y, _ = mask_center_points([gt_rles[g] for g in g_idx])
            scores = pred_masks[y, x, k].astype(np.float64)  # row = y, column = x
        else:
            rng = _image_rng(seed, img_id)
            gt_masks = mask_utils.decode([gt_rles[g] for g in g_idx])  # (H, W, K)
            scores = np.empty(len(pairs))
            for j in range(len(pairs)):
                ys, xs = np.nonzero(gt_masks[:, :, j])  # row-major pixel order, as np.nonzero in the official
                sel = rng.choice(len(ys), N_SCRIBBLE_POINTS, replace=len(ys) < N_SCRIBBLE_POINTS)
                scores[j] = pred_masks[ys[sel], xs[sel], j].mean()
        per_image[img_id] = float(scores.mean())
        n_pairs += len(pairs)

    values = {"PiM": float(np.mean(list(per_image.values()))) if per_image else float("nan")}
    details = {"mode": mode, "seed": seed, "per_image": per_image, "n_pairs": n_pairs, "n_gt": n_gt_total,
               "n_pred": n_pred_total, "n_unmatched_gt": n_unmatched, "n_empty_gt_masks": n_empty}
    return MetricResult(values, len(per_image), len(skipped), skipped, details)
