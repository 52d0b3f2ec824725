"""Mini evaluators of the Shapes world (issue 4, item 3): a YOLO-seg detector and a small CLIP, trained offline.

They plug into the *same* metric functions as the COCO evaluators (``metrics.detection.yolo_predict`` /
``coco_ap`` / ``mask_iou``, ``metrics.pim``, ``metrics.clip_metrics.attribute_binding`` / ``clip_score``):
only the weights differ.

* **Detector**: an ultralytics YOLOv8n-seg built from its bundled yaml (random init, nothing downloaded),
  trained on the Shapes train split exported to YOLO-seg format (one polygon per instance: the outline of
  the largest connected part of its visible mask). 6 classes = the shapes; class k is COCO category k + 1
  (``class_map="index+1"``). Images and the detector input are 64 px (``YOLO_IMGSZ``; shapes are 15-33 px).
* **CLIP**: an open_clip model from the config :data:`SHAPES_CLIP_CONFIG` (ViT, 32 px input), trained from
  scratch contrastively on instance crops (cut with the metric's own ``crop_instance``) and whole images. A
  crop's text is drawn from its instance caption ("a red striped circle") and the zero-shot templates of the
  attribute metric ("a red object", "a stripes object"), so the official prompt ``"a {} object"`` is in
  distribution; whole images pair with their global caption. Duplicate texts in a batch are handled with a
  multi-positive loss (every image whose text equals a given text is a positive of that text).

Both trainings are deterministic from their seed on a CPU (ultralytics ``deterministic=True``).
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

from .fileio import atomic_write_text, sha256_file
from .layout import decode_mask
from .shapes import COLORS, SHAPES, TEXTURES, ShapesSplit

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
    from .offline import setup_offline_env
    from .shapes import make_shapes_dataset
    from .train import _train_split

    cfg = cfg or YoloTrainConfig()
    setup_offline_env()
    from ultralytics import YOLO

    out = Path(out_dir).resolve()  # ultralytics puts a relative `project` under its own runs/ folder
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_root)
    train = _train_split(root, cfg.n_train, cfg.data_seed, 64)
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


def load_shapes_yolo(folder: str | os.PathLike):
    """The committed Shapes detector (an ``ultralytics.YOLO``); checks its sha256 against ``shapes_yolo.json``."""
    from .metrics.detection import load_yolo

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


# ---- CLIP ----------------------------------------------------------------------------------------------
@dataclass
class ClipTrainConfig:
    n_images: int = 3000  # first images of the Shapes train split
    steps: int = 800
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
    from .metrics.clip_metrics import crop_instance

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
    from .metrics.clip_metrics import load_clip
    from .train import _train_split

    cfg = cfg or ClipTrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clip = load_clip(SHAPES_CLIP_CONFIG, pretrained=None)
    model = clip.model.train()
    size = SHAPES_CLIP_CONFIG["vision_cfg"]["image_size"]
    split = _train_split(Path(data_root), cfg.n_images, cfg.data_seed, 64)
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


def load_shapes_clip(folder: str | os.PathLike, device: str = "cpu"):
    """The committed Shapes CLIP as a :class:`metrics.clip_metrics.Clip` (fp32, eval mode)."""
    from .metrics.clip_metrics import load_clip

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


# ---- the extension in the Shapes world ---------------------------------------------------------------------
SHAPES_PLANNER_LABEL = "offline-shapes-template"


class ShapesPlanner:
    """A deterministic planner for the Shapes world (no language model): the shapes named in the prompt, each
    with the colour / texture words just before it ("a red striped circle and a blue square"), the rest drawn by
    the seed, topped up to ``n_instances``; boxes are squares of 14-30 px placed by the seed on the canvas. Its
    layouts say ``offline-shapes-template`` wherever they go (``PlannedLayout.planner_label``)."""

    label = SHAPES_PLANNER_LABEL

    def __init__(self, *, size: int = 64, n_instances: tuple[int, int] = (2, 4), seed: int = 0):
        self.size, self.n_range, self.seed = int(size), tuple(n_instances), int(seed)

    def settings(self) -> dict:
        return {"planner": self.label, "canvas": [self.size, self.size], "n_instances": list(self.n_range),
                "seed": self.seed, "note": "template layouts of the Shapes world; not produced by a language model"}

    def plan(self, prompt: str | None = None, *, seed: int | None = None, scene_type: str | None = None):
        import zlib

        from .layout import Instance, Layout
        from .planner import PlannedLayout, PlanReport
        from .shapes import TEXTURE_ADJECTIVE, global_caption

        seed = self.seed if seed is None else int(seed)
        rng = np.random.default_rng([seed, zlib.crc32((prompt or "").encode())])
        adjective_of = {adj: tex for tex, adj in TEXTURE_ADJECTIVE.items() if adj}
        words = (prompt or "").lower().replace(",", " ").split()
        wanted = []
        for k, w in enumerate(words):
            shape = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
            if shape in SHAPES:
                before = words[max(0, k - 3):k]
                color = next((b for b in before if b in COLORS), None)
                texture = next((adjective_of.get(b, b) for b in before if b in adjective_of or b in TEXTURES), None)
                wanted.append((shape, color, texture))
        lo, hi = self.n_range
        target = max(len(wanted), int(rng.integers(lo, hi + 1)))
        while len(wanted) < target:
            wanted.append((None, None, None))
        instances, report = [], PlanReport()
        for shape, color, texture in wanted[:8]:
            shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
            color = color or COLORS[int(rng.integers(len(COLORS)))]
            texture = texture or TEXTURES[int(rng.integers(len(TEXTURES)))]
            side = int(rng.integers(14, 31))
            x0, y0 = (int(v) for v in rng.integers(0, self.size - side + 1, 2))
            adj = TEXTURE_ADJECTIVE[texture]
            caption = f"a {color} {adj} {shape}" if adj else f"a {color} {shape}"
            instances.append(Instance(caption=" ".join(caption.split()), category=shape,
                                      box=(x0 / self.size, y0 / self.size, (x0 + side) / self.size,
                                           (y0 + side) / self.size)))
            report.categories.append({"name": shape, "label": shape, "is_coco": False, "how": "shapes vocabulary"})
        caption = global_caption([i.caption for i in instances])
        layout = Layout(caption=caption, width=self.size, height=self.size, instances=instances).validate()
        return PlannedLayout(layout=layout, planner_label=self.label, report=report, raw={"prompt": prompt},
                             prompt=prompt or caption, scene_type="shapes", seed=seed)


class ShapesYoloDetector:
    """The Shapes detector behind the placement API (``detect(images, queries) -> [Detections]``): a box's score
    for a query is its confidence when its class name is the query, else 0 (closed vocabulary: the six shapes)."""

    def __init__(self, yolo, threshold: float = 0.25, imgsz: int = YOLO_IMGSZ):
        self.yolo, self.threshold, self.imgsz = yolo, float(threshold), int(imgsz)

    def settings(self) -> dict:
        return {"backend": "shapes-yolo", "model": "models/shapes-yolo", "imgsz": self.imgsz}

    def detect(self, images, queries):
        from .placement import Detections

        out = []
        for img, qs in zip(images, queries):
            res = self.yolo.predict(img, imgsz=self.imgsz, conf=0.01, verbose=False, device="cpu")[0]
            boxes = res.boxes.xyxy.cpu().numpy() if len(res.boxes) else np.zeros((0, 4))
            names = [res.names[int(c)] for c in res.boxes.cls.tolist()] if len(res.boxes) else []
            conf = res.boxes.conf.cpu().numpy() if len(res.boxes) else np.zeros(0)
            scores = np.array([[conf[i] if names[i] == q else 0.0 for q in qs] for i in range(len(names))])
            out.append(Detections(boxes, scores.reshape(len(names), len(qs)), list(qs)))
        return out


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
