"""The Shapes world's evaluators as the metrics load them: a YOLO-seg detector and a small CLIP, with their files.

They plug into the *same* metric functions as the COCO evaluators (``metrics.detection.yolo_predict`` /
``coco_ap`` / ``mask_iou``, ``metrics.pim``, ``metrics.clip_metrics.attribute_binding`` / ``clip_score``):
only the weights differ. How they are trained: :mod:`instdiff_lib.training.evaluators`.

* **Detector**: an ultralytics YOLOv8n-seg; 6 classes = the shapes; class k is COCO category k + 1
  (``class_map="index+1"``). Images and the detector input are 64 px (``YOLO_IMGSZ``).
* **CLIP**: an open_clip model from the config :data:`SHAPES_CLIP_CONFIG` (ViT, 32 px input); the official
  zero-shot prompt ``"a {} object"`` is in its training distribution. Its image tower also serves as the feature
  extractor of the Shapes world's Fréchet distance (:class:`ClipImageFeatures`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from instdiff_lib.datasets.shapes import COLORS, TEXTURES
from instdiff_lib.fileio import sha256_file

YOLO_IMGSZ = 64
YOLO_WEIGHTS = "shapes_yolo.pt"
CLIP_WEIGHTS = "shapes_clip.pt"
CLIP_CONFIG_FILE = "shapes_clip_config.json"
ZERO_SHOT = "a {} object"  # = metrics.clip_metrics.PROMPT (checked in tests)

SHAPES_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def load_shapes_yolo(folder: str | os.PathLike):
    """The committed Shapes detector (an ``ultralytics.YOLO``); checks its sha256 against ``shapes_yolo.json``."""
    from instdiff_lib.evaluation.metrics.detection import load_yolo

    folder = Path(folder)
    _check_sha(folder / YOLO_WEIGHTS, folder / "shapes_yolo.json")
    return load_yolo(folder / YOLO_WEIGHTS)


def _check_sha(weights: Path, summary: Path) -> None:
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found: train it with `instdiff train shapes-yolo|shapes-clip`")
    if summary.exists():
        want = json.loads(summary.read_text()).get("sha256")
        if want and sha256_file(weights) != want:
            raise RuntimeError(f"{weights}: sha256 differs from {summary.name} (corrupt or replaced file)")


def load_shapes_clip(folder: str | os.PathLike, device: str = "cpu"):
    """The committed Shapes CLIP as a :class:`metrics.clip_metrics.Clip` (fp32, eval mode)."""
    from instdiff_lib.evaluation.metrics.clip_metrics import load_clip

    folder = Path(folder)
    _check_sha(folder / CLIP_WEIGHTS, folder / "shapes_clip.json")
    cfg = json.loads((folder / CLIP_CONFIG_FILE).read_text())
    clip = load_clip(cfg, pretrained=None, device=device)
    state = torch.load(folder / CLIP_WEIGHTS, map_location=device, weights_only=True)
    clip.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return clip._replace(model=clip.model.eval())


SHAPES_ATTRIBUTE_VOCAB = {"color": COLORS, "texture": TEXTURES}


class ClipImageFeatures(torch.nn.Module):
    """A CLIP image encoder as an FID feature extractor: uint8 [B, 3, H, W] -> [B, D] (resized to the CLIP input,
    normalised as its preprocess does). Used for the Shapes world's Fréchet distance (``FD_clip``)."""

    def __init__(self, clip):
        super().__init__()
        self.model = clip.model
        norm = clip.preprocess.transforms[-1]
        self.size = SHAPES_CLIP_CONFIG["vision_cfg"]["image_size"]
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        return self.model.encode_image((x - self.mean) / self.std).float()
