"""The two evaluation worlds of the report: the Shapes world (profile ``smoke``) and COCO (profile ``full``).

A :class:`World` bundles what an evaluation notebook needs: the model, the val annotations and real images,
the detector and CLIP with their protocol settings. The metric code is the same for both; only data, weights
and a few protocol switches differ (``phrase_source``, detector ``imgsz``/``class_map``, attribute vocabulary,
FID features). Notebooks build one with :func:`get_world` from their parameters.

    world = get_world("smoke")                       # Shapes: committed mini model + evaluators, CPU
    world = get_world("full", coco_root="data/coco", model="weights/instdiff-sd15", device="cuda")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instdiff_lib.results import project_root
from instdiff_lib.weights.embedded import models_dir

WORLD_LABELS = {"shapes": "Shapes (mini scale)", "coco": "COCO val2017 (paper protocol)"}
PROFILE_WORLD = {"smoke": "shapes", "full": "coco"}


@dataclass
class World:
    name: str  # "shapes" | "coco"
    model: str  # spec for InstanceDiffusionPipeline.from_pretrained
    instances_json: Path
    captions_json: Path
    real_image_dir: Path
    yolo: Any  # weights path / YOLO object
    clip_spec: dict  # how to load CLIP (see clip())
    negative_prompt: str
    phrase_source: str = "official"
    imgsz: int | None = None
    class_map: Any = None
    attribute_vocab: dict | None = None
    fid_size: int = 512
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int | None = None  # UNet batch cap of the pipeline (None: chosen from free GPU memory)
    layout_batch: int = 1  # images sampled together per pipeline call (generate_eval); equal up to float rounding
    fid_weights: Path | None = None  # the FID Inception weights file (None: torch.hub's cache)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return WORLD_LABELS[self.name]

    def items(self, attribute: str | None = None, limit: int | None = None) -> list:
        from instdiff_lib.datasets.coco import protocol_items

        key = ("items", attribute)
        if key not in self._cache:
            self._cache[key] = protocol_items(self.instances_json, self.captions_json, attribute=attribute,
                                              phrase_source=self.phrase_source)
        items = self._cache[key]
        return items[:limit] if limit else items

    def pipeline(self):
        import torch

        from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

        if "pipe" not in self._cache:
            self._cache["pipe"] = InstanceDiffusionPipeline.from_pretrained(
                self.model, device=self.device, dtype=getattr(torch, self.dtype), max_batch=self.max_batch)
        return self._cache["pipe"]

    def clip(self):
        if "clip" not in self._cache:
            if self.name == "shapes":
                from instdiff_lib.evaluation.shapes_evaluators import load_shapes_clip

                self._cache["clip"] = load_shapes_clip(self.clip_spec["folder"], device=self.device)
            else:
                from instdiff_lib.evaluation.metrics.clip_metrics import load_clip

                self._cache["clip"] = load_clip(self.clip_spec.get("model", "ViT-L-14"),
                                                self.clip_spec.get("pretrained", "laion2b_s32b_b82k"), device=self.device,
                                                cache_dir=self.clip_spec.get("cache_dir"))
        return self._cache["clip"]

    def detector(self):
        if "yolo" not in self._cache:
            if self.name == "shapes":
                from instdiff_lib.evaluation.shapes_evaluators import load_shapes_yolo

                self._cache["yolo"] = load_shapes_yolo(Path(self.yolo).parent)
            else:
                from instdiff_lib.evaluation.metrics.detection import load_yolo

                self._cache["yolo"] = load_yolo(self.yolo)
        return self._cache["yolo"]

    def fid_feature(self):
        """Shapes: Fréchet distance in the Shapes CLIP's image features (no Inception weights offline, and
        Inception features mean little on 64 px shapes); COCO: None = the standard Inception FID."""
        if self.name != "shapes":
            return None
        from instdiff_lib.evaluation.shapes_evaluators import ClipImageFeatures

        return ClipImageFeatures(self.clip())

    def score(self, setting: str, images_dir: str | os.PathLike | None, *, limit: int | None = None,
              fid: bool = False, progress: bool = False, shuffle: int = 0, images_setting: str | None = None) -> dict:
        from instdiff_lib.evaluation.scoring import score_setting
        from instdiff_lib.evaluation.generation import SETTINGS

        attribute = SETTINGS[setting]["attribute"]
        needs_clip = attribute is not None
        return score_setting(
            setting, instances_json=self.instances_json, captions_json=self.captions_json,
            images_dir=images_dir, real_image_dir=self.real_image_dir, yolo=self.detector(),
            clip=self.clip() if needs_clip else None, device=self.device, limit=limit, progress=progress,
            phrase_source=self.phrase_source, imgsz=self.imgsz, class_map=self.class_map,
            attribute_vocab=(self.attribute_vocab or {}).get(attribute) if attribute else None,
            fid_real_dir=self.real_image_dir if fid else None, fid_feature=self.fid_feature() if fid else None,
            fid_size=self.fid_size, fid_weights=self.fid_weights, guard_near=self.name != "shapes", shuffle=shuffle,
            images_setting=images_setting)


def shapes_world(n_val: int = 64, data_root: str | os.PathLike | None = None, seed: int = 0,
                 model: str | None = None, device: str = "cpu", max_batch: int | None = None,
                 layout_batch: int = 8) -> World:
    """The Shapes world: a deterministic val split (written on first use; ``n_val`` images, ``seed``) and the
    committed mini model and evaluators. ``layout_batch``: images sampled together (8: on 2 CPU cores the 64-px
    model's UNet costs half as much per sample in batches of 16 or more as in the 2 of one image's guidance halves;
    ``instdiff bench --layout-batch`` measures it)."""
    from instdiff_lib.datasets.shapes import current_split, make_shapes_dataset
    from instdiff_lib.evaluation.shapes_evaluators import SHAPES_ATTRIBUTE_VOCAB, YOLO_IMGSZ, YOLO_WEIGHTS

    root = Path(data_root) if data_root else project_root() / "outputs" / "data" / f"shapes_val_{n_val}_s{seed}"
    split = current_split(root, "val", seed, n_images=n_val) or make_shapes_dataset(root, n_val, seed, split="val")
    m = models_dir()
    return World(name="shapes", model=model or str(m / "shapes-mini"), instances_json=split.instances_json,
                 captions_json=split.captions_json, real_image_dir=split.image_dir,
                 yolo=m / "shapes-yolo" / YOLO_WEIGHTS, clip_spec={"folder": m / "shapes-clip"},
                 negative_prompt="", phrase_source="annotation", imgsz=YOLO_IMGSZ, class_map="index+1",
                 attribute_vocab=SHAPES_ATTRIBUTE_VOCAB, fid_size=64, device=device, max_batch=max_batch,
                 layout_batch=layout_batch)


def coco_world(coco_root: str | os.PathLike, model: str, yolo: str = "yolov8m-seg.pt", device: str = "cuda",
               dtype: str = "float16", clip_model: str = "ViT-L-14", clip_pretrained: str = "laion2b_s32b_b82k",
               clip_cache_dir: str | os.PathLike | None = None, fid_weights: str | os.PathLike | None = None,
               max_batch: int | None = None, layout_batch: int = 1) -> World:
    """COCO val2017 with the released weights: the paper protocol (spec §4). ``clip_cache_dir`` is the Hugging Face
    cache holding the CLIP weights, ``fid_weights`` the Inception file (report/assets.py: their documented places);
    ``max_batch`` caps the UNet batch, ``layout_batch`` images are sampled per pipeline call. ``coco_root`` holds
    ``annotations/instances_val2017_512.json`` (the protocol's 512x512 frame: ``instdiff data resize-512
    annotations/instances_val2017.json annotations/instances_val2017_512.json``),
    ``annotations/captions_val2017.json`` and ``val2017/`` (``instdiff data coco`` downloads them)."""
    from instdiff_lib.evaluation.generation import EVAL_NEGATIVE_PROMPT

    root = Path(coco_root)
    ann = root / "annotations"
    for p in (ann / "instances_val2017.json", ann / "captions_val2017.json", root / "val2017"):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: run `instdiff data coco --root {root}` on a machine with internet")
    if not (ann / "instances_val2017_512.json").exists():
        raise FileNotFoundError(f"{ann / 'instances_val2017_512.json'} not found: run `instdiff data resize-512 "
                                f"{ann / 'instances_val2017.json'} {ann / 'instances_val2017_512.json'}`")
    return World(name="coco", model=model, instances_json=ann / "instances_val2017_512.json",
                 captions_json=ann / "captions_val2017.json", real_image_dir=root / "val2017", yolo=yolo,
                 clip_spec={"model": clip_model, "pretrained": clip_pretrained,
                            "cache_dir": str(clip_cache_dir) if clip_cache_dir else None},
                 negative_prompt=EVAL_NEGATIVE_PROMPT, device=device, dtype=dtype, max_batch=max_batch, layout_batch=layout_batch,
                 fid_weights=Path(fid_weights) if fid_weights else None)


def get_world(profile: str, **kw) -> World:
    """``smoke`` -> :func:`shapes_world`, ``full`` -> :func:`coco_world` (keyword arguments go through)."""
    if profile not in PROFILE_WORLD:
        raise ValueError(f"profile must be one of {sorted(PROFILE_WORLD)}, got {profile!r}")
    return shapes_world(**kw) if profile == "smoke" else coco_world(**kw)
