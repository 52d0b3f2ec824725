"""Numbers other people reported, in one place, each with its source. Nothing here is ours.

The blog tables read "paper" and "seed reproduction" columns from here and "ours" from ``results/*.json``.
Percent metrics are stored as percentages (38.8 means AP = 0.388), as the sources print them.
"""

from __future__ import annotations

PAPER = "Wang et al., InstanceDiffusion, CVPR 2024, Table 1 (official repo docs/results.png)"
PAPER_ATTR = "Wang et al., CVPR 2024, attribute-binding table (as quoted by the seed reproduction's blog)"
SEED = "Jellemvdl/InstanceDiffusion-extension README/blogpost (500 of 5000 COCO val images)"
SEED_NOTE = ("the seed's box/mask numbers equal YOLOv8m-seg's published scores on real COCO photos "
             "(box 49.9, mask 40.8): real images were scored, not generated ones (shared/spec/prior_reproductions.md §0)")

# (table, row) -> {metric: value}; rows: "InstanceDiffusion", "Upper bound (real images)", "GLIGEN", ...
PAPER_NUMBERS: dict[tuple[str, str], dict[str, float]] = {
    ("boxes", "InstanceDiffusion"): {"AP": 38.8, "AP50": 55.4, "AR": 52.9, "FID": 23.9},
    ("masks", "InstanceDiffusion"): {"IoU": 61.6, "IoU50": 71.4, "AP": 27.1, "AP50": 50.0, "AR": 38.1, "FID": 25.5},
    ("points", "InstanceDiffusion"): {"PiM": 81.1, "FID": 27.5},
    ("scribbles", "InstanceDiffusion"): {"PiM": 72.4, "FID": 27.3},
    ("boxes", "Upper bound (real images)"): {"AP": 50.2, "AP50": 66.7, "AR": 61.0},
    ("masks", "Upper bound (real images)"): {"AP": 40.8, "AP50": 63.5, "AR": 58.0},
    ("boxes", "GLIGEN"): {"AP": 19.6, "AP50": 35.0, "AR": 30.7, "FID": 27.0},
    ("boxes", "InstanceDiffusion (hybrid)"): {"AP": 44.6, "AP50": 59.6, "AR": 58.8, "FID": 25.5},
    ("color", "InstanceDiffusion"): {"Acc": 54.4, "CLIP_local": 0.250},
    ("texture", "InstanceDiffusion"): {"Acc": 26.8, "CLIP_local": 0.225},
}
PAPER_SOURCES = {key: (PAPER_ATTR if key[0] in ("color", "texture") else PAPER) for key in PAPER_NUMBERS}

SEED_NUMBERS: dict[str, dict[str, float]] = {
    "boxes": {"AP": 49.9, "AP50": 66.8, "AR": 68.6},
    "masks": {"AP": 40.8, "AP50": 63.5, "AR": 56.0},
    "points": {"PiM": 33.66},
    "scribbles": {"PiM": 23.56},
    "color": {"Acc": 53.3, "CLIP_local": 0.248},
    "texture": {"Acc": 26.9, "CLIP_local": 0.226},
}

# The seed's LLM extension (GPT-4o layouts, CogVLM placement check), and the corrected values.
SEED_EXTENSION = {
    "realism_mean_1to5": 2.38,  # 100 images, hand-rated
    "clip_global_vitb32": 0.278,  # +- 0.028, refined images
    "mean_iou_reported": 0.42,  # xywh formula applied to xyxy boxes (bug)
    "mean_iou_vs_intended_boxes": 0.23,  # correct xyxy IoU vs GPT's intended boxes (recomputed)
    "mean_iou_vs_fed_boxes": 0.66,  # correct IoU vs the boxes the model was actually given
}

# Published scores of YOLOv8m-seg on real COCO val2017 (640 px): the tell-tale of scoring real photos.
YOLOV8M_SEG_REAL = {"box_AP": 49.9, "mask_AP": 40.8}
