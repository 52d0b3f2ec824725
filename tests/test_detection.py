"""Detector scoring: COCO AP/AR (pycocotools parity), mask IoU, YOLO inference offline and its frame conversion."""

import contextlib
import io
import json
import math
import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instdiff_lib.evaluation.metrics import (
    FrameMismatchError,
    MetricResult,
    check_result_frames,
    load_coco,
    rle_area,
    rle_bbox,
)
from instdiff_lib.evaluation.metrics.detection import (
    COCO_STATS,
    YoloPredictions,
    coco_ap,
    letterbox_to_coco,
    load_yolo,
    rle_encode,
    mask_iou,
    rect_batches,
    yolo_predict,
)
from instdiff_lib.offline import setup_offline_env

# pycocotools 2.0.11 under numpy 2 warns inside maskUtils.decode (its __array__ lacks `copy`); not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module", autouse=True)
def offline_env():
    """The offline environment for this module; the variables it set are removed again afterwards (HF_HOME etc.
    must not leak into other test modules)."""
    info = setup_offline_env()
    yield info
    for k in info["env"]:
        os.environ.pop(k, None)


def test_setup_offline_env_in_a_fresh_process(tmp_path):
    """Before `import ultralytics`: env vars, fonts and settings land in the project, import makes no DNS probe."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("YOLO_", "HF_", "TRANSFORMERS_")) and k != "INSTDIFF_PROJECT_ROOT"}
    code = (
        "import json, os, sys\n"
        "from instdiff_lib.offline import setup_offline_env\n"
        f"r = setup_offline_env({str(tmp_path)!r})\n"
        "assert 'ultralytics' not in sys.modules or r['ultralytics_settings']\n"
        "import ultralytics.utils as U\n"
        "print(json.dumps({'r': r, 'online': U.ONLINE, 'file': str(U.SETTINGS_FILE), 'sync': U.SETTINGS['sync'],"
        " 'datasets': U.SETTINGS['datasets_dir'], 'autoinstall': U.AUTOINSTALL, 'hf': os.environ['HF_HUB_OFFLINE']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = tmp_path / ".cache" / "ultralytics" / "Ultralytics"
    assert info["file"] == str(cfg / "settings.json") and info["sync"] is False
    assert info["datasets"].startswith(str(cfg)) and info["online"] is False and info["autoinstall"] is False
    assert info["hf"] == "1" and not info["r"]["late"]
    assert (cfg / "Arial.ttf").stat().st_size > 10_000 and (cfg / "Arial.Unicode.ttf").exists()
    assert not (tmp_path / "datasets").exists()


@pytest.mark.parametrize("user_value", [None, "1", "3"])
def test_importing_ultralytics_keeps_the_cpu_thread_count(tmp_path, user_value):
    """ultralytics sets OMP_NUM_THREADS=1 at import when it is unset: torch here and every child process (papermill
    kernels, rehearsal stages) would run on one core. After setup_offline_env torch keeps its own default, children
    inherit no forced value, and a value the user set stays."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "HF_", "OMP_", "MKL_"))}
    if user_value:
        env["OMP_NUM_THREADS"] = user_value
    code = (
        "import json, os, subprocess, sys\n"
        "from instdiff_lib.offline import setup_offline_env\n"
        f"setup_offline_env({str(tmp_path)!r})\n"
        "import ultralytics, torch\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"OMP_NUM_THREADS\"))'],"
        " capture_output=True, text=True).stdout.strip()\n"
        "print(json.dumps({'env': os.environ.get('OMP_NUM_THREADS'), 'child': child, 'torch': torch.get_num_threads()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                             capture_output=True, text=True, timeout=120).stdout.strip()
    assert info["env"] == user_value and info["child"] == str(user_value)
    assert info["torch"] == int(default)  # torch's own default, or the user's value


# ---- a tiny COCO world built inline ---------------------------------------------------------------------


def rect_mask(h, w, x0, y0, x1, y1):
    """(h, w) uint8 mask with columns x0..x1-1 and rows y0..y1-1 set."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def ann_from_mask(ann_id, image_id, cat, mask, iscrowd=0):
    ys, xs = np.nonzero(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": iscrowd, "area": int(mask.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            "segmentation": rle(mask)}


def make_world():
    """3 non-square images, 3 categories, rectangles of several sizes, one crowd annotation."""
    specs = {  # image_id: (h, w, [(cat, x0, y0, x1, y1, iscrowd)])
        1: (60, 90, [(1, 5, 5, 30, 40, 0), (2, 40, 10, 80, 30, 0), (1, 50, 35, 85, 55, 0)]),
        2: (80, 50, [(3, 2, 2, 20, 70, 0), (2, 25, 40, 48, 78, 0), (3, 30, 5, 45, 20, 1)]),
        3: (70, 70, [(1, 10, 10, 60, 60, 0), (3, 0, 0, 8, 8, 0)]),
    }
    images, anns, masks = [], [], {}
    for img_id, (h, w, boxes) in specs.items():
        images.append({"id": img_id, "file_name": f"{img_id:012d}.png", "height": h, "width": w})
        for cat, x0, y0, x1, y1, crowd in boxes:
            m = rect_mask(h, w, x0, y0, x1, y1)
            a = ann_from_mask(len(anns) + 1, img_id, cat, m, crowd)
            anns.append(a)
            masks[a["id"]] = m
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}
    return gt, masks


@pytest.fixture(scope="module")
def world():
    return make_world()


def as_predictions(gt, score=1.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score,
             "segmentation": dict(a["segmentation"])} for a in gt["annotations"]]


def perturbed(gt, masks, seed=0):
    """Shifted boxes and masks, one dropped instance per image, false positives, a wrong class, random scores."""
    rng = np.random.default_rng(seed)
    hw = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        if a["id"] in (2, 5):  # dropped
            continue
        h, w = hw[a["image_id"]]
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
        m = np.roll(np.roll(masks[a["id"]], dy, axis=0), dx, axis=1)
        x, y, bw, bh = a["bbox"]
        cat = a["category_id"] if a["id"] != 7 else 2  # a wrong class
        out.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x + dx + 0.5, y + dy, bw - 0.5, bh + 1.0],
                    "score": float(rng.uniform(0.05, 1.0)), "segmentation": rle(m)})
    for img_id, (h, w) in hw.items():  # false positives
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            m = rect_mask(h, w, x0, y0, x0 + 9, y0 + 7)
            out.append({"image_id": img_id, "category_id": int(rng.integers(1, 4)), "bbox": [x0, y0, 9, 7],
                        "score": float(rng.uniform(0.0, 0.9)), "segmentation": rle(m)})
    return out


def pycocotools_stats(gt, results, iou_type, image_ids=None):
    """COCOeval called directly, the reference."""
    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    coco.createIndex()
    dt = coco.loadRes(json.loads(json.dumps(results)))
    ev = COCOeval(coco, dt, iou_type)
    if image_ids is not None:
        ev.params.imgIds = sorted(image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.array(ev.stats)


# ---- coco_ap ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_gt_as_predictions_gives_ap_1(world, iou_type):
    gt, _ = world
    r = coco_ap(gt, as_predictions(gt), iou_type)
    assert isinstance(r, MetricResult)
    assert r.values["AP"] == pytest.approx(1.0) and r.values["AP50"] == 1.0 and r.values["AP75"] == 1.0
    assert r.values["AR100"] == pytest.approx(1.0)
    assert r.n_evaluated == 3 and r.n_skipped == 0 and r.skipped == []
    assert list(r.values) == list(COCO_STATS)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perturbed_matches_pycocotools(world, iou_type):
    gt, masks = world
    res = perturbed(gt, masks)
    ref = pycocotools_stats(gt, res, iou_type)
    r = coco_ap(gt, res, iou_type)
    got = np.array([r.values[k] for k in COCO_STATS])
    ref9 = np.where(ref[:9] < 0, np.nan, ref[:9])
    np.testing.assert_array_equal(got, ref9)  # exactly the same numbers
    np.testing.assert_array_equal(np.array(r.details["stats"]), ref)
    assert 0.05 < r.values["AP"] < r.values["AP50"] < 1.0  # really perturbed
    assert res == perturbed(gt, masks)  # inputs not mutated by loadRes


def test_image_subset_and_skips(world):
    gt, masks = world
    res = perturbed(gt, masks)
    ref = pycocotools_stats(gt, res, "bbox", image_ids=[1, 3])
    r = coco_ap(gt, res, "bbox", image_ids=[3, 1, 42])
    assert r.values["AP"] == ref[0] and r.values["AR100"] == ref[8]
    assert r.n_evaluated == 2 and r.n_skipped == 1 and r.skipped[0][0] == 42
    assert r.details["n_results_outside"] == sum(1 for x in res if x["image_id"] == 2)


def test_empty_results_are_zeros(world):
    gt, _ = world
    r = coco_ap(gt, [], "segm")
    for k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert r.values[k] == 0.0
    assert r.n_evaluated == 3 and r.details["n_images_without_results"] == 3


def test_segm_refuses_masks_in_another_frame(world):
    gt, _ = world
    res = as_predictions(gt)
    res[0]["segmentation"] = rle(np.ones((512, 512), np.uint8))
    with pytest.raises(FrameMismatchError, match="not in their GT image frame"):
        coco_ap(gt, res, "segm")
    with pytest.raises(FrameMismatchError):
        mask_iou(gt, res)


# ---- mask IoU --------------------------------------------------------------------------------------------


def test_mask_iou_gt_is_1(world):
    gt, _ = world
    r = mask_iou(gt, as_predictions(gt, score=0.5))
    assert r.values == {"IoU": 1.0, "IoU_image": 1.0}
    assert r.details["n_instances"] == 7  # 8 annotations, one crowd
    assert r.n_evaluated == 3


def test_mask_iou_perturbed_matches_brute_force(world):
    gt, masks = world
    res = perturbed(gt, masks)
    per_inst, per_img = [], {}
    for im in gt["images"]:
        vals = []
        for a in [a for a in gt["annotations"] if a["image_id"] == im["id"]][:30]:
            if a["iscrowd"]:
                continue
            g = masks[a["id"]].astype(bool)
            best = 0.0
            for p in res:
                if p["image_id"] == im["id"] and p["category_id"] == a["category_id"]:
                    pm = mask_utils.decode(p["segmentation"]).astype(bool)
                    best = max(best, (g & pm).sum() / (g | pm).sum())
            vals.append(best)
        per_inst += vals
        per_img[im["id"]] = np.mean(vals)
    r = mask_iou(gt, res, [1, 2, 3])
    assert r.values["IoU"] == pytest.approx(np.mean(per_inst), abs=1e-12)
    assert r.values["IoU_image"] == pytest.approx(np.mean(list(per_img.values())), abs=1e-12)
    assert 0 in [round(v, 9) for v in per_inst]  # the dropped instances count as 0


# ---- edge cases found by mutation testing ----------------------------------------------------------------


def small_gt(specs):
    """specs: {image_id: (h, w, [(cat, x0, y0, x1, y1, iscrowd)])}; iscrowd None: the annotation has no such key."""
    images, anns = [], []
    for img_id, (h, w, boxes) in specs.items():
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": h, "width": w})
        for cat, x0, y0, x1, y1, crowd in boxes:
            a = ann_from_mask(len(anns) + 1, img_id, cat, rect_mask(h, w, x0, y0, x1, y1), crowd or 0)
            if crowd is None:
                del a["iscrowd"]
            anns.append(a)
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def rect_pred(img_id, h, w, x0, y0, x1, y1, cat=1, score=0.9):
    p = {"image_id": img_id, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
         "segmentation": rle(rect_mask(h, w, x0, y0, x1, y1))}
    if score is not None:
        p["score"] = score
    return p


def numpy_iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / (a | b).sum()


def test_coco_ap_default_iou_type_details_and_summary(world):
    gt, masks = world
    res = perturbed(gt, masks)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ref = pycocotools_stats(gt, res, "bbox")
    lines = [line for line in printed.getvalue().splitlines() if "Average" in line]
    r = coco_ap(gt, res)  # iou_type defaults to bbox
    np.testing.assert_array_equal(np.array(r.details["stats"]), ref)
    assert r.details["iou_type"] == "bbox" and r.details["n_results"] == len(res)
    assert r.details["n_results_outside"] == 0 and r.details["n_images_without_results"] == 0
    # the 12 "Average Precision/Recall" lines pycocotools prints, as it prints them
    assert len(lines) == 12 and r.details["summary"] == "\n".join(lines)
    assert r.details["summary"].splitlines()[0].endswith(f"= {ref[0]:0.3f}")
    with pytest.raises(ValueError, match="iou_type must be 'bbox' or 'segm', got 'keypoints'"):
        coco_ap(gt, res, "keypoints")

def test_scores_read_json_files_and_leave_the_inputs_alone(tmp_path):
    gt, masks = make_world()  # not the shared fixture: a test before this one may have written into it
    res = perturbed(gt, masks)
    gt_before, res_before = json.loads(json.dumps(gt)), json.loads(json.dumps(res))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "predictions.json").write_text(json.dumps(res))
    for iou_type in ("bbox", "segm"):
        ref = pycocotools_stats(gt, res, iou_type)
        from_files = coco_ap(str(tmp_path / "gt.json"), tmp_path / "predictions.json", iou_type)
        np.testing.assert_array_equal(np.array(from_files.details["stats"]), ref)
        assert from_files.details["n_results"] == len(res)
        in_memory = coco_ap(gt, res, iou_type)  # COCOeval writes "ignore" (and RLEs) into the GT dicts it reads
        np.testing.assert_array_equal(np.array(in_memory.details["stats"]), ref)
    assert gt == gt_before and res == res_before
    assert mask_iou(gt, str(tmp_path / "predictions.json")).values == mask_iou(gt, res).values


def test_requested_ids_are_sorted_and_unique(world):
    gt, masks = world
    res = perturbed(gt, masks)
    r = coco_ap(gt, res, "bbox", image_ids=[43, 3, 42, 3, 1])
    assert r.n_evaluated == 2
    assert r.skipped == [(42, "image id not in the GT json"), (43, "image id not in the GT json")]
    r = mask_iou(gt, res, [3, 1, 3])
    assert list(r.details["per_image"]) == [1, 3] and r.n_evaluated == 2


def test_coco_ap_segm_needs_rle_masks(world):
    """loadRes would silently turn a box-only result into a box-shaped polygon mask: segm AP refuses it."""
    gt, _ = world
    res = as_predictions(gt)
    del res[1]["segmentation"]  # annotation 2, on image 1
    with pytest.raises(ValueError, match=re.escape("1 results have no RLE 'segmentation' (first image ids: [1])")):
        coco_ap(gt, res, "segm")
    res = as_predictions(gt)
    res[4]["segmentation"] = [[2.0, 2.0, 10.0, 2.0, 10.0, 10.0]]  # a polygon, not an RLE
    with pytest.raises(ValueError, match="no RLE 'segmentation'"):
        coco_ap(gt, res, "segm")
    assert coco_ap(gt, res, "bbox").values["AP"] == pytest.approx(1.0)  # boxes need no mask


def test_coco_ap_nothing_to_evaluate(world):
    gt, masks = world
    res = perturbed(gt, masks)
    r = coco_ap(gt, res, "segm", image_ids=[42, 43])
    assert list(r.values) == list(COCO_STATS)
    assert all(isinstance(v, float) and math.isnan(v) for v in r.values.values())
    assert r.n_evaluated == 0 and r.n_skipped == 2
    assert r.skipped == [(42, "image id not in the GT json"), (43, "image id not in the GT json")]
    assert r.details == {"iou_type": "segm", "n_results": 0, "n_results_outside": len(res),
                         "n_images_without_results": 0, "note": "no image to evaluate"}


def test_metric_result_summary_and_skip_count():
    r = MetricResult({"AP": 0.5, "AR100": 1 / 3}, 3, 1, [(7, "gone")])
    assert r.summary() == "AP=0.5000, AR100=0.3333 (n_evaluated=3, n_skipped=1)"
    assert r["AR100"] == 1 / 3
    with pytest.raises(ValueError, match=re.escape("n_skipped=2 but 1 skipped entries")):
        MetricResult({}, 0, 2, [(7, "gone")])


def test_mask_iou_counts_the_first_30_instances():
    """31 disjoint 4x4 squares on one image; the only prediction is the 31st, beyond the default 30."""
    boxes = [(1, (k % 8) * 5, (k // 8) * 5, (k % 8) * 5 + 4, (k // 8) * 5 + 4, 0) for k in range(31)]
    gt = small_gt({1: (40, 40, boxes)})
    _, x0, y0, x1, y1, _ = boxes[30]
    res = [rect_pred(1, 40, 40, x0, y0, x1, y1)]
    r = mask_iou(gt, res)
    assert r.values == {"IoU": 0.0, "IoU_image": 0.0}
    assert r.details["n_instances"] == 30 and r.details["max_instances"] == 30
    r = mask_iou(gt, res, max_instances=31)
    assert r.values["IoU"] == pytest.approx(1 / 31) and r.details["n_instances"] == 31


def test_mask_iou_min_score_and_results_without_score():
    gt = small_gt({1: (60, 60, [(1, 10, 10, 30, 30, 0)])})
    exact = rect_pred(1, 60, 60, 10, 10, 30, 30, score=0.3)
    shifted = rect_pred(1, 60, 60, 15, 10, 35, 30, score=0.5)
    v = numpy_iou(rect_mask(60, 60, 10, 10, 30, 30), rect_mask(60, 60, 15, 10, 35, 30))
    assert v == pytest.approx(0.6)  # 300 / 500
    r = mask_iou(gt, [exact, shifted], min_score=0.3)  # a score equal to min_score counts
    assert r.values["IoU"] == 1.0 and r.details["min_score"] == 0.3
    r = mask_iou(gt, [exact, shifted], min_score=0.4)
    assert r.values["IoU"] == pytest.approx(v) and r.details["min_score"] == 0.4
    # a result without a score counts as score 1
    no_score = rect_pred(1, 60, 60, 10, 10, 30, 30, score=None)
    assert mask_iou(gt, [no_score]).values["IoU"] == 1.0
    assert mask_iou(gt, [no_score], min_score=1.0).values["IoU"] == 1.0
    assert mask_iou(gt, [no_score], min_score=1.5).values["IoU"] == 0.0


def test_mask_iou_crowds_and_images_without_instances():
    gt = small_gt({
        1: (30, 30, [(1, 0, 0, 10, 10, 1)]),  # only a crowd: skipped, and the images after it still count
        2: (30, 40, [(2, 5, 5, 25, 15, None)]),  # no "iscrowd" key: not a crowd
        3: (40, 30, [(1, 0, 0, 30, 40, 1), (1, 2, 2, 12, 22, 0)]),
    })
    res = [rect_pred(2, 30, 40, 5, 5, 25, 15, cat=2), rect_pred(3, 40, 30, 2, 4, 12, 24)]
    v = numpy_iou(rect_mask(40, 30, 2, 2, 12, 22), rect_mask(40, 30, 2, 4, 12, 24))
    assert v == pytest.approx(180 / 220)
    r = mask_iou(gt, res)
    assert r.skipped == [(1, "no non-crowd GT instance")] and r.n_skipped == 1 and r.n_evaluated == 2
    assert r.details["per_image"] == {2: 1.0, 3: pytest.approx(v)} and r.details["n_instances"] == 2
    assert r.values["IoU"] == pytest.approx((1 + v) / 2) and r.values["IoU_image"] == pytest.approx((1 + v) / 2)
    # no image with a scorable instance: NaN, and no numpy "mean of empty slice" warning on the way
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = mask_iou(gt, res, [1])
    assert math.isnan(r.values["IoU"]) and math.isnan(r.values["IoU_image"])
    assert r.n_evaluated == 0 and r.skipped == [(1, "no non-crowd GT instance")]


def test_mask_iou_reads_what_the_detector_skipped(world):
    gt, _ = world
    rows = [p for p in as_predictions(gt) if p["image_id"] != 2]
    preds = YoloPredictions(rows, image_ids=[1, 3], skipped=[(2, "file not found: gone.png")])
    r = mask_iou(gt, preds)
    assert r.skipped == [(2, "not predicted: file not found: gone.png")] and r.n_evaluated == 2
    assert r.values["IoU"] == 1.0 and r.details["n_instances"] == 5


def test_mask_iou_needs_rle_masks(world):
    gt, _ = world
    res = as_predictions(gt)
    del res[0]["segmentation"]
    with pytest.raises(ValueError, match="no RLE 'segmentation'"):
        mask_iou(gt, res)


def test_check_result_frames_rules_and_messages(world):
    gt_dict, _ = world
    gt = load_coco(gt_dict)
    ok = as_predictions(gt_dict)
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in ok]
    assert check_result_frames(gt, boxes_only) is None  # masks are optional unless required
    check_result_frames(gt, ok, require_segmentation=True)
    alien = dict(ok[0], image_id=99, segmentation=rle(np.ones((5, 5), np.uint8)))  # not a GT image: not checked
    wrong = dict(ok[0], segmentation=rle(np.ones((90, 60), np.uint8)))  # image 1 is 60 x 90 (h x w): transposed
    msg = "1 result masks are not in their GT image frame (image 1: mask size [90, 60] vs GT [h, w] [60, 90])"
    with pytest.raises(FrameMismatchError, match=re.escape(msg)):  # checking goes on after those two
        check_result_frames(gt, [boxes_only[0], alien, wrong])
    six = [dict(ok[0], segmentation=rle(np.ones((k, k), np.uint8))) for k in range(5, 11)]
    with pytest.raises(FrameMismatchError) as e:
        check_result_frames(gt, six)
    assert str(e.value) == ("6 result masks are not in their GT image frame (" + "; ".join(
        f"image 1: mask size [{k}, {k}] vs GT [h, w] [60, 90]" for k in range(5, 10)) + ")")  # the first five
    missing = boxes_only[:6]  # annotations 1-6: images 1, 1, 1, 2, 2, 2
    missing[5] = dict(ok[5], segmentation=[[2.0, 2.0, 10.0, 2.0, 10.0, 10.0]])  # a polygon is no RLE either
    with pytest.raises(ValueError) as e:
        check_result_frames(gt, missing, require_segmentation=True)
    assert str(e.value) == ("6 results have no RLE 'segmentation' (first image ids: [1, 1, 1, 2, 2]); "
                            "mask metrics need masks")


def test_rle_area_and_bbox_any_length():
    """More RLEs than one pycocotools call takes, and none at all; checked against numpy on the masks."""
    rng = np.random.default_rng(1)
    m = (rng.uniform(size=(260, 9, 7)) > 0.7).astype(np.uint8)
    m[0] = 0
    rles = [rle(x) for x in m]
    area = rle_area(rles)
    assert area.dtype == np.int64
    np.testing.assert_array_equal(area, m.reshape(len(m), -1).sum(axis=1))
    want = np.zeros((len(m), 4))
    for k, x in enumerate(m):
        ys, xs = np.nonzero(x)
        if len(xs):
            want[k] = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    np.testing.assert_array_equal(rle_bbox(rles), want)
    empty = rle_area([])
    assert empty.shape == (0,) and empty.dtype == np.int64
    assert rle_bbox([]).shape == (0, 4)


# ---- YOLO: offline, batched, geometry ------------------------------------------------------------------


def test_rect_batches_match_ultralytics_val():
    # 512^2 generated images: 640 content in a 672^2 canvas (half-stride padding on each side)
    assert rect_batches([(512, 512)] * 3, 16, 640, 32) == [([0, 1, 2], (672, 672))]
    # sorted by h/w; wide -> [max_ar, 1], tall -> [1, 1/min_ar], mixed -> square
    b = rect_batches([(64, 96), (96, 64), (64, 96)], 2, 640, 32)
    assert b == [([0, 2], (448, 672)), ([1], (672, 448))]
    assert rect_batches([(64, 96), (96, 64)], 16, 640, 32) == [([0, 1], (672, 672))]


def test_load_yolo_refuses_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_yolo("yolov8m-seg.pt")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_yolo(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def yolo_seg():
    return load_yolo("yolov8n-seg.yaml")  # random weights, built offline from the bundled config


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory):
    from instdiff_lib.datasets.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_images=3, seed=0, size=64)


def test_random_yolo_whole_ap_path_offline(yolo_seg, shapes_split):
    inst = json.loads(shapes_split.instances_json.read_text())
    files = [(im["id"], shapes_split.image_dir / im["file_name"]) for im in inst["images"]]
    files[1] = (files[1][0], shapes_split.image_dir / "gone.png")  # a missing generated file
    bad = shapes_split.root / "broken.png"
    bad.write_bytes(b"not an image")
    preds = yolo_predict(yolo_seg, files + [(77, bad)], class_map="index+1")
    assert preds == []  # random weights find nothing, even at conf 0.001
    assert preds.image_ids == [1, 3]
    assert preds.skipped[0][0] == 2 and "file not found" in preds.skipped[0][1]
    assert preds.skipped[1][0] == 77 and "unreadable image" in preds.skipped[1][1]
    assert preds.settings["imgsz"] == 640 and preds.settings["conf"] == 0.001 and preds.settings["iou"] == 0.7
    for iou_type in ("bbox", "segm"):
        r = coco_ap(shapes_split.instances_json, preds, iou_type, image_ids=[1, 2, 3])
        assert r.values["AP"] == 0.0 and r.values["AR100"] == 0.0
        assert r.n_evaluated == 2 and r.n_skipped == 1
        assert r.skipped[0][0] == 2 and "not predicted" in r.skipped[0][1]
        r = coco_ap(shapes_split.instances_json, preds, iou_type)  # default: the images the predictor was given
        assert r.n_evaluated == 2 and dict(r.skipped).keys() == {2, 77}
    r = mask_iou(shapes_split.instances_json, list(preds), [1, 3])  # a plain list: no record of what was run
    assert r.n_evaluated == 2 and r.values["IoU"] == 0.0
    sub = yolo_predict(yolo_seg, files[:1], class_map="index+1")  # image 3 was never given to the detector
    r = coco_ap(shapes_split.instances_json, sub, "bbox", image_ids=[1, 3])
    assert r.n_evaluated == 1 and r.skipped == [(3, "not predicted: not in the files given to the detector")]


def _fake_seg_backend(boxes_by_canvas, nc=80, nm=32):
    """A stand-in for the network: one detection per image, placed by the input canvas (h, w).

    boxes_by_canvas: {(H, W): (x1, y1, x2, y2, class index)} in input pixels. Output layout as the real
    segment head in eval mode: [(y (B, 4 + nc + nm, N) with centre-xywh and class probabilities, proto)].
    """
    import torch

    def backend(x):
        bs, _, h, w = x.shape
        x1, y1, x2, y2, c = boxes_by_canvas[(h, w)]
        n = 4
        y = torch.zeros(bs, 4 + nc + nm, n)
        y[:, 0:4, :] = torch.tensor([10.0, 10.0, 4.0, 4.0])[:, None]  # tiny decoys, below conf
        y[:, 0:4, 0] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        y[:, 4 + c, 0] = 0.9
        y[:, 4 + nc, 0] = 1.0  # mask coefficient on prototype 0
        proto = torch.zeros(bs, nm, h // 4, w // 4)
        proto[:, 0] = 10.0  # positive logit everywhere: the mask is the box crop
        return [(y, proto), {}]

    return backend


def test_yolo_conversion_non_square_original_frame(yolo_seg, tmp_path, monkeypatch):
    """A 96x64 (wide) and a 64x96 (tall) image: detections placed in the letterboxed input must come back in the
    original frame. Letterbox numbers computed by hand from ultralytics' val rules:
    wide: long side 96 -> 640, short 64 -> ceil(426.67) = 427; canvas (448, 672); pad left 16, top round(10.4) = 10.
    tall: the transpose: canvas (672, 448); pad left 10, top 16."""
    from instdiff_lib.evaluation.metrics import detection

    gw, gh = 640 / 96, 427 / 64  # gains along x and y for the wide image (transposed for the tall one)
    wide_rect, tall_rect = (24, 16, 72, 48), (16, 24, 48, 72)  # x0, y0, x1, y1 in original pixels
    boxes = {
        (448, 672): (16 + 24 * gw, 10 + 16 * gh, 16 + 72 * gw, 10 + 48 * gh, 2),
        (672, 448): (10 + 16 * gh, 16 + 24 * gw, 10 + 48 * gh, 16 + 72 * gw, 5),
    }
    monkeypatch.setattr(detection, "_make_backend", lambda *a, **k: _fake_seg_backend(boxes))
    for name, (w, h) in {"wide.png": (96, 64), "tall.png": (64, 96)}.items():
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(tmp_path / name)
    preds = yolo_predict(yolo_seg, [(7, tmp_path / "wide.png"), (8, tmp_path / "tall.png")], batch=1)
    assert len(preds) == 2 and preds.image_ids == [7, 8]
    by_id = {p["image_id"]: p for p in preds}
    # coco80 -> coco91 category ids: class index 2 (car) -> 3, 5 (bus) -> 6
    assert by_id[7]["category_id"] == 3 and by_id[8]["category_id"] == 6
    assert by_id[7]["score"] == 0.9
    for img_id, (x0, y0, x1, y1), (h, w) in ((7, wide_rect, (64, 96)), (8, tall_rect, (96, 64))):
        p = by_id[img_id]
        np.testing.assert_allclose(p["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=2e-3)
        seg = p["segmentation"]
        assert seg["size"] == [h, w] and isinstance(seg["counts"], str)
        m = mask_utils.decode(seg).astype(bool)
        truth = rect_mask(h, w, x0, y0, x1, y1).astype(bool)
        iou = (m & truth).sum() / (m | truth).sum()
        assert iou > 0.95, iou
        np.testing.assert_allclose(mask_utils.toBbox(seg), [x0, y0, x1 - x0, y1 - y0], atol=1)

    # and scored against a GT json of the same rectangles: perfect boxes, masks within a pixel
    gt = {"images": [{"id": 7, "height": 64, "width": 96}, {"id": 8, "height": 96, "width": 64}],
          "categories": [{"id": 3, "name": "car"}, {"id": 6, "name": "bus"}],
          "annotations": [ann_from_mask(1, 7, 3, rect_mask(64, 96, *wide_rect)),
                          ann_from_mask(2, 8, 6, rect_mask(96, 64, *tall_rect))]}
    assert coco_ap(gt, preds, "bbox").values["AP"] == pytest.approx(1.0)
    assert coco_ap(gt, preds, "segm").values["AP50"] == pytest.approx(1.0)


def test_letterbox_to_coco_unit():
    """Direct call: input = original * gain + pad, boxes clipped to the original frame, masks cropped + resized."""
    ratio_pad = ((2.0, 2.0), (8, 4))  # 30x40 (h x w) original -> 60x80 content at left 8, top 4 in a 68x96 canvas
    masks = np.zeros((2, 68, 96), np.uint8)
    masks[0, 4 + 2 * 5:4 + 2 * 15, 8 + 2 * 10:8 + 2 * 30] = 1  # rows 5..14, cols 10..29 in the original
    rows = letterbox_to_coco(5, [[8 + 20, 4 + 10, 8 + 60, 4 + 30], [0, 0, 200, 200]], [0.5, 0.25], [0, 1], masks,
                             ratio_pad, (30, 40), [11, 12])
    assert rows[0]["bbox"] == [10.0, 5.0, 20.0, 10.0] and rows[0]["category_id"] == 11
    assert rows[1]["bbox"] == [0.0, 0.0, 40.0, 30.0]  # clipped
    np.testing.assert_array_equal(mask_utils.decode(rows[0]["segmentation"]), rect_mask(30, 40, 10, 5, 30, 15))
    assert mask_utils.decode(rows[1]["segmentation"]).sum() == 0


def test_rows_equal_ultralytics_val_predictions_json(tmp_path, monkeypatch):
    """Cross-check against ultralytics' own validator (`yolo val ... save_json=True`) on 4 images of mixed aspect
    ratios (rect batches of 2). A random model is made to fire: 3 classes get a moderate bias and random
    weights in the class head (varied scores), the mask prototypes and coefficients get offsets (non-empty masks).
    With mask_resize="ultralytics" every row (category, score, rounded bbox, RLE) must be identical;
    with the default (0.5 threshold) the boxes are identical and the validator's masks lie inside ours."""
    import copy
    import functools

    import torch
    import ultralytics.utils.nms as nms_module

    torch.manual_seed(0)
    model = load_yolo("yolov8n-seg.yaml")
    head = model.model.model[-1]
    for seq in head.cv3:
        seq[-1].bias.data[:] = -20.0
        seq[-1].bias.data[:3] = -1.0
        seq[-1].weight.data.normal_(0, 2e6)  # random init leaves features ~1e-7: large weights give varied scores
    for seq in head.cv4:
        seq[-1].bias.data.normal_(0, 1.0)
    head.proto.cv2.bn.bias.data.normal_(0, 1.0)
    head.proto.cv3.bn.bias.data.normal_(0, 1.0)
    # the validator stops NMS after a wall-clock limit; lift it so both sides keep every box
    monkeypatch.setattr(nms_module, "non_max_suppression",
                        functools.partial(nms_module.non_max_suppression, max_time_img=1e9))

    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80), (120, 50)], start=1):
        p = root / "images" / "val" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        (root / "labels" / "val" / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2 0.6 0.5 0.5 0.6\n")
        files.append((i, p))
    data = {"path": str(root), "train": "images/val", "val": "images/val", "names": {k: f"c{k}" for k in range(80)}}
    (root / "data.yaml").write_text(json.dumps(data))

    n_threads = torch.get_num_threads()
    try:
        copy.deepcopy(model).val(data=str(root / "data.yaml"), imgsz=160, batch=2, conf=0.001, iou=0.7,
                                 max_det=300, device="cpu", save_json=True, plots=False,
                                 project=str(tmp_path / "runs"), name="v", exist_ok=True, verbose=False, workers=0)
        # ultralytics' select_device() has just set torch's CPU thread count (min(8, cpus - 1)); conv results
        # differ in the last float bits with the thread count, so ours runs with the same setting
        kw = dict(imgsz=160, batch=2, class_map="index+1")  # non-COCO data: ultralytics maps class k -> k + 1
        exact = yolo_predict(model, files, mask_resize="ultralytics", **kw)
        ours = yolo_predict(model, files, **kw)
    finally:
        torch.set_num_threads(n_threads)
    theirs = json.loads((tmp_path / "runs" / "v" / "predictions.json").read_text())
    for r in theirs:
        r.pop("file_name")

    def key(r):
        return r["image_id"], r["category_id"], r["score"], tuple(r["bbox"])

    assert len(theirs) > 100 and len({r["score"] for r in theirs}) > 50
    assert sorted(exact, key=key) == sorted(theirs, key=key)
    a, b = sorted(ours, key=key), sorted(theirs, key=key)
    assert [key(r) for r in a] == [key(r) for r in b]
    inside = [(~mask_utils.decode(x["segmentation"]).astype(bool) & mask_utils.decode(y["segmentation"]).astype(bool))
              .sum() == 0 for x, y in zip(a, b)]
    assert all(inside)
    assert rle_area([x["segmentation"] for x in a]).sum() > rle_area([y["segmentation"] for y in b]).sum()


def test_rle_encode_equals_pycocotools():
    rng = np.random.default_rng(0)
    m = (rng.uniform(size=(300, 23, 17)) > 0.6).astype(np.uint8)  # > 255 masks, odd sizes
    m[0] = 0
    m[1] = 1
    m[2, 0, 0], m[2, 1:, :] = 1, 0  # only the first pixel
    m[3, -1, -1], m[3, :-1, :] = 1, 0  # only the last pixel
    want = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
    got = rle_encode(m)
    assert [g["counts"] for g in got] == [w["counts"].decode() for w in want]
    assert all(g["size"] == [23, 17] for g in got) and rle_encode(np.zeros((0, 5, 5), np.uint8)) == []
