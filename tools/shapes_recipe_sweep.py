"""Recipe sweep for the Shapes mini model on a GPU (a development tool; the committed model is trained on the CPU).

Question it answers: does the fuser grounding of ``shapes-mini`` emerge within the CPU budget (about 1,900 steps
of batch 16 in 30 minutes on 2 cores) under some recipe, or with a few times more data? Each variant trains
from scratch with ``Trainer(device="cuda")`` and is scored by two detector-free proxies:

* ``grounding_gap`` (library): loss with the null / another image's layout minus the loss with the true one;
* colour-in-mask accuracy: 48 val layouts generated with boxes only (25 PLMS steps, guidance 3, MIS 0.36), each
  instance's visible mask voted to the nearest Shapes palette colour; chance is about 1/8.

    python tools/shapes_recipe_sweep.py prep W 5000            # train cache + 48 val layouts under W
    python tools/shapes_recipe_sweep.py train W NAME cuda      # one VARIANTS entry -> W/NAME/proxy.json
    python tools/shapes_recipe_sweep.py ceiling W NAME cuda BATCH LR MINUTES DEST EVERY   # gap every EVERY steps
tools/shapes_recipe_sweep.sh runs the sweep on the device machine. Results of 2026-12-04: models/shapes-mini/recipe_sweep/.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from instdiff_lib.model.config import get_config
from instdiff_lib.datasets.shapes import COLOR_RGB, COLORS, PATTERN_RGB, ShapesSplit, make_shapes_dataset, shapes_layouts
from instdiff_lib.training.diffusion import ShapesTrainSet, Trainer, TrainConfig, grounding_gap

COORD = {"coord_channels": 2}
VARIANTS = {  # name: (unet config overrides, train config overrides, steps)
    "base": ({}, {}, 1900),
    "coord": (COORD, {}, 1900),
    "coord_lr2": (COORD, {"lr": 2e-3}, 1900),
    "coord_ema995": (COORD, {"ema_decay": 0.995}, 1900),
    "coord_attn16": (dict(COORD, attention_resolutions=(2, 4)), {}, 1100),
    "coord_nodrop": (COORD, {"p_drop_modality": 0.0, "p_keep_point_only": 0.0, "p_keep_seg_only": 0.0}, 1900),
    "coord_long": (COORD, {}, 5000),
    "base_long": ({}, {}, 5000),
}
PALETTE = np.array([COLOR_RGB[c] for c in COLORS] + [PATTERN_RGB[c] for c in COLORS], np.float64)


def model_config(work: Path, name: str) -> str:
    cfg = get_config("shapes-mini")
    cfg = cfg.replace(unet=dataclasses.replace(cfg.unet, **VARIANTS[name][0]))
    path = work / f"{name}_model.json"
    cfg.save(path)
    return str(path)


def prep(work: Path, n_train: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "n_train").write_text(str(n_train))
    ShapesTrainSet(work / "data", n_train, 0, 64, seg_size=64, n_slots=30)
    make_shapes_dataset(work / "val", 48, 7, split="val")


def colour_of(pixels: np.ndarray) -> str | None:
    """Majority palette colour of the pixels within 40 RGB units of some palette entry (None: no such pixel)."""
    if len(pixels) == 0:
        return None
    d = ((pixels[:, None, :].astype(np.float64) - PALETTE[None]) ** 2).sum(-1)
    near = d.min(1) < 40.0**2
    if not near.any():
        return None
    return COLORS[np.bincount(d.argmin(1)[near] % 8, minlength=8).argmax()]


def colour_proxy(model_dir: Path, val_root: Path, device: str, n: int = 48) -> dict:
    from PIL import Image

    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

    pipe = InstanceDiffusionPipeline.from_pretrained(str(model_dir), device=device)
    hit = total = 0
    images = []
    for _, _, layout in shapes_layouts(ShapesSplit.load(val_root, "val"))[:n]:
        a = np.asarray(pipe(layout, seed=0, steps=25, guidance=3.0, alpha=1.0, mis=0.36, negative_prompt="",
                            drop="box", progress=False).images[0])
        images.append(a)
        for inst in layout.instances:  # captions read "a <colour> <texture> <shape>"
            hit += int(colour_of(a[inst.mask]) == inst.caption.split()[1])
            total += 1
    rows = [np.concatenate(images[r * 8:(r + 1) * 8], 1) for r in range(len(images) // 8)]
    if rows:
        Image.fromarray(np.concatenate(rows, 0)).save(model_dir / "grid.png")
    return {"colour_acc": hit / max(total, 1), "n_instances": total}


def _gap(tr: Trainer, n: int) -> dict:
    """The gap of the EMA weights (what is exported)."""
    backup = {k: p.detach().clone() for k, p in tr.model.named_parameters()}
    tr._load_params(tr.ema)
    try:
        return grounding_gap(tr.model, tr.comp.vae, tr.acp, tr.data, n_images=n)
    finally:
        tr._load_params(backup)


def _config(work: Path, run: str, model: str, device: str, **kw) -> TrainConfig:
    return TrainConfig(model=model, out_dir=str(work / run), data_dir=str(work / "data"),
                       n_train_images=int((work / "n_train").read_text()), figure=None, progress=False,
                       device=device, ckpt_every=10**9, log_every=50, **kw)


def train(work: Path, name: str, device: str, minutes: float = 4.0) -> dict:
    unet_over, train_over, steps = VARIANTS[name]
    t0 = time.time()
    tr = Trainer(_config(work, name, model_config(work, name), device, steps=steps, minutes=minutes, **train_over))
    summary = tr.run()
    res = {"name": name, "steps": tr.step, "train_s": round(time.time() - t0, 1), "final_loss": summary["final_loss"],
           "grounding_gap": _gap(tr, 256), **colour_proxy(work / name, work / "val", device),
           "unet": unet_over, "train": train_over}
    (work / name / "proxy.json").write_text(json.dumps(res, indent=1))
    (work / name / "state.pt").unlink()
    return res


def ceiling(work: Path, name: str, device: str, batch: int, lr: float, minutes: float, dest: Path, every: int) -> None:
    """As many steps as ``minutes`` allow (coord variant), the gap every ``every`` steps, the colour proxy at the end."""
    tr = Trainer(_config(work, name, model_config(work, "coord"), device, steps=10**6, minutes=minutes,
                         batch_size=batch, lr=lr))
    t0 = time.time()
    log = dest / f"ceiling_{name}.jsonl"
    while not tr.done():
        tr.train_step()
        tr.elapsed_s = time.time() - t0
        if tr.step % every == 0:
            with open(log, "a") as f:
                f.write(json.dumps({"step": tr.step, "s": round(time.time() - t0, 1), **_gap(tr, 128)}) + "\n")
    tr.export()
    with open(log, "a") as f:
        f.write(json.dumps({"final_step": tr.step, **colour_proxy(work / name, work / "val", device, n=24)}) + "\n")


if __name__ == "__main__":
    mode, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    if mode == "prep":
        prep(work, int(sys.argv[3]))
    elif mode == "train":
        print(json.dumps(train(work, sys.argv[3], sys.argv[4])))
    elif mode == "ceiling":
        ceiling(work, sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]),
                Path(sys.argv[8]), int(sys.argv[9]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: prep | train | ceiling")
