"""The scoring front door: files from the manifest only, real copies refused, the real-image control by the same code."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

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
    r = score_setting("box", instances_json=shapes.instances_json, images_dir=generated,
                      real_image_dir=shapes.image_dir, yolo="yolov8n-seg.yaml", progress=False)
    assert r["n_images"] == 4 and r["source"].startswith("generated (checked")
    assert r["metrics"]["box"]["n_evaluated"] == 4 and "AP50" in r["metrics"]["box"]["values"]
    assert set(r["timing_s"]) >= {"detector", "scoring"}


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


def test_attribute_setting_uses_clip_on_gt_crops(shapes, generated, tmp_path):
    from instdiff_lib.evaluation.metrics.clip_metrics import tiny_clip

    from instdiff_lib.datasets.coco import protocol_items
    from instdiff_lib.weights.checkpoint import build_components
    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

    items = protocol_items(shapes.instances_json, shapes.captions_json, attribute="color")
    generate_eval(items[:2], tmp_path, InstanceDiffusionPipeline(build_components("tiny")), "color", steps=1,
                  mis=0.0, image_format="png", progress=False)
    r = score_setting("color", instances_json=shapes.instances_json, captions_json=shapes.captions_json,
                      images_dir=tmp_path, clip=tiny_clip(), progress=False)
    att = r["metrics"]["attribute"]
    assert 0.0 <= att["values"]["acc"] <= 1.0 and att["n_evaluated"] > 0


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
