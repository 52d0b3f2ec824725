"""The scoring front door: files from the manifest only, real copies refused, the real-image control by the same code."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instdiff_lib.evaluation.generation import generate_eval
from instdiff_lib.evaluation.scoring import score_setting
from instdiff_lib.evaluation.metrics.guards import GuardError
from instdiff_lib.datasets.shapes import make_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 4, seed=3, size=64)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, shapes):
    from instdiff_lib.weights.checkpoint import build_components
    from instdiff_lib.datasets.coco import protocol_items
    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

    out = tmp_path_factory.mktemp("gen")
    items = protocol_items(shapes.instances_json, shapes.captions_json)
    generate_eval(items, out, InstanceDiffusionPipeline(build_components("tiny")), "box", steps=1, mis=0.0,
                  image_format="png", progress=False)
    return out


def _fake_generation_from_real(shapes, generated, dst):
    """A folder whose manifest is valid but whose 'generated' images are the real photos."""
    shutil.copytree(generated, dst)
    rows = [json.loads(line) for line in (dst / "manifest-000-of-001.jsonl").read_text().splitlines()]
    for r in rows:
        shutil.copy(shapes.image_dir / r["file"], dst / r["file"])
        r["sha256"] = hashlib.sha256((dst / r["file"]).read_bytes()).hexdigest()
    (dst / "manifest-000-of-001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_generated_images_score_through_the_whole_ap_path(shapes, generated):
    """The real (random) detector end to end: files in, one result row per image id, timings out."""
    r = score_setting("box", instances_json=shapes.instances_json, images_dir=generated,
                      real_image_dir=shapes.image_dir, yolo="yolov8n-seg.yaml", progress=False)
    assert r["n_images"] == 4 and r["source"].startswith("generated (checked")
    assert r["metrics"]["box"]["n_evaluated"] == 4 and r["metrics"]["box"]["n_skipped"] == 0
    assert set(r["timing_s"]) >= {"detector", "scoring"}


# ---- known predictions: the detector replaced by ground truth with one instance moved -----------------------


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def _known_predictions(instances_json, moved_ann: int, shift: int = 5):
    """GT annotations as detector rows (scores 1 - k/100 in file order), annotation ``moved_ann`` shifted
    ``shift`` px right (box and mask)."""
    gt = COCO(str(instances_json))
    rows = []
    for k, a in enumerate(gt.dataset["annotations"]):
        m = gt.annToMask(a)
        x, y, w, h = a["bbox"]
        if a["id"] == moved_ann:
            m = np.roll(m, shift, axis=1)
            m[:, :shift] = 0
            x += shift
        rows.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h],
                     "score": round(1 - k / 100, 5), "segmentation": _rle(m)})
    return gt, rows


@pytest.fixture
def known_detector(monkeypatch, shapes):
    """The detector stage returns known rows; records which files it was given."""
    from instdiff_lib.evaluation.metrics import detection

    gt, rows = _known_predictions(shapes.instances_json, moved_ann=2)
    calls = []

    def predict(model, files, **kw):
        calls.append([i for i, _ in files])
        ids = {i for i, _ in files}
        return detection.YoloPredictions([dict(r) for r in rows if r["image_id"] in ids], image_ids=sorted(ids))

    monkeypatch.setattr(detection, "load_yolo", lambda spec: spec)
    monkeypatch.setattr(detection, "yolo_predict", predict)
    return gt, rows, calls


def _pycocotools(gt, rows, iou_type, ids):
    dt = gt.loadRes([dict(r) for r in rows if r["image_id"] in ids])
    ev = COCOeval(gt, dt, iou_type)
    ev.params.imgIds = sorted(ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(v) for v in ev.stats]


def test_box_setting_scores_known_predictions_like_pycocotools(shapes, generated, known_detector):
    gt, rows, calls = known_detector
    r = score_setting("box", instances_json=shapes.instances_json, images_dir=generated,
                      real_image_dir=shapes.image_dir, yolo="fake", progress=False)
    ids = [1, 2, 3, 4]
    assert calls == [ids]  # the manifest's files, once
    for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
        ref = _pycocotools(gt, rows, iou_type, ids)
        got = r["metrics"][kind]["values"]
        np.testing.assert_array_equal([got[k] for k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")],
                                      [ref[k] for k in (0, 1, 2, 6, 7, 8)])
        assert r["metrics"][kind]["n_evaluated"] == 4
        assert 0.5 < got["AP"] < 1.0  # the moved instance costs something, the rest are perfect
    # mask IoU: every instance 1 except the moved one (its own shifted mask is its best match)
    moved = next(a for a in gt.dataset["annotations"] if a["id"] == 2)
    m = gt.annToMask(moved).astype(bool)
    shifted = np.roll(m, 5, axis=1)
    shifted[:, :5] = False
    iou_moved = (m & shifted).sum() / (m | shifted).sum()
    n_img = len(gt.getAnnIds(imgIds=[moved["image_id"]]))
    n_all = len(gt.dataset["annotations"])
    miou = r["metrics"]["mask_iou"]
    assert miou["values"]["IoU"] == pytest.approx((n_all - 1 + iou_moved) / n_all, abs=1e-12)
    assert miou["per_image"][str(moved["image_id"])] == pytest.approx((n_img - 1 + iou_moved) / n_img, abs=1e-12)
    assert all(v == 1.0 for k, v in miou["per_image"].items() if k != str(moved["image_id"]))


def test_point_setting_scores_known_predictions(shapes, generated, known_detector, tmp_path):
    """PiM of the same rows: an instance scores 1 when its predicted mask holds the centre of its GT mask's box."""
    gt, rows, _ = known_detector
    folder = tmp_path / "point"
    shutil.copytree(generated, folder)
    manifest = folder / "manifest-000-of-001.jsonl"
    manifest.write_text("".join(json.dumps({**json.loads(line), "setting": "point"}) + "\n"
                                for line in manifest.read_text().splitlines()))
    r = score_setting("point", instances_json=shapes.instances_json, images_dir=folder, yolo="fake", progress=False)
    per_image = {}
    for img_id in (1, 2, 3, 4):
        hits = []
        preds = [x for x in rows if x["image_id"] == img_id]
        for a, p in zip(gt.loadAnns(gt.getAnnIds(imgIds=[img_id])), preds):  # each GT keeps its own row here
            ys, xs = np.nonzero(gt.annToMask(a))
            if len(xs):
                hits.append(mask_utils.decode(p["segmentation"])[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2])
        per_image[img_id] = np.mean(hits)
    assert r["metrics"]["pim"]["values"]["PiM"] == pytest.approx(np.mean(list(per_image.values())), abs=1e-12)
    assert r["metrics"]["pim"]["n_evaluated"] == 4


def test_real_copies_are_refused(shapes, generated, tmp_path):
    _fake_generation_from_real(shapes, generated, tmp_path / "fake")
    with pytest.raises(GuardError, match="copies of real images"):
        score_setting("box", instances_json=shapes.instances_json, images_dir=tmp_path / "fake",
                      real_image_dir=shapes.image_dir, yolo="yolov8n-seg.yaml", progress=False)


def test_files_outside_the_manifest_are_refused(shapes, generated, tmp_path):
    shutil.copytree(generated, tmp_path / "g")
    shutil.copy(shapes.image_dir / "000000000001.png", tmp_path / "g" / "stray.png")
    with pytest.raises(GuardError):
        score_setting("box", instances_json=shapes.instances_json, images_dir=tmp_path / "g",
                      yolo="yolov8n-seg.yaml", progress=False)


def test_real_control_and_setting_mismatch(shapes, generated):
    r = score_setting("real", instances_json=shapes.instances_json, real_image_dir=shapes.image_dir,
                      yolo="yolov8n-seg.yaml", progress=False)
    assert r["source"].startswith("real images") and r["n_images"] == 4
    with pytest.raises(ValueError, match="not 'point'"):
        score_setting("point", instances_json=shapes.instances_json, images_dir=generated, yolo="yolov8n-seg.yaml",
                      progress=False)


def test_images_of_one_setting_scored_as_another_only_when_said(shapes, generated, known_detector):
    """An ablation's mask-setting row fed only boxes scores the box setting's images: allowed when the caller names
    the images' setting (and the attribute agrees), refused otherwise."""
    kw = dict(instances_json=shapes.instances_json, images_dir=generated, yolo="fake", progress=False)
    as_box = score_setting("box", **kw)
    with pytest.raises(ValueError, match="not 'mask'"):
        score_setting("mask", **kw)
    as_mask = score_setting("mask", images_setting="box", **kw)
    np.testing.assert_array_equal(*(list(r["metrics"]["box"]["values"].values()) for r in (as_mask, as_box)))
    assert as_mask["metrics"]["box"]["values"]["AP50"] > 0.5
    with pytest.raises(ValueError, match="not 'point'"):
        score_setting("mask", images_setting="point", **kw)
    with pytest.raises(ValueError, match="cannot be scored as 'color'"):
        score_setting("color", images_setting="box", captions_json=shapes.captions_json, **kw)


def _colour_clip():
    """A CLIP triple with known answers: a crop's embedding is the one-hot of the palette colour nearest to its
    centre pixel, a text's the one-hot of the first colour it names."""
    import torch

    from instdiff_lib.datasets.shapes import COLOR_RGB, COLORS

    palette = torch.tensor([COLOR_RGB[c] for c in COLORS], dtype=torch.float32)

    class Model(torch.nn.Module):
        def encode_image(self, x):  # x: (B, 3) centre pixels
            return torch.nn.functional.one_hot(torch.cdist(x, palette).argmin(-1), len(COLORS)).float()

        def encode_text(self, t):
            return t

    def preprocess(crop):
        return torch.tensor(crop.getpixel((crop.width // 2, crop.height // 2)), dtype=torch.float32)

    def tokenizer(texts):
        rows = []
        for text in texts:
            hit = [w for w in text.split() if w in COLORS]
            rows.append([float(c == hit[0]) for c in COLORS] if hit else [1.0] * len(COLORS))
        return torch.tensor(rows)

    return Model(), preprocess, tokenizer


def test_attribute_setting_scores_known_colours_on_gt_crops(shapes, tmp_path):
    """Each instance's box centre is painted (a 7x7 patch) in its attribute colour, every third one in a wrong
    colour: accuracy and CLIP_local are then known (per image, then over images)."""
    from instdiff_lib.datasets.coco import protocol_items
    from instdiff_lib.datasets.shapes import COLOR_RGB, COLORS
    from instdiff_lib.weights.checkpoint import build_components
    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

    items = protocol_items(shapes.instances_json, shapes.captions_json, attribute="color")
    generate_eval(items[:3], tmp_path, InstanceDiffusionPipeline(build_components("tiny")), "color", steps=1,
                  mis=0.0, image_format="png", progress=False)
    manifest = tmp_path / "manifest-000-of-001.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    expected, k = [], 0
    by_id = {it.image_id: it for it in items}
    for row in rows:
        it = by_id[row["image_id"]]
        img = np.asarray(Image.open(tmp_path / row["file"]).convert("RGB")).copy()
        centres = []
        for (x0, y0, x1, y1), colour in zip(it.boxes, it.attributes):
            cx, cy = int((x0 + x1) / 2 * img.shape[1]), int((y0 + y1) / 2 * img.shape[0])  # generated-image px
            paint = colour if k % 3 else COLORS[(COLORS.index(colour) + 1) % len(COLORS)]
            img[max(cy - 3, 0):cy + 4, max(cx - 3, 0):cx + 4] = COLOR_RGB[paint]
            centres.append((cx, cy, colour))
            k += 1
        Image.fromarray(img).save(tmp_path / row["file"])
        row["sha256"] = hashlib.sha256((tmp_path / row["file"]).read_bytes()).hexdigest()
        # what each centre shows once every patch is painted (a later patch may cover an earlier one)
        expected.append(np.mean([tuple(img[cy, cx]) == COLOR_RGB[c] for cx, cy, c in centres]))
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert 0 < np.mean(expected) < 1
    r = score_setting("color", instances_json=shapes.instances_json, captions_json=shapes.captions_json,
                      images_dir=tmp_path, clip=_colour_clip(), progress=False)
    att = r["metrics"]["attribute"]
    assert att["values"]["acc"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert att["values"]["clip_local"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert att["n_evaluated"] == sum(len(by_id[row["image_id"]].boxes) for row in rows) and att["n_skipped"] == 0


def test_real_control_detects_each_photo_at_its_own_aspect_ratio(shapes, tmp_path, monkeypatch):
    """The upper-bound row: YOLO sees the original (non-square) photos, not copies squeezed into the 512x512 GT frame;
    its detections are mapped into the GT frame as the GT itself was. A detector that finds every object exactly on
    the photos then scores AP 1 in the GT frame."""
    from PIL import Image

    from instdiff_lib.datasets.coco import protocol_items
    from instdiff_lib.evaluation.metrics import detection
    from instdiff_lib.evaluation.metrics.detection import YoloPredictions, rle_encode

    items = {it.image_id: it for it in protocol_items(shapes.instances_json, None)}
    photos = tmp_path / "val2017"  # the "original" photos: 96 x 72, the GT frame is 64 x 64
    photos.mkdir()
    for it in items.values():
        Image.open(shapes.image_dir / it.file_name).resize((96, 72)).save(photos / it.file_name)
    seen = {}

    def perfect_detector(model, files, **kw):  # every GT instance, found on the photo it was given
        rows = []
        for image_id, path in files:
            with Image.open(path) as im:
                seen[image_id] = im.size
                w, h = im.size
            it = items[image_id]
            for k, (x0, y0, x1, y1) in enumerate(it.boxes):
                m = np.asarray(Image.fromarray(it.layout.instances[k].mask.astype(np.uint8) * 255).resize((w, h),
                                                                                                      Image.NEAREST)) > 0
                rows.append({"image_id": image_id, "category_id": it.category_ids[k], "score": 0.9,
                             "bbox": [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h],
                             "segmentation": rle_encode(torch.from_numpy(m[None]))[0]})
        return YoloPredictions(rows, image_ids=[i for i, _ in files])

    monkeypatch.setattr(detection, "yolo_predict", perfect_detector)
    r = score_setting("real", instances_json=shapes.instances_json, real_image_dir=photos, yolo="yolov8n-seg.yaml",
                      progress=False)
    assert set(seen.values()) == {(96, 72)}  # the photos themselves, aspect ratio kept
    assert r["metrics"]["box"]["values"]["AP50"] == pytest.approx(1.0)
    assert r["metrics"]["mask_iou"]["values"]["IoU"] > 0.9


def test_metrics_bench_runs_small():
    from instdiff_lib.bench import run_metrics_bench

    r = run_metrics_bench(n_images=3, n_pred=5, size=64, yolo="yolov8n-seg.yaml", n_detector_images=2)
    assert set(r["seconds_per_image"]) >= {"coco_ap_segm", "pim_point", "detector"} and r["scoring_over_detector"] > 0
