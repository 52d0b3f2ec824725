"""Training the Shapes world's evaluators offline: the YOLO-seg detector and the small CLIP.

* **Detector**: an ultralytics YOLOv8n-seg built from its bundled yaml (random init, nothing downloaded),
  trained on the Shapes train split exported to YOLO-seg format (one polygon per instance: the outline of
  the largest connected part of its visible mask).
* **CLIP**: an open_clip model from :data:`~instdiff_lib.evaluation.shapes_evaluators.SHAPES_CLIP_CONFIG`,
  trained from scratch contrastively on instance crops (cut with the metric's own ``crop_instance``) and whole
  images. A crop's text is drawn from its instance caption ("a red striped circle") and the zero-shot templates
  of the attribute metric ("a red object", "a stripes object"), so the official prompt ``"a {} object"`` is in
  distribution; whole images pair with their global caption. Duplicate texts in a batch are handled with a
  multi-positive loss (every image whose text equals a given text is a positive of that text).

Both trainings are deterministic from their seed on a CPU (ultralytics ``deterministic=True``). The loaders
the metrics use live in :mod:`instdiff_lib.evaluation.shapes_evaluators`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from instdiff_lib.datasets.shapes import SHAPES, ShapesSplit, make_shapes_dataset, train_split
from instdiff_lib.evaluation.shapes_evaluators import (CLIP_CONFIG_FILE, CLIP_WEIGHTS, SHAPES_CLIP_CONFIG, YOLO_IMGSZ,
                                                       YOLO_WEIGHTS, ZERO_SHOT)
from instdiff_lib.fileio import atomic_write_text, sha256_file
from instdiff_lib.layouts.layout import decode_mask


# ---- YOLO-seg ------------------------------------------------------------------------------------------
def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """Outline of the largest connected part of a bool mask as [N, 2] pixel (x, y) vertices, or None if empty."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)
    if len(c) < 3:  # a 1-2 pixel sliver: its pixel square
        x0, y0 = c.min(0)
        x1, y1 = c.max(0) + 1
        c = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    return c


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link to ``src`` at ``dst`` (a copy across file systems); an existing ``dst`` is kept."""
    if not dst.exists():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def export_yolo_seg(splits: dict[str, ShapesSplit], out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/images/<name>/``, ``out_dir/labels/<name>/`` (one ``class x1 y1 x2 y2 ...`` line per
    instance, normalised) for each split and ``out_dir/data.yaml``; returns the yaml path."""
    out = Path(out_dir)
    for name, split in splits.items():
        inst = json.loads(Path(split.instances_json).read_text())
        anns_of: dict[int, list[dict]] = {}
        for a in inst["annotations"]:
            anns_of.setdefault(a["image_id"], []).append(a)
        img_dir, lab_dir = out / "images" / name, out / "labels" / name
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        for img in inst["images"]:
            _link_or_copy(Path(split.image_dir) / img["file_name"], img_dir / img["file_name"])
            w, h = img["width"], img["height"]
            lines = []
            for a in anns_of.get(img["id"], []):
                poly = mask_polygon(decode_mask(a["segmentation"], w, h))
                if poly is None:
                    continue
                xy = (poly / np.array([w, h])).clip(0, 1).reshape(-1)
                lines.append(f"{a['category_id'] - 1} " + " ".join(f"{v:.5f}" for v in xy))
            (lab_dir / (Path(img["file_name"]).stem + ".txt")).write_text("\n".join(lines) + ("\n" if lines else ""))
    names = "\n".join(f"  {k}: {s}" for k, s in enumerate(SHAPES))
    yaml = out / "data.yaml"
    yaml.write_text(f"path: {out.resolve()}\ntrain: images/{list(splits)[0]}\nval: images/{list(splits)[-1]}\n"
                    f"names:\n{names}\n")
    return yaml


@dataclass
class YoloTrainConfig:
    n_train: int = 1500  # first images of the Shapes train split
    n_val: int = 200  # images of a held-out "yoloval" split (never the report's val split)
    epochs: int = 20
    imgsz: int = YOLO_IMGSZ
    batch: int = 32
    seed: int = 0
    data_seed: int = 0
    model_yaml: str = "yolov8n-seg.yaml"
    workers: int = 2


def train_shapes_yolo(data_root: str | os.PathLike, out_dir: str | os.PathLike, cfg: YoloTrainConfig | None = None,
                      ) -> dict[str, Any]:
    """Train the Shapes detector from its yaml; writes ``out_dir/shapes_yolo.pt`` (fp16, ultralytics format) and
    ``out_dir/shapes_yolo.json`` (config, metrics of its last validation, sha256). Returns that summary."""
    from instdiff_lib.offline import setup_offline_env

    cfg = cfg or YoloTrainConfig()
    setup_offline_env()
    from ultralytics import YOLO

    out = Path(out_dir).resolve()  # ultralytics puts a relative `project` under its own runs/ folder
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_root)
    train = train_split(root, cfg.n_train, cfg.data_seed, 64)
    val = make_shapes_dataset(root, cfg.n_val, cfg.data_seed, split="yoloval")
    work = out / "yolo_work"
    subset = _subset_split(train, cfg.n_train, work / "train_subset")
    yaml = export_yolo_seg({"train": subset, "val": val}, work / "data")
    t0 = time.perf_counter()
    model = YOLO(cfg.model_yaml)
    model.train(data=str(yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch, device="cpu",
                workers=cfg.workers, seed=cfg.seed, deterministic=True, pretrained=False, amp=False, plots=False,
                project=str(work), name="run", exist_ok=True, verbose=False, val=True)
    secs = time.perf_counter() - t0
    best = work / "run" / "weights" / "best.pt"
    if not best.exists():
        best = work / "run" / "weights" / "last.pt"
    metrics = {k: float(v) for k, v in (getattr(model.trainer, "metrics", None) or {}).items()}
    return _yolo_summary(out, cfg, secs, metrics, best, label=str(out_dir))


def _yolo_summary(out: Path, cfg: YoloTrainConfig, secs: float, metrics: dict, best: Path,
                  label: str) -> dict[str, Any]:
    target = out / YOLO_WEIGHTS
    if best.resolve() != target.resolve():
        shutil.copyfile(best, target)  # ultralytics saves fp16 weights without optimizer state (strip_optimizer)
    summary = {"config": asdict(cfg), "train_seconds": round(secs, 1), "val_metrics_yoloval": metrics,
               "weights": target.name, "sha256": sha256_file(target), "bytes": target.stat().st_size,
               "reproduce": f"instdiff train shapes-yolo --out {label} --epochs {cfg.epochs} --n-train {cfg.n_train}"}
    atomic_write_text(out / "shapes_yolo.json", json.dumps(summary, indent=2))
    return summary


def _subset_split(split: ShapesSplit, n: int, out_dir: Path) -> ShapesSplit:
    """The first ``n`` images of ``split`` as a split of its own (annotation files filtered; images linked)."""
    inst = json.loads(Path(split.instances_json).read_text())
    caps = json.loads(Path(split.captions_json).read_text())
    keep = {img["id"] for img in sorted(inst["images"], key=lambda i: i["id"])[:n]}
    for d in (inst, caps):
        d["images"] = [i for i in d["images"] if i["id"] in keep]
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] in keep]
    paths = ShapesSplit._paths(out_dir, "train")
    paths["image_dir"].mkdir(parents=True, exist_ok=True)
    paths["instances_json"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths["instances_json"], json.dumps(inst))
    atomic_write_text(paths["captions_json"], json.dumps(caps))
    for img in inst["images"]:
        _link_or_copy(Path(split.image_dir) / img["file_name"], paths["image_dir"] / img["file_name"])
    return ShapesSplit(root=out_dir, n_images=len(keep), split="train", **paths)


# ---- CLIP ----------------------------------------------------------------------------------------------
@dataclass
class ClipTrainConfig:
    n_images: int = 3000  # first images of the Shapes train split
    steps: int = 2400
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    p_template: float = 0.5  # probability that a crop's text is a zero-shot template instead of its caption
    p_whole_image: float = 0.15  # share of batch entries that are whole images with the global caption
    seed: int = 0
    data_seed: int = 0


def _clip_examples(split: ShapesSplit, n_images: int, crop_size: int) -> dict[str, Any]:
    """Instance crops (resized to ``crop_size``) with caption / colour / texture, and whole images with captions."""
    from instdiff_lib.evaluation.metrics.clip_metrics import crop_instance

    inst = json.loads(Path(split.instances_json).read_text())
    caps = {c["image_id"]: c["caption"] for c in json.loads(Path(split.captions_json).read_text())["annotations"]}
    images = sorted(inst["images"], key=lambda i: i["id"])[:n_images]
    keep = {i["id"] for i in images}
    anns_of: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        if a["image_id"] in keep:
            anns_of.setdefault(a["image_id"], []).append(a)
    crops, captions, colors, textures, wholes, whole_caps = [], [], [], [], [], []
    for img in images:
        with Image.open(Path(split.image_dir) / img["file_name"]) as im:
            pil = im.convert("RGB")
        wholes.append(np.asarray(pil.resize((crop_size, crop_size), Image.BICUBIC)))
        whole_caps.append(caps[img["id"]])
        for a in anns_of.get(img["id"], []):
            crop = crop_instance(pil, a["bbox"], img["width"], img["height"])
            crops.append(np.asarray(crop.resize((crop_size, crop_size), Image.BICUBIC)))
            captions.append(a["caption"])
            colors.append(a["color"])
            textures.append(a["texture"])
    return {"crops": np.stack(crops), "captions": captions, "colors": colors, "textures": textures,
            "wholes": np.stack(wholes), "whole_captions": whole_caps}


def _normalize(x: np.ndarray, preprocess) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> the CLIP preprocess' normalisation (its last transform), [N, 3, H, W]."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    norm = preprocess.transforms[-1]
    return (t - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, text_index: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
    """Contrastive loss with repeated texts: ``txt`` [U, D] are the batch's unique texts, ``text_index[b]`` the
    text of image b. Image->text: cross-entropy to its text; text->image: mean log-likelihood of its images."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # [B, U]
    i2t = F.cross_entropy(logits, text_index)
    pos = F.one_hot(text_index, txt.shape[0]).T.float()  # [U, B]
    logp = F.log_softmax(logits.T, dim=-1)
    t2i = -((logp * pos).sum(-1) / pos.sum(-1)).mean()
    return (i2t + t2i) / 2


def train_shapes_clip(data_root: str | os.PathLike, out_dir: str | os.PathLike, cfg: ClipTrainConfig | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Train the Shapes CLIP; writes ``shapes_clip.pt`` (fp16 state dict), ``shapes_clip_config.json`` and
    ``shapes_clip.json`` (config, loss, sha256). Returns that summary."""
    from instdiff_lib.evaluation.metrics.clip_metrics import load_clip

    cfg = cfg or ClipTrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clip = load_clip(SHAPES_CLIP_CONFIG, pretrained=None)
    model = clip.model.train()
    size = SHAPES_CLIP_CONFIG["vision_cfg"]["image_size"]
    split = train_split(Path(data_root), cfg.n_images, cfg.data_seed, 64)
    ex = _clip_examples(split, cfg.n_images, size)
    crops = _normalize(ex["crops"], clip.preprocess)
    wholes = _normalize(ex["wholes"], clip.preprocess)
    rng = np.random.default_rng(cfg.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    n_whole = int(round(cfg.batch * cfg.p_whole_image))
    losses, t0 = [], time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="train Shapes CLIP", disable=not progress):
        ci = rng.integers(0, len(crops), cfg.batch - n_whole)
        wi = rng.integers(0, len(wholes), n_whole)
        texts = []
        for i in ci:
            u = rng.random()
            if u < cfg.p_template / 2:
                texts.append(ZERO_SHOT.format(ex["colors"][i]))
            elif u < cfg.p_template:
                texts.append(ZERO_SHOT.format(ex["textures"][i]))
            else:
                texts.append(ex["captions"][i])
        texts += [ex["whole_captions"][i] for i in wi]
        uniq = sorted(set(texts))
        index = torch.tensor([uniq.index(t) for t in texts])
        pixels = torch.cat([crops[ci], wholes[wi]])
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        img = model.encode_image(pixels)
        txt = model.encode_text(clip.tokenizer(uniq))
        loss = multi_positive_clip_loss(img, txt, index, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    secs = time.perf_counter() - t0
    weights = out / CLIP_WEIGHTS
    tmp = weights.with_suffix(".tmp")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    atomic_write_text(out / CLIP_CONFIG_FILE, json.dumps(SHAPES_CLIP_CONFIG, indent=2))
    summary = {"config": asdict(cfg), "model_config": SHAPES_CLIP_CONFIG, "n_crops": int(len(crops)),
               "train_seconds": round(secs, 1), "loss_first": float(np.mean(losses[:20])),
               "loss_last": float(np.mean(losses[-20:])), "weights": weights.name, "sha256": sha256_file(weights),
               "bytes": weights.stat().st_size,
               "reproduce": f"instdiff train shapes-clip --out {out} --steps {cfg.steps} --n-images {cfg.n_images}"}
    atomic_write_text(out / "shapes_clip.json", json.dumps(summary, indent=2))
    return summary


# ---- CLI ----------------------------------------------------------------------------------------------------
def add_evaluator_parsers(tsub) -> None:
    """``instdiff train shapes-yolo`` and ``instdiff train shapes-clip`` (registered by ``train.add_train_parser``)."""
    dy, dc = YoloTrainConfig(), ClipTrainConfig()
    y = tsub.add_parser("shapes-yolo", help="train the Shapes YOLOv8n-seg detector from its yaml (CPU, offline)")
    y.add_argument("--out", default="models/shapes-yolo")
    y.add_argument("--data-dir", default="outputs/data/shapes")
    y.add_argument("--epochs", type=int, default=dy.epochs)
    y.add_argument("--n-train", type=int, default=dy.n_train)
    y.add_argument("--n-val", type=int, default=dy.n_val)
    y.add_argument("--batch", type=int, default=dy.batch)
    y.add_argument("--seed", type=int, default=dy.seed)
    y.set_defaults(func=lambda a: _print(train_shapes_yolo(a.data_dir, a.out, YoloTrainConfig(
        n_train=a.n_train, n_val=a.n_val, epochs=a.epochs, batch=a.batch, seed=a.seed))))
    c = tsub.add_parser("shapes-clip", help="train the Shapes CLIP contrastively on crops and captions (CPU)")
    c.add_argument("--out", default="models/shapes-clip")
    c.add_argument("--data-dir", default="outputs/data/shapes")
    c.add_argument("--steps", type=int, default=dc.steps)
    c.add_argument("--n-images", type=int, default=dc.n_images)
    c.add_argument("--batch", type=int, default=dc.batch)
    c.add_argument("--seed", type=int, default=dc.seed)
    c.set_defaults(func=lambda a: _print(train_shapes_clip(a.data_dir, a.out, ClipTrainConfig(
        steps=a.steps, n_images=a.n_images, batch=a.batch, seed=a.seed))))


def _print(summary: dict) -> int:
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0
