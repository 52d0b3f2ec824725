"""Scoring one evaluation setting end to end, with the guards in front of every metric.

    result = score_setting("mask", instances_json="coco/annotations/instances_val2017_512.json",
                           images_dir="gen/mask", real_image_dir="coco/val2017", yolo="yolov8m-seg.pt")

Order of work, and why:

1. The files to score are the ones the generation manifest lists, and only those (``check_manifest`` refuses a
   folder that does not match it). The ``real`` setting scores the dataset's own photos with the same code:
   the paper's upper-bound control row, labelled as such.
2. Generated files that are byte- or pixel-identical to real images are refused (``assert_generated``): the
   mistake that produced the last public reproduction's box/mask table.
3. Metrics per setting: box/mask/real -> YOLO -> COCO AP/AR (bbox + segm) and mask IoU; point/scribble ->
   YOLO -> PiM; color/texture -> CLIP attribute binding + CLIP_local on ground-truth box crops. Optional:
   global CLIP score, FID against real images.
4. Every metric reports n_evaluated / n_skipped; timings per stage give images/s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from instdiff_lib.datasets.coco import protocol_items
from instdiff_lib.evaluation.generation import SETTINGS, read_manifest


def _files_for(setting: str, items, images_dir, real_image_dir, near: bool = True,
               images_setting: str | None = None) -> tuple[list[tuple[int, Path]], str]:
    from instdiff_lib.evaluation.metrics.guards import assert_generated, check_manifest

    if setting == "real":
        if real_image_dir is None:
            raise ValueError("the real-image control needs --real-images (the dataset's image folder)")
        files = [(it.image_id, Path(real_image_dir) / it.file_name) for it in items]
        missing = [str(p) for _, p in files if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} real images missing, e.g. {missing[:3]}")
        return files, "real images (control: no generation; detected at their own size, mapped to the GT frame)"
    if images_dir is None:
        raise ValueError(f"setting {setting!r} needs the generated images folder")
    rows = read_manifest(images_dir)
    if not rows:
        raise FileNotFoundError(f"{images_dir}: no manifest-*.jsonl (generate with `instdiff eval generate`)")
    check_manifest(images_dir, rows)
    settings_in_folder = {r.get("setting") for r in rows}
    made_as = images_setting or setting
    if settings_in_folder != {made_as}:
        raise ValueError(f"{images_dir} holds images of setting(s) {sorted(map(str, settings_in_folder))}, not "
                         f"{made_as!r}")
    if SETTINGS[made_as]["attribute"] != SETTINGS[setting]["attribute"]:
        raise ValueError(f"images of setting {made_as!r} cannot be scored as {setting!r}: their prompts carry another "
                         "attribute")
    files = [(r["image_id"], Path(images_dir) / r["file"]) for r in rows]
    if real_image_dir is not None:
        assert_generated([p for _, p in files], real_image_dir, near=near)
        return files, "generated (checked against real images)"
    return files, "generated (NOT checked against real images: pass real_image_dir)"


def predict_real(yolo, files: list[tuple[int, Path]], items_by_id: dict, **kw):
    """The real-image control's detections: YOLO on each photo as it is (its own size and aspect ratio, like YOLO's
    published real-image numbers), then mapped into the ground truth's frame (COCO: the 512x512 resized annotations)
    exactly as the ground truth was (:func:`~instdiff_lib.evaluation.metrics.detection.results_to_frame`)."""
    from instdiff_lib.evaluation.metrics.detection import _image_size, results_to_frame, yolo_predict

    preds = yolo_predict(yolo, files, **kw)
    frames = {i: (_image_size(p), (items_by_id[i].height, items_by_id[i].width)) for i, p in files if p.is_file()}
    return results_to_frame(preds, frames)


def attribute_items(items) -> list:
    """Protocol items -> ``AttributeItem`` (COCO ``[x, y, w, h]`` boxes in the item's GT frame)."""
    from instdiff_lib.evaluation.metrics.clip_metrics import AttributeItem

    return [AttributeItem(it.image_id, it.width, it.height,
                          [[x0 * it.width, y0 * it.height, (x1 - x0) * it.width, (y1 - y0) * it.height]
                           for x0, y0, x1, y1 in it.boxes], it.phrases, it.attributes) for it in items]


def _pack(result) -> dict:
    return {"values": result.values, "n_evaluated": result.n_evaluated, "n_skipped": result.n_skipped,
            "skipped": [list(map(str, s)) for s in result.skipped[:50]]}


def score_setting(setting: str, *, instances_json, captions_json=None, images_dir=None, real_image_dir=None,
                  yolo="yolov8m-seg.pt", clip=None, fid_real_dir=None, fid_feature=None, device: str = "cpu",
                  batch: int = 16, seed: int = 0, limit: int | None = None, progress: bool = True,
                  phrase_source: str = "official", imgsz: int | None = None, class_map=None,
                  attribute_vocab=None, fid_size: int = 512, fid_weights=None, guard_near: bool = True,
                  shuffle: int = 0, images_setting: str | None = None) -> dict[str, Any]:
    """Score one setting; returns {"metrics": {...}, "n_images", "timing_s", "images_per_s", "source"}.

    The folder's manifest must say its images were made for ``setting``, or for ``images_setting`` when that is
    given: images made with one setting's inputs may be scored as another setting of the same attribute, when the
    caller says so (an ablation's mask-setting row fed only boxes scores the box setting's images).

    ``shuffle=k`` (k >= 1) is the shuffled-layout control: after the guards and ``limit``, the i-th scored image
    is scored against the layout (annotations, points, attributes) of the (i + k)-th, cyclically; same metric code.

    The defaults are the COCO protocol. The Shapes world passes ``phrase_source="annotation"`` (see
    :func:`protocol_items`), its detector's ``imgsz`` and ``class_map="index+1"``, its attribute vocabulary, and
    a custom FID ``fid_feature`` with ``fid_size`` 64, and ``guard_near=False``: a good Shapes generation is meant to
    look like its real image, where a generated photo never sits within a few grey levels of a real one."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {list(SETTINGS)}, got {setting!r}")
    attribute = SETTINGS[setting]["attribute"]
    timing: dict[str, float] = {}
    t = time.perf_counter()
    items = protocol_items(instances_json, captions_json, attribute=attribute, phrase_source=phrase_source)
    by_id = {it.image_id: it for it in items}
    files, source = _files_for(setting, items[:limit] if (setting == "real" and limit) else items, images_dir,
                               real_image_dir, near=guard_near, images_setting=images_setting)
    unknown = [i for i, _ in files if i not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} scored images are not in {instances_json}, e.g. {unknown[:5]}")
    if limit:
        files = files[:limit]
    if shuffle:
        if len(files) < 2 or shuffle % len(files) == 0:
            raise ValueError(f"shuffle={shuffle} needs at least 2 images and must not be a multiple of their number "
                             f"({len(files)}): every image must be scored against another image's layout")
        files = [(files[(k + shuffle) % len(files)][0], path) for k, (_, path) in enumerate(files)]
        source += f"; each image scored against the layout of the image {shuffle} later (shuffled-layout control)"
    ids = [i for i, _ in files]
    timing["load_and_guards"] = time.perf_counter() - t
    metrics: dict[str, Any] = {}

    if setting in ("box", "mask", "real", "point", "scribble"):
        from instdiff_lib.evaluation.metrics.detection import coco_ap, load_yolo, mask_iou, yolo_predict
        from instdiff_lib.evaluation.metrics.guards import sanity_flag_real_like
        from instdiff_lib.evaluation.metrics.pim import pim

        t = time.perf_counter()
        kw = {"imgsz": imgsz} if imgsz else {}
        predict = (lambda m, f, **a: predict_real(m, f, by_id, **a)) if setting == "real" else yolo_predict
        preds = predict(load_yolo(yolo), files, device=device, batch=batch, progress=progress, class_map=class_map, **kw)
        timing["detector"] = time.perf_counter() - t
        t = time.perf_counter()
        if setting in ("box", "mask", "real"):
            metrics["box"] = _pack(coco_ap(instances_json, preds, "bbox", ids))
            metrics["mask"] = _pack(coco_ap(instances_json, preds, "segm", ids))
            miou = mask_iou(instances_json, preds, ids)
            metrics["mask_iou"] = {**_pack(miou), "per_image": {str(k): v for k, v in miou.details["per_image"].items()}}
            if setting != "real":
                warning = sanity_flag_real_like({"AP_box": metrics["box"]["values"]["AP"],
                                                 "AP50_box": metrics["box"]["values"]["AP50"],
                                                 "AP_mask": metrics["mask"]["values"]["AP"],
                                                 "AP50_mask": metrics["mask"]["values"]["AP50"]}, setting)
                if warning:
                    metrics["warning"] = warning
        else:
            metrics["pim"] = _pack(pim(instances_json, preds, ids, mode=setting, seed=seed))
        timing["scoring"] = time.perf_counter() - t

    if attribute is not None:
        from instdiff_lib.evaluation.metrics.clip_metrics import attribute_binding, load_clip
        from instdiff_lib.evaluation.metrics.clip_metrics import COLORS as CLIP_COLORS
        from instdiff_lib.datasets.coco import TEXTURES_COCO

        clip = clip if clip is not None else load_clip(device=device)
        attr_items = attribute_items([by_id[i] for i in ids])
        vocab = attribute_vocab or (CLIP_COLORS if attribute == "color" else TEXTURES_COCO)
        t = time.perf_counter()
        metrics["attribute"] = _pack(attribute_binding(attr_items, dict(files), clip, vocab, batch_size=64))
        timing["clip"] = time.perf_counter() - t

    if fid_real_dir is not None:
        from instdiff_lib.evaluation.metrics.fid import fid

        t = time.perf_counter()
        reals = sorted(p for p in Path(fid_real_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        metrics["fid"] = _pack(fid([p for _, p in files], reals, device=device, feature=fid_feature, size=fid_size,
                                   weights_path=fid_weights))
        timing["fid"] = time.perf_counter() - t

    total = sum(timing.values())
    return {"setting": setting, "source": source, "n_images": len(files), "image_ids": ids, "metrics": metrics,
            "timing_s": {k: round(v, 3) for k, v in timing.items()},
            "images_per_s": round(len(files) / total, 3) if total > 0 else None}


def summary_lines(result: dict) -> list[str]:
    lines = [f"setting {result['setting']}: {result['n_images']} images ({result['source']})"]
    for name, m in result["metrics"].items():
        if isinstance(m, dict) and "values" in m:
            vals = ", ".join(f"{k}={v:.4f}" for k, v in m["values"].items() if isinstance(v, (int, float)))
            lines.append(f"  {name}: {vals}  [n_evaluated={m['n_evaluated']}, n_skipped={m['n_skipped']}]")
        else:
            lines.append(f"  {name}: {m}")
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in result["timing_s"].items())
    lines.append(f"  timing: {timing}; throughput {result['images_per_s']} images/s")
    return lines

