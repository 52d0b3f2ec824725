"""PiM (points-in-mask, spec §4.3): identity, a loop-by-loop re-statement of the official scorer, x/y orientation,
greedy-matching quirks, scribble seeding."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from instdiff_lib.evaluation.metrics.pim import greedy_match, mask_center_points, pim

# pycocotools 2.0.11 under numpy 2 warns inside maskUtils.decode (its __array__ lacks `copy`); not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def rect_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def make_gt(images):
    """images: {image_id: (h, w, [(cat, mask, iscrowd)])} -> COCO dict."""
    imgs, anns = [], []
    for img_id, (h, w, items) in images.items():
        imgs.append({"id": img_id, "height": h, "width": w, "file_name": f"{img_id}.png"})
        for cat, m, crowd in items:
            ys, xs = np.nonzero(m)
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)] if len(xs) else [0, 0, 0, 0]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "iscrowd": crowd,
                         "area": int(m.sum()), "bbox": bbox, "segmentation": rle(m)})
    return {"images": imgs, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}


def pred(img_id, mask, cat=1, score=0.5):
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)] if len(xs) else [0.0] * 4
    return {"image_id": img_id, "category_id": cat, "bbox": bbox, "score": score, "segmentation": rle(mask)}


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(5)
    images = {}
    for img_id in range(1, 6):
        h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        items = []
        for k in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 12))
            x1, y1 = x0 + int(rng.integers(3, 12)), y0 + int(rng.integers(3, 12))
            items.append((int(rng.integers(1, 4)), rect_mask(h, w, x0, y0, x1, y1), int(k == 3)))
        images[img_id] = (h, w, items)
    return make_gt(images)


def gt_as_predictions(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in gt["annotations"]]


def perturb(gt, seed=1):
    rng = np.random.default_rng(seed)
    hw = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        if rng.uniform() < 0.2:
            continue  # missed instance
        m = mask_utils.decode(a["segmentation"])
        m = np.roll(np.roll(m, int(rng.integers(-4, 5)), 0), int(rng.integers(-4, 5)), 1)
        if m.any():
            out.append(pred(a["image_id"], m, cat=int(rng.integers(1, 4)), score=float(rng.uniform())))
    for img_id, (h, w) in hw.items():
        if img_id == 5:
            continue  # an image without any prediction
        for _ in range(2):  # spurious masks
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            out.append(pred(img_id, rect_mask(h, w, x0, y0, x0 + 6, y0 + 6), score=float(rng.uniform())))
    return [r for r in out if r["image_id"] != 5]


# ---- a loop-by-loop statement of the official eval_pim.py (decoded masks, Python IoU) ---------------------


def official_like(gt, results, mode, sampler=None):
    per_image = []
    for im in sorted(gt["images"], key=lambda x: x["id"]):
        gts = [mask_utils.decode(a["segmentation"]) for a in gt["annotations"] if a["image_id"] == im["id"]]
        prs = [mask_utils.decode(r["segmentation"]) for r in results if r["image_id"] == im["id"]]
        used, pairs = [], []
        for gi, g in enumerate(gts):
            best, best_j = -1.0, -1
            for j, p in enumerate(prs):
                if j in used:
                    continue
                union = np.logical_or(g, p).sum()
                iou = np.logical_and(g, p).sum() / union if union else float("nan")
                if iou > best:
                    best, best_j = iou, j
            if best >= 0.0:
                pairs.append((gi, best_j))
                used.append(best_j)
        accs = []
        for gi, j in pairs:
            g, p = gts[gi], prs[j]
            ys, xs = np.where(g == 1)
            if len(xs) == 0:
                continue
            if mode == "point":
                cx, cy = int((xs.min() + xs.max()) / 2), int((ys.min() + ys.max()) / 2)
                accs.append(1.0 if p[cy, cx] == 1 else 0.0)
            else:
                pts = sampler(im["id"], g)
                accs.append(np.mean([p[y, x] for x, y in pts]))
        if accs:
            per_image.append(np.mean(accs))
    return float(np.mean(per_image)), len(per_image)


# ---- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["point", "scribble"])
def test_gt_as_predictions_is_1(world, mode):
    r = pim(world, gt_as_predictions(world), [1, 2, 3, 4, 5], mode=mode)
    assert r.values["PiM"] == 1.0
    assert r.n_evaluated == 5 and r.n_skipped == 0
    assert r.details["n_pairs"] == len(world["annotations"]) and r.details["n_unmatched_gt"] == 0


def test_point_matches_official_statement(world):
    res = perturb(world)
    want, n_img = official_like(world, res, "point")
    r = pim(world, res, [1, 2, 3, 4, 5], mode="point")
    assert r.values["PiM"] == pytest.approx(want, abs=1e-12)
    assert r.n_evaluated == n_img == 4
    assert r.skipped == [(5, "no prediction")]
    assert 0.1 < want < 0.95


def test_scribble_matches_official_statement_and_is_seeded(world):
    res = perturb(world)

    # the documented draw: one stream per image, rng([seed, image_id]), consumed in pair (GT) order,
    # 20 pixels without replacement (with replacement below 20 pixels), row-major pixel order
    streams = {}

    def stream_sampler(img_id, g):
        rng = streams.setdefault(img_id, np.random.default_rng([0, img_id]))
        ys, xs = np.nonzero(g)
        sel = rng.choice(len(ys), 20, replace=len(ys) < 20)
        return list(zip(xs[sel], ys[sel]))

    want, _ = official_like(world, res, "scribble", stream_sampler)
    a = pim(world, res, [1, 2, 3, 4, 5], mode="scribble", seed=0)
    b = pim(world, res, [1, 2, 3, 4, 5], mode="scribble", seed=0)
    c = pim(world, res, [1, 2, 3, 4, 5], mode="scribble", seed=1)
    assert a.values["PiM"] == pytest.approx(want, abs=1e-12)
    assert a.values == b.values and a.details["per_image"] == b.details["per_image"]
    assert c.values["PiM"] != a.values["PiM"]
    # a per-image score does not depend on which other images are scored
    sub = pim(world, res, [3], mode="scribble", seed=0)
    assert sub.details["per_image"][3] == a.details["per_image"][3]


def test_point_lookup_is_row_y_col_x():
    """A tall thin vertical bar far from the diagonal: centre (x=51, y=19). mask[y, x] is inside the bar;
    the swapped lookup mask[x, y] = row 51, column 19 is background, so an x/y swap scores 0."""
    h = w = 60
    bar = rect_mask(h, w, 50, 2, 53, 38)  # columns 50..52, rows 2..37
    cover = rect_mask(h, w, 48, 0, 56, 40)
    gt = make_gt({1: (h, w, [(1, bar, 0)])})
    x, y, nonempty = mask_center_points([gt["annotations"][0]["segmentation"]])
    assert (int(x[0]), int(y[0]), bool(nonempty[0])) == (51, 19, True)
    assert cover[19, 51] == 1 and cover[51, 19] == 0  # the swap would miss
    r = pim(gt, [pred(1, cover)], [1], mode="point")
    assert r.values["PiM"] == 1.0
    assert pim(gt, [pred(1, cover)], [1], mode="scribble").values["PiM"] == 1.0


def test_center_points_match_np_where(world):
    rles = [a["segmentation"] for a in world["annotations"]]
    x, y, _ = mask_center_points(rles)
    for k, r in enumerate(rles):
        ys, xs = np.where(mask_utils.decode(r) == 1)
        assert (x[k], y[k]) == (int((xs.min() + xs.max()) / 2), int((ys.min() + ys.max()) / 2))


def test_greedy_takes_iou_zero_and_first_tie():
    # GT 0 overlaps nothing but is first: it takes the only prediction at IoU 0, GT 1 stays unmatched
    assert greedy_match(np.array([[0.0, 0.8]])) == [(0, 0)]
    # ties -> first prediction; used predictions are not reused; NaN never chosen
    assert greedy_match(np.array([[0.5, 0.5], [0.5, 0.9]])) == [(0, 0), (1, 1)]
    assert greedy_match(np.array([[np.nan], [0.0]])) == [(0, 1)]
    assert greedy_match(np.zeros((0, 3))) == []


def test_iou_zero_steal_and_empty_gt_masks():
    h = w = 40
    a, b = rect_mask(h, w, 2, 2, 10, 10), rect_mask(h, w, 20, 20, 30, 30)
    gt = make_gt({1: (h, w, [(1, a, 0), (1, b, 0)])})
    r = pim(gt, [pred(1, b)], [1], mode="point")  # GT a (first) steals the prediction that covers b
    assert r.values["PiM"] == 0.0 and r.details["n_unmatched_gt"] == 1
    # an empty GT mask is matched (consumes a prediction) but not scored
    gt2 = make_gt({1: (h, w, [(1, np.zeros((h, w), np.uint8), 0), (1, b, 0)])})
    r2 = pim(gt2, [pred(1, a), pred(1, b)], [1], mode="point")
    assert r2.values["PiM"] == 1.0 and r2.details["n_pairs"] == 1 and r2.details["n_empty_gt_masks"] == 1
    r3 = pim(gt2, [pred(1, b)], [1], mode="scribble")  # the empty GT takes the only prediction: nothing scored
    assert r3.n_evaluated == 0 and "no scorable pair" in r3.skipped[0][1]


def test_shapes_gt_as_predictions(tmp_path):
    """On occluded Shapes the GT point can fall outside its own mask: point PiM of the GT is the fraction of
    masks that contain their box centre (per-image mean), scribble PiM is 1."""
    from instdiff_lib.datasets.shapes import make_shapes_dataset

    split = make_shapes_dataset(tmp_path, n_images=6, seed=2, size=64)
    gt = json.loads(split.instances_json.read_text())
    res = gt_as_predictions(gt)
    per_img = {}
    for a in gt["annotations"]:
        m = mask_utils.decode(a["segmentation"])
        ys, xs = np.where(m == 1)
        per_img.setdefault(a["image_id"], []).append(m[int((ys.min() + ys.max()) / 2), int((xs.min() + xs.max()) / 2)])
    want = np.mean([np.mean(v) for v in per_img.values()])
    ids = [im["id"] for im in gt["images"]]
    assert pim(split.instances_json, res, ids, mode="point").values["PiM"] == pytest.approx(want, abs=1e-12)
    assert pim(split.instances_json, res, ids, mode="scribble").values["PiM"] == 1.0


def test_skips_are_reported(world):
    res = [r for r in gt_as_predictions(world) if r["image_id"] != 2]
    r = pim(world, res, [1, 2, 99], mode="point")
    assert r.n_evaluated == 1
    assert dict(r.skipped) == {99: "image id not in the GT json", 2: "no prediction"}
    with pytest.raises(ValueError):
        pim(world, res, [1], mode="box")


def test_many_predictions_per_image():
    """max_det is 300: pycocotools 2.0.11's area()/toBbox() overflow on > 255 RLEs at once (numpy 2)."""
    h, w = 64, 64
    a, b = rect_mask(h, w, 4, 4, 20, 30), rect_mask(h, w, 40, 10, 60, 50)
    gt = make_gt({1: (h, w, [(1, a, 0), (2, b, 0)])})
    rng = np.random.default_rng(0)
    preds = []
    for _ in range(298):
        x0, y0 = int(rng.integers(0, 56)), int(rng.integers(0, 56))
        preds.append(pred(1, rect_mask(h, w, x0, y0, x0 + 6, y0 + 6), score=0.01))
    preds += [pred(1, b, score=0.9), pred(1, a, score=0.8)]
    r = pim(gt, preds, [1], mode="point")
    assert r.values["PiM"] == 1.0 and r.details["n_pred"] == 300
    want, _ = official_like(gt, preds, "point")
    assert r.values["PiM"] == want


# ---- edge cases found by mutation testing (tests/MUTATION.md) ----------------------------------------------------


def test_bookkeeping_over_images_of_every_kind():
    """Four images in one call, each of another kind; the counts of ``details`` add up over all of them and the
    skip reasons name each problem (an early image that is skipped must not end the loop)."""
    h = w = 30
    a, b = rect_mask(h, w, 2, 2, 10, 10), rect_mask(h, w, 15, 15, 25, 25)
    empty = np.zeros((h, w), np.uint8)
    gt = make_gt({1: (h, w, []), 2: (h, w, [(1, a, 0), (1, b, 0)]), 3: (h, w, [(1, empty, 0), (2, empty, 0)]),
                  4: (h, w, [(1, a, 0), (2, b, 0), (1, empty, 0)])})
    res = [pred(3, a), pred(3, b), pred(4, a), pred(4, b)]
    r = pim(gt, res, [1, 2, 3, 4], mode="point")
    assert r.skipped == [(1, "no GT annotation"), (2, "no prediction"),
                         (3, "no scorable pair (matched GT masks are empty)")]
    # image 3: each empty GT takes a prediction at IoU 0 (none scored); image 4: a -> a, b -> b, the empty GT
    # is left without a prediction
    assert r.details["per_image"] == {4: 1.0} and r.values["PiM"] == 1.0 and r.n_evaluated == 1
    assert {k: r.details[k] for k in ("n_pairs", "n_gt", "n_pred", "n_unmatched_gt", "n_empty_gt_masks")} == {
        "n_pairs": 2, "n_gt": 7, "n_pred": 4, "n_unmatched_gt": 3, "n_empty_gt_masks": 3}
    assert r.details["mode"] == "point" and r.details["seed"] == 0


def test_defaults_are_point_mode_and_seed_0(world):
    res = perturb(world)
    r = pim(world, res)
    assert r.details["mode"] == "point" and r.details["seed"] == 0
    assert r.values == pim(world, res, mode="point", seed=0).values
    s = pim(world, res, mode="scribble")
    assert s.details["seed"] == 0 and s.values == pim(world, res, mode="scribble", seed=0).values
    with pytest.raises(ValueError, match="mode must be 'point' or 'scribble', got 'box'"):
        pim(world, res, mode="box")


def test_empty_predictions_are_matched_at_iou_zero_but_not_empty_pairs():
    h = w = 30
    a, b = rect_mask(h, w, 2, 2, 10, 10), rect_mask(h, w, 15, 15, 25, 25)
    empty = np.zeros((h, w), np.uint8)
    gt = make_gt({1: (h, w, [(1, a, 0), (1, b, 0)])})
    # b's only candidate is an empty prediction: IoU 0 (defined), so it is matched and scores 0
    r = pim(gt, [pred(1, a), pred(1, empty)], [1], mode="point")
    assert r.values["PiM"] == 0.5 and r.details["n_unmatched_gt"] == 0 and r.details["n_pairs"] == 2
    # a one-pixel GT mask is a real instance: matched to an empty prediction it scores 0, to its pixel 1
    dot = rect_mask(h, w, 20, 5, 21, 6)
    gt1 = make_gt({1: (h, w, [(1, dot, 0)])})
    assert pim(gt1, [pred(1, empty)], [1], mode="point").details["per_image"] == {1: 0.0}
    assert pim(gt1, [pred(1, dot)], [1], mode="scribble").details["per_image"] == {1: 1.0}
    # an empty GT first, a one-pixel prediction: the empty GT takes it at IoU 0 (0/area, defined), b gets nothing
    gt2 = make_gt({1: (h, w, [(1, empty, 0), (1, b, 0)])})
    centre = rect_mask(h, w, 19, 19, 20, 20)
    r = pim(gt2, [pred(1, centre)], [1], mode="point")
    assert r.n_evaluated == 0 and r.details["n_unmatched_gt"] == 1
    # both empty: 0/0 is undefined and never chosen, so the empty GT takes b (IoU 0) and b the empty one
    r = pim(gt2, [pred(1, empty), pred(1, b)], [1], mode="point")
    assert r.details["per_image"] == {1: 0.0} and r.details["n_unmatched_gt"] == 0


def test_scribble_sampling_with_and_without_replacement():
    """20 random GT pixels without replacement: a 20-pixel mask is sampled whole (half covered -> exactly 0.5);
    a mask of fewer pixels is sampled with replacement."""
    h = w = 20
    m = rect_mask(h, w, 0, 0, 10, 2)  # 20 pixels
    half = rect_mask(h, w, 0, 0, 5, 2)  # 10 of them
    gt = make_gt({1: (h, w, [(1, m, 0)])})
    for seed in range(3):
        assert pim(gt, [pred(1, half)], [1], mode="scribble", seed=seed).values["PiM"] == 0.5
    small = rect_mask(h, w, 3, 3, 8, 4)  # 5 pixels, all covered
    gt_small = make_gt({1: (h, w, [(1, small, 0)])})
    assert pim(gt_small, [pred(1, small)], [1], mode="scribble").values["PiM"] == 1.0
    # with replacement, the draw is exactly the documented one: rng([seed, image id]).choice(5, 20, replace=True)
    first = rect_mask(h, w, 3, 3, 4, 4)
    want = np.isin(np.random.default_rng([0, 1]).choice(5, 20, replace=True), [0]).mean()
    assert pim(gt_small, [pred(1, first)], [1], mode="scribble").values["PiM"] == pytest.approx(want)


def test_scribble_draws_depend_on_the_image_id_only():
    """Integer ids >= 0 seed with the id itself (0 included); other ids with a hash of their text; negative ids
    are hashed too (numpy seeds must be >= 0)."""
    h = w = 24
    m = rect_mask(h, w, 2, 2, 22, 22)
    half = rect_mask(h, w, 2, 2, 12, 22)

    def draw(image_id, seed=0):
        gt = make_gt({image_id: (h, w, [(1, m, 0)])})
        return pim(gt, [pred(image_id, half)], [image_id], mode="scribble", seed=seed).values["PiM"]

    ys, xs = np.nonzero(m)

    def expected(key, seed=0):
        sel = np.random.default_rng([seed, key]).choice(len(ys), 20, replace=False)
        return half[ys[sel], xs[sel]].mean()

    import zlib

    assert draw(0) == pytest.approx(expected(0)) and draw(1) == pytest.approx(expected(1))
    assert draw(7, seed=3) == pytest.approx(expected(7, seed=3))
    assert draw("img-a") == pytest.approx(expected(zlib.crc32(b"img-a")))
    assert draw("img-b") == pytest.approx(expected(zlib.crc32(b"img-b")))
    assert draw(-4) == pytest.approx(expected(zlib.crc32(b"-4")))


def test_predictions_without_masks_and_unpredicted_images_are_refused_or_skipped(world):
    from instdiff_lib.evaluation.metrics.detection import YoloPredictions

    res = gt_as_predictions(world)
    no_mask = [dict(r) for r in res]
    del no_mask[0]["segmentation"]
    with pytest.raises(ValueError, match="no RLE 'segmentation'"):
        pim(world, no_mask, mode="point")
    # the detector's record of what it ran: an image it never saw is skipped, not scored as "no prediction"
    run = YoloPredictions([r for r in res if r["image_id"] != 3], image_ids=[1, 2, 4, 5])
    r = pim(world, run, [1, 2, 3], mode="point")
    assert r.n_evaluated == 2 and r.skipped[0][0] == 3 and "not predicted" in r.skipped[0][1]


def test_center_points_of_empty_tiny_and_no_masks():
    h = w = 10
    x, y, nonempty = mask_center_points([rle(np.zeros((h, w), np.uint8)), rle(rect_mask(h, w, 4, 7, 5, 8)),
                                         rle(rect_mask(h, w, 1, 2, 6, 5))])
    assert nonempty.tolist() == [False, True, True]
    assert (x[1:].tolist(), y[1:].tolist()) == ([4, 3], [7, 3])
    x, y, nonempty = mask_center_points([])
    assert x.shape == y.shape == nonempty.shape == (0,)
    assert x.dtype == y.dtype == np.int64 and nonempty.dtype == bool


def test_greedy_skips_a_gt_with_no_defined_iou_and_goes_on():
    assert greedy_match(np.array([[np.nan, 0.3], [np.nan, 0.7]])) == [(1, 1)]
    assert greedy_match(np.array([[np.nan, np.nan, 0.2]])) == [(2, 0)]


def test_no_scorable_image_gives_nan_without_warnings():
    import warnings

    h = w = 10
    gt = make_gt({1: (h, w, [(1, rect_mask(h, w, 1, 1, 4, 4), 0)])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pim(gt, [], [1], mode="point")
    assert np.isnan(r.values["PiM"]) and r.n_evaluated == 0


def test_unmatched_gt_counts_add_over_images_in_any_order():
    """An image whose GT got too few predictions, then one with none: both images' unmatched GT are counted."""
    h = w = 30
    a, b = rect_mask(h, w, 2, 2, 10, 10), rect_mask(h, w, 15, 15, 25, 25)
    gt = make_gt({1: (h, w, [(1, a, 0), (1, b, 0)]), 2: (h, w, [(1, a, 0), (1, b, 0)])})
    r = pim(gt, [pred(1, a)], [1, 2], mode="point")  # image 1: b unmatched; image 2: no prediction at all
    assert r.details["n_unmatched_gt"] == 1 + 2 and r.skipped == [(2, "no prediction")]


def test_greedy_match_of_no_matrix_is_empty():
    assert greedy_match(np.zeros(0)) == [] and greedy_match([]) == []
    assert greedy_match(np.zeros((0, 3))) == [] and greedy_match(np.zeros((2, 0))) == []
