"""Training the mini InstanceDiffusion from scratch on the Shapes world, on a CPU.

    instdiff train shapes --out outputs/train_shapes --steps 1500            # reproducible: a fixed step count
    instdiff train shapes --out outputs/train_shapes --minutes 30            # a wall-clock budget
    instdiff train shapes --out outputs/train_shapes --steps 3000 --resume   # continue from OUT/state.pt

    from instdiff_lib.training.diffusion import TrainConfig, train_shapes
    summary = train_shapes(TrainConfig(out_dir="outputs/train_shapes", steps=1500))
    pipe = InstanceDiffusionPipeline.from_pretrained("outputs/train_shapes")   # the exported EMA weights

What is trained, and how (the official recipe, adapted to training *everything* from scratch):

* Objective: the model config's ``schedule.prediction_type`` (shapes-mini: v, else epsilon), MSE, ``t ~ U{0..999}`` on the LDM "linear" schedule
  (:func:`instdiff_lib.sampling.sampler.alphas_cumprod`), ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``; ``x_0`` is the
  image in [-1, 1] folded by the model's parameter-free space-to-depth "autoencoder".
* Conditioning, as at inference: global caption -> text tower ``last_hidden_state`` (77 tokens, EOS padded);
  each instance caption -> text tower ``pooler_output`` (all instances of the batch in one call: with EOS
  padding and the causal mask this equals encoding them one at a time); grounding tokens from
  ``InstanceUNet.tokenize`` with the fusers on (gate 1). The text tower, UNet, fusers, UniFusion tokenizer
  and ScaleU all receive gradients and train jointly.
* Fuser gates: officially ``alpha_attn`` / ``alpha_dense`` start at 0 because the SD backbone is pretrained
  and must not be disturbed at first. Here nothing is pretrained, so they start at ``fuser_gate_init``
  (1.0, i.e. tanh(1) = 0.76) and the grounding path gets gradients from the first step.
* Conditioning dropout (for classifier-free guidance and the modality presets):
  - null grounding with probability ``p_null_grounding`` (0.1): every grounding field zero, exactly
    :meth:`UniFusion.null_grounding` (the sampler's unconditional branch). Officially one coin per *batch*
    (``openaimodel.forward``); by default here one coin per *sample* (same rate, lower-variance gradients;
    ``null_grounding_unit="batch"`` gives the official behaviour);
  - modality drops per batch like the official ``reset_dropout_train``: boxes, points, scribbles and masks
    (polygons + segs) each dropped with probability ``p_drop_modality`` (0.1); masks kept => boxes and
    points kept; points are dropped only with boxes and masks; "points only" with probability
    ``p_keep_point_only`` (0.1); "boxes + points + masks, no scribbles" with probability
    ``p_keep_seg_only`` (0.1) when masks are kept; never everything (boxes are then kept);
  - the global caption is replaced by the empty prompt "" with probability ``p_drop_caption`` (0.1).
* AdamW (weight decay on matrices/kernels only), linear warm-up then a constant learning rate (optionally a cosine
  decay from ``lr_decay_start``), gradient
  clipping at ``grad_clip`` (1.0), an EMA of all weights (decay ``min(ema_decay, (1 + k) / (10 + k))``);
  the EMA weights are what is exported.

Determinism and resuming: the data order (a permutation per epoch from ``(seed, epoch)``) and each step's
randomness (timesteps, noise, dropout coins, from ``(seed, step)``) are functions of the step number only, so
the weights at step k never depend on the budget, and ``--resume`` from ``state.pt`` (model, EMA, optimizer,
step, pending log window, RNG states, TrainConfig; written atomically) continues exactly: N steps + resume +
M steps equals N + M steps straight, bit for bit on a CPU with a fixed thread count (tested). A run stopped by
``--minutes`` after k steps is therefore reproduced by ``--steps k`` (its summary names k).

Outputs in ``out_dir``: ``state.pt`` (the resumable checkpoint, large: not for committing), ``loss.csv``,
``train_config.json``, ``summary.json`` and the exported EMA model (``unet/vae/text_encoder.safetensors``,
``model_config.json``, ``manifest.json`` via :func:`save_converted`, fp16 by default), so
``InstanceDiffusionPipeline.from_pretrained(out_dir)`` loads it. The loss curve goes to ``figure``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from instdiff_lib.weights.checkpoint import Components, build_components, load_converted, save_converted
from instdiff_lib.model.config import BETA_SCHEDULES, DropFlags, ModelConfig, get_config
from instdiff_lib.fileio import atomic_write_text
from instdiff_lib.layouts.layout import grounding_arrays
from instdiff_lib.sampling.sampler import alphas_cumprod
from instdiff_lib.datasets.shapes import WORLD_VERSION, shapes_layouts, train_split
from instdiff_lib.model.text import MAX_TOKENS, PromptTooLongError, clip_tokenizer

STATE_FORMAT = "instdiff-train-v1"
CACHE_VERSION = 1
NULL_UNITS = ("sample", "batch")
EXPORT_DTYPES = ("float16", "float32")

# Fields that may change when resuming (they do not affect the weights at a given step).
RESUME_MUTABLE = frozenset({"steps", "minutes", "ckpt_every", "log_every", "out_dir", "figure", "export_dtype",
                            "threads", "progress", "data_dir", "cache", "resume", "device", "gap_every", "gap_images"})


LR_DECAY_FIELDS = frozenset({"lr_decay_start", "lr_decay_steps", "lr_min_ratio"})


# ---- configuration ------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in ``state.pt``, ``train_config.json`` and the manifest)."""

    model: str = "shapes-mini"  # preset name or model config path
    out_dir: str = "outputs/train_shapes"
    data_dir: str = "outputs/data/shapes"  # Shapes root: the "train" split is written there (or reused)
    n_train_images: int = 5000
    data_seed: int = 0
    image_size: int = 64
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    lr_decay_start: int | None = None  # step where a cosine decay of the learning rate begins (None: constant)
    lr_decay_steps: int = 1000  # length of that decay, down to lr * lr_min_ratio (then constant)
    lr_min_ratio: float = 0.05
    steps: int | None = None  # total steps (this or `minutes`, or both: whichever comes first)
    minutes: float | None = None  # total wall-clock training budget (summed over resumed sessions)
    ema_decay: float = 0.999
    p_null_grounding: float = 0.1
    null_grounding_unit: str = "sample"  # "sample" (ours) or "batch" (official)
    p_drop_modality: float = 0.1
    p_drop_masks: float | None = None  # masks (polygons + segs) dropped per batch; None: p_drop_modality (official)
    p_keep_point_only: float = 0.1
    p_keep_seg_only: float = 0.1
    p_drop_caption: float = 0.1
    fuser_gate_init: float = 1.0
    pyramid_noise: float = 0.0  # discount d of multi-resolution training noise (0: white noise, the official rule)
    grad_clip: float = 1.0
    ckpt_every: int = 250
    log_every: int = 10
    gap_every: int = 500  # grounding gap (live weights, boxes fed) into loss.csv every so many steps; 0 = never
    gap_images: int = 64  # first train images the gap is measured on
    seed: int = 0
    figure: str | None = "figures/train_shapes__loss.png"
    export_dtype: str = "float16"
    threads: int | None = None  # torch intra-op threads (None: leave as is)
    device: str = "cpu"  # the committed model is trained on the CPU; "cuda" for quick recipe sweeps (not bit-equal)
    cache: bool = True  # cache the precomputed training set next to the split
    progress: bool = True
    resume: bool = False
    init_from: str | None = None  # an exported model folder whose weights start the run (fine-tuning); None: scratch
    # init_from a model with attention at fewer resolutions: the run's extra attention blocks start as the identity
    # (their output projection zeroed), so the grown model computes the source's function at step 0
    grow: bool = False
    # the noise schedule of the trained model (None: the model preset's); written into the exported model config
    beta_schedule: str | None = None  # "scaled_linear" (SD's) or "linear" (DDPM's pixel-space betas)
    beta_start: float | None = None
    beta_end: float | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give a training budget: steps and/or minutes")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.lr_decay_steps < 1 or not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_decay_steps must be >= 1 and lr_min_ratio in [0, 1], got {self.lr_decay_steps}, "
                             f"{self.lr_min_ratio}")
        if self.gap_every < 0 or self.gap_images < 2:
            raise ValueError(f"gap_every must be >= 0 and gap_images >= 2, got {self.gap_every}, {self.gap_images}")
        for name in ("n_train_images", "batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("p_null_grounding", "p_drop_modality", "p_keep_point_only", "p_keep_seg_only", "p_drop_caption"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.pyramid_noise < 1.0:
            raise ValueError(f"pyramid_noise must be in [0, 1), got {self.pyramid_noise}")
        if self.grow and not self.init_from:
            raise ValueError("grow needs init_from (the model to grow)")
        if self.beta_schedule is not None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.p_drop_masks is not None and not 0.0 <= self.p_drop_masks <= 1.0:
            raise ValueError(f"p_drop_masks must be in [0, 1], got {self.p_drop_masks}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.null_grounding_unit not in NULL_UNITS:
            raise ValueError(f"null_grounding_unit must be one of {NULL_UNITS}, got {self.null_grounding_unit!r}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {EXPORT_DTYPES}, got {self.export_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown train config field(s): {sorted(unknown)}")
        return cls(**d)


def lr_schedule(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimisation step ``step``: linear warm-up over ``warmup_steps``, then constant, then (from
    ``lr_decay_start``) a cosine decay over ``lr_decay_steps`` to ``lr * lr_min_ratio``. A function of the step
    only, so the weights at step k never depend on the total budget."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_decay_start is not None and step >= cfg.lr_decay_start:
        frac = min(1.0, (step - cfg.lr_decay_start) / max(1, cfg.lr_decay_steps))
        lr *= cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr


# ---- data ---------------------------------------------------------------------------------------
def _seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class ShapesTrainSet:
    """The first ``n_images`` images of the Shapes train split with everything a training step needs, precomputed.

    Per image: the RGB image (uint8; batches are in [-1, 1]); the grounding arrays of
    ``grounding_arrays(layout, seed=image_id, seg_size)`` for its instance slots (slots past ``max_inst`` are
    zero, padded back to ``n_slots`` per batch; segs bit-packed); the global caption's CLIP token ids (77, EOS
    padded) and each instance caption's token ids (EOS padded to the longest). Deterministic from
    ``(n_images, seed, size, seg_size)``; with ``cache`` the arrays are stored in ``root`` and reused.
    """

    ARRAYS = ("images", "n_inst", "boxes", "points", "scribbles", "polygons", "segs", "global_ids", "inst_ids",
              "image_ids")

    def __init__(self, root: str | Path, n_images: int, seed: int, size: int = 64, seg_size: int = 64,
                 n_slots: int = 30, cache: bool = True, progress: bool = False):
        self.root = Path(root)
        self.n_images, self.seed, self.size, self.seg_size, self.n_slots = n_images, seed, size, seg_size, n_slots
        tok = clip_tokenizer()
        self.empty_ids = np.asarray(tok([""], padding="max_length", max_length=MAX_TOKENS).input_ids[0], np.int64)
        key = hashlib.sha256(json.dumps([CACHE_VERSION, WORLD_VERSION, n_images, seed, size, seg_size,
                                         n_slots]).encode()).hexdigest()
        cache_path = self.root / f"train_cache_{key[:16]}.npz"
        if cache and cache_path.exists():
            with np.load(cache_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in self.ARRAYS}
                captions = json.loads(str(z["captions"]))
        else:
            arrays, captions = self._build(progress)
            if cache:
                tmp = cache_path.with_name(cache_path.name + ".tmp.npz")
                np.savez(tmp, captions=np.asarray(json.dumps(captions)), **arrays)
                os.replace(tmp, cache_path)
        for k, v in arrays.items():
            setattr(self, k, v)
        self.captions: list[str] = captions["global"]
        self.instance_captions: list[list[str]] = captions["instances"]
        self.max_inst = self.boxes.shape[1]

    def _build(self, progress: bool) -> tuple[dict[str, np.ndarray], dict]:
        from PIL import Image

        split = train_split(self.root, self.n_images, self.seed, self.size)
        items = shapes_layouts(split)[: self.n_images]
        if len(items) < self.n_images:
            raise RuntimeError(f"{split.root}: {len(items)} train images, {self.n_images} needed")
        n = len(items)
        K = max(1, max(len(layout.instances) for _, _, layout in items))
        if K > self.n_slots:
            raise ValueError(f"an image has {K} instances, more than the model's {self.n_slots} slots")
        S = self.seg_size
        a = {"images": np.zeros((n, 3, self.size, self.size), np.uint8), "n_inst": np.zeros(n, np.int64),
             "boxes": np.zeros((n, K, 4), np.float32), "points": np.zeros((n, K, 2), np.float32),
             "scribbles": None, "polygons": None, "segs": np.zeros((n, K, (S * S + 7) // 8), np.uint8),
             "image_ids": np.zeros(n, np.int64)}
        tok = clip_tokenizer()
        glob_caps, inst_caps = [], []
        for j, (image_id, file_name, layout) in enumerate(tqdm(items, desc="precompute Shapes train set",
                                                               disable=not progress, leave=False)):
            img = np.asarray(Image.open(split.image_dir / file_name).convert("RGB"))
            if img.shape[:2] != (self.size, self.size):
                raise ValueError(f"{file_name}: {img.shape[:2]} pixels, expected {self.size}")
            a["images"][j] = img.transpose(2, 0, 1)
            g = grounding_arrays(layout, seed=image_id, seg_size=S, n_slots=self.n_slots)
            k = len(layout.instances)
            if not (np.array_equal(g["masks"][:k], np.ones(k)) and not g["masks"][k:].any()):
                raise RuntimeError(f"image {image_id}: unexpected instance slot mask")
            if a["scribbles"] is None:
                a["scribbles"] = np.zeros((n, K, g["scribbles"].shape[1]), np.float32)
                a["polygons"] = np.zeros((n, K, g["polygons"].shape[1]), np.float32)
            for name in ("boxes", "points", "scribbles", "polygons"):
                if g[name][K:].any():
                    raise RuntimeError(f"image {image_id}: {name} beyond slot {K}")
                a[name][j] = g[name][:K]
            segs = g["segs"][:K]
            if not np.isin(segs, (0.0, 1.0)).all() or g["segs"][K:].any():
                raise RuntimeError(f"image {image_id}: segs are not binary masks in the first {K} slots")
            a["segs"][j] = np.packbits(segs.reshape(K, -1).astype(np.uint8), axis=-1)
            a["n_inst"][j] = k
            a["image_ids"][j] = image_id
            glob_caps.append(layout.caption)
            inst_caps.append([inst.caption for inst in layout.instances])
        # token ids: the global caption padded to 77 (SD), instance captions EOS-padded to the longest
        for i, c in enumerate(glob_caps):
            if len(tok(c).input_ids) > MAX_TOKENS:
                raise PromptTooLongError(f"train caption {i} is longer than {MAX_TOKENS} CLIP tokens: {c[:80]!r}")
        a["global_ids"] = np.asarray(tok(glob_caps, padding="max_length", max_length=MAX_TOKENS).input_ids, np.int32)
        unique = sorted({c for caps in inst_caps for c in caps})
        ids = dict(zip(unique, tok(unique).input_ids)) if unique else {}
        L = max([len(v) for v in ids.values()] + [2])
        if L > MAX_TOKENS:
            raise PromptTooLongError(f"an instance caption is longer than {MAX_TOKENS} CLIP tokens")
        eos = tok.eos_token_id
        a["inst_ids"] = np.full((n, K, L), eos, np.int32)
        for j, caps in enumerate(inst_caps):
            for s, c in enumerate(caps):
                a["inst_ids"][j, s, : len(ids[c])] = ids[c]
        return a, {"global": glob_caps, "instances": inst_caps}

    def __len__(self) -> int:
        return self.n_images

    @staticmethod
    def _slots_of(a: np.ndarray, n_slots: int) -> torch.Tensor:
        """[B, K, ...] -> [B, n_slots, ...], zero-padded."""
        out = np.zeros((a.shape[0], n_slots) + a.shape[2:], a.dtype)
        out[:, : a.shape[1]] = a
        return torch.from_numpy(out)

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Tensors for the images ``idx``: images [B, 3, H, W] in [-1, 1], the grounding fields of
        ``grounding_arrays`` with ``n_slots`` slots (``positive_embeddings`` come from the text tower), the
        global caption ids [B, 77] and the instance caption ids [B, max_inst, L] (``n_inst`` real ones)."""
        idx = np.asarray(idx, dtype=np.int64)
        B, K, N, S = len(idx), self.max_inst, self.n_slots, self.seg_size

        def slots(a: np.ndarray) -> torch.Tensor:
            return self._slots_of(a[idx], N)

        n_inst = self.n_inst[idx]
        segs = np.unpackbits(self.segs[idx], axis=-1, count=S * S).reshape(B, K, S, S).astype(np.float32)
        return {
            "images": torch.from_numpy(self.images[idx].astype(np.float32) / 127.5 - 1.0),
            "boxes": slots(self.boxes), "points": slots(self.points), "scribbles": slots(self.scribbles),
            "polygons": slots(self.polygons), "segs": self._slots_of(segs, N),
            "masks": torch.from_numpy((np.arange(N)[None, :] < n_inst[:, None]).astype(np.float32)),
            "n_inst": torch.from_numpy(n_inst),
            "global_ids": torch.from_numpy(self.global_ids[idx].astype(np.int64)),
            "inst_ids": torch.from_numpy(self.inst_ids[idx].astype(np.int64)),
            "empty_ids": torch.from_numpy(self.empty_ids),
        }


# ---- the training step ----------------------------------------------------------------------------
class Trainable(nn.Module):
    """The trained modules of a :class:`Components` under one parent: ``unet`` (InstanceUNet: diffusers UNet,
    fusers, UniFusion ``position_net``, ScaleU) and ``text`` (the CLIP text tower)."""

    def __init__(self, comp: Components):
        super().__init__()
        self.unet = comp.unet
        self.text = comp.text.model


def sample_drop_flags(gen: torch.Generator, p_drop: float = 0.1, p_point_only: float = 0.1,
                      p_seg_only: float = 0.1, p_drop_masks: float | None = None) -> DropFlags:
    """One batch's modality drops, following the official ``reset_dropout_train`` (scribble-only, mask-only and
    box-only modes have probability 0 there and are omitted; polygons and segs are one switch, ``masks``).
    ``p_drop_masks`` replaces ``p_drop`` for the masks only (same random numbers: ``None`` is the official rule)."""
    u = torch.rand(6, generator=gen, dtype=torch.float64).tolist()
    box, point, scribble = (v < p_drop for v in u[:3])
    masks = u[3] < (p_drop if p_drop_masks is None else p_drop_masks)
    if not masks:  # masks kept => boxes and points kept
        box = point = False
    if not box or not masks:
        point = False
    if u[4] < p_point_only:  # points only
        box, point, scribble, masks = True, False, True, True
    if u[5] < p_seg_only and not masks:  # everything but scribbles
        box, point, scribble, masks = False, False, True, False
    if box and point and scribble and masks:  # never everything: keep the boxes (as UniFusion.tokenize does)
        box = False
    return DropFlags(boxes=box, points=point, scribbles=scribble, masks=masks)


@dataclass
class StepNoise:
    """All randomness of one training step (a function of (seed, step))."""

    t: torch.Tensor  # [B] int64
    noise: torch.Tensor  # [B, C, h, w]
    null: torch.Tensor  # [B] bool: null grounding
    drop_caption: torch.Tensor  # [B] bool: empty prompt
    drop: DropFlags


def step_noise(cfg: TrainConfig, model_cfg: ModelConfig, step: int, batch_size: int | None = None) -> StepNoise:
    B = batch_size or cfg.batch_size
    gen = torch.Generator().manual_seed(_seed_of(cfg.seed, 1, step))
    drop = sample_drop_flags(gen, cfg.p_drop_modality, cfg.p_keep_point_only, cfg.p_keep_seg_only, cfg.p_drop_masks)
    if cfg.null_grounding_unit == "batch":
        null = (torch.rand(1, generator=gen, dtype=torch.float64) < cfg.p_null_grounding).expand(B).clone()
    else:
        null = torch.rand(B, generator=gen, dtype=torch.float64) < cfg.p_null_grounding
    drop_caption = torch.rand(B, generator=gen, dtype=torch.float64) < cfg.p_drop_caption
    T = model_cfg.schedule.num_train_timesteps
    t = torch.randint(0, T, (B,), generator=gen)
    u = model_cfg.unet
    noise = torch.randn(B, u.in_channels, u.sample_size, u.sample_size, generator=gen)
    if cfg.pyramid_noise:
        noise = pyramid_noise(noise, gen, cfg.pyramid_noise, group=u.in_channels // 3)
    return StepNoise(t, noise, null, drop_caption, drop)


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, discount: float, group: int) -> torch.Tensor:
    """White latent noise [B, C, H, W] plus ``discount**i`` times noise drawn at 1/2**i of the resolution (i = 1 ...
    down to 1 x 1, bilinearly upsampled), rescaled to unit variance per sample: the "multi-resolution" (pyramid)
    noise of later diffusion practice, not the paper's. At the schedule's top timestep (t = 961 for 25 steps) a 64 px
    image keeps sqrt(alphas_cumprod) ~ 0.07 of its signal, which at the scale of a whole shape is comparable to white
    noise averaged over the shape: a model trained on white noise reads the coarse structure of x_T as image, so its
    shapes follow the noise. With coarse noise in training that structure is unreliable and must come from the layout.

    The coarse draws are per *image* channel: ``group`` consecutive latent channels (the 2 x 2 sub-pixels of one
    colour under the space-to-depth fold) share them, so the added noise is low-frequency in pixel space too."""
    B, C, H, W = noise.shape
    out = noise.clone()
    level, h, w = 1, H // 2, W // 2
    while h >= 1 and w >= 1:
        coarse = torch.randn(B, C // group, h, w, generator=gen)
        up = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False) if (h, w) != (1, 1) else \
            coarse.expand(B, C // group, H, W)
        out = out + discount ** level * up.repeat_interleave(group, dim=1)
        level, h, w = level + 1, h // 2, w // 2
    return out / out.flatten(1).std(dim=1).view(B, 1, 1, 1)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Images of step ``step``: positions ``step * B ...`` of the stream of per-epoch permutations."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(pos // n):
        perm = np.random.default_rng([seed, 2, int(epoch)]).permutation(n)
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


def conditioning(model: Trainable, batch: dict[str, torch.Tensor], null: torch.Tensor | None = None,
                 drop_caption: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(context [B, 77, D], grounding dict for ``tokenize``) with gradients through the text tower.

    ``null[b]``: sample b gets the all-zero grounding; ``drop_caption[b]``: its prompt is "".
    """
    ids = batch["global_ids"]
    B = ids.shape[0]
    if drop_caption is not None and drop_caption.any():
        ids = torch.where(drop_caption[:, None], batch["empty_ids"][None, :].expand_as(ids), ids)
    context = model.text(input_ids=ids).last_hidden_state
    keep = batch["masks"] > 0
    if null is not None:
        keep = keep & ~null[:, None]
    K = batch["inst_ids"].shape[1]
    sel = keep[:, :K]
    D = model.text.config.hidden_size
    pos = torch.zeros(B, keep.shape[1], D, dtype=context.dtype, device=context.device)
    if sel.any():
        pooled = model.text(input_ids=batch["inst_ids"][sel]).pooler_output  # [M, D], batch order, slot order
        pos = pos.index_put((*sel.nonzero(as_tuple=True),), pooled)
    g = {k: batch[k] for k in ("boxes", "masks", "scribbles", "polygons", "segs", "points")}
    if null is not None and null.any():
        z = (~null).to(torch.float32)
        g = {k: v * z.view(B, *([1] * (v.ndim - 1))) for k, v in g.items()}
    g["positive_embeddings"] = pos
    return context, g


def _predicts_v(model: Trainable) -> bool:
    return model.unet.cfg.schedule.prediction_type == "v_prediction"


def diffusion_loss(model: Trainable, vae, batch: dict[str, torch.Tensor], t: torch.Tensor, noise: torch.Tensor,
                   acp: torch.Tensor, drop: DropFlags | None = None, null: torch.Tensor | None = None,
                   drop_caption: torch.Tensor | None = None) -> torch.Tensor:
    """Diffusion MSE (eps or v target, per the model config) of one batch at timesteps ``t`` with noise ``noise``
    (fusers on, gate 1).

    ``vae`` maps images in [-1, 1] to latents (``encode_latents``, the space-to-depth fold); ``acp`` is
    ``alphas_cumprod``; ``drop=None`` keeps every modality (``DropFlags.preset("all")``).
    """
    x0 = vae.encode_latents(batch["images"])
    a = acp[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    context, grounding = conditioning(model, batch, null, drop_caption)
    drop = drop or DropFlags.preset("all")
    objs = model.unet.tokenize(grounding, drop=drop)
    out = model.unet(xt, t, context, objs, gate=1, regions=model.unet.regions(grounding, drop, xt.shape[-2:]))
    if _predicts_v(model):
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    else:
        target = noise
    return F.mse_loss(out.float(), target)


@torch.no_grad()
def grounding_gap(model: Trainable, vae, acp: torch.Tensor, data: ShapesTrainSet, n_images: int = 256,
                  t_range: tuple[int, int] = (200, 1000), drop: str = "box", seed: int = 123,
                  batch_size: int = 32) -> dict[str, float]:
    """Does the model use its grounding? :func:`diffusion_loss` on the first ``n_images`` of ``data`` with the true
    grounding, with every image's grounding taken from the next image in the batch ("shuffled"), and with the null
    grounding ("null"); same images, timesteps (uniform in ``t_range``) and noise for all three, captions kept,
    modalities per the ``drop`` preset. A model that ignores its layout has gaps of ~0; each gap is the loss it
    would lose without (or with the wrong) layout. Detector-free, cheap: a training-time diagnostic."""
    if n_images < 2 or batch_size < 2:
        raise ValueError("grounding_gap needs at least 2 images per batch (the shuffled grounding)")
    device = acp.device
    gen = torch.Generator().manual_seed(seed)
    flags = DropFlags.preset(drop)
    u = model.unet.cfg.unet
    was_training = model.training
    model.eval()
    sums = {"true": 0.0, "shuffled": 0.0, "null": 0.0}
    total = 0
    try:
        for b0 in range(0, min(n_images, len(data)), batch_size):
            idx = np.arange(b0, min(b0 + batch_size, n_images, len(data)))
            B = len(idx)
            if B < 2:
                break
            batch = {k: v.to(device) for k, v in data.batch(idx).items()}
            t = torch.randint(t_range[0], t_range[1], (B,), generator=gen).to(device)
            noise = torch.randn(B, u.in_channels, u.sample_size, u.sample_size, generator=gen).to(device)
            nxt = torch.roll(torch.arange(B, device=device), -1)
            wrong = dict(batch, **{k: batch[k][nxt] for k in ("boxes", "points", "scribbles", "polygons", "segs",
                                                               "masks", "inst_ids")})
            null = torch.ones(B, dtype=torch.bool, device=device)
            for kind, b, nl in (("true", batch, None), ("shuffled", wrong, None), ("null", batch, null)):
                sums[kind] += float(diffusion_loss(model, vae, b, t, noise, acp, flags, null=nl)) * B
            total += B
    finally:
        model.train(was_training)
    res = {k: v / total for k, v in sums.items()}
    res.update(gap_null=res["null"] - res["true"], gap_shuffled=res["shuffled"] - res["true"], n_images=total)
    return res


def model_grounding_gap(comp: Components, n_images: int = 256, data_root: str | None = None,
                        data_seed: int = 0) -> dict:
    """:func:`grounding_gap` of a loaded Shapes model (e.g. a pipeline's components) on the first ``n_images`` Shapes
    train images (``data_root``, default ``outputs/data/shapes``; written if missing), rounded for a results file."""
    from instdiff_lib.results import project_root

    cfg = comp.cfg
    root = data_root or str(project_root() / "outputs" / "data" / "shapes")
    data = ShapesTrainSet(root, n_images, data_seed, cfg.image_size, seg_size=cfg.unifusion.seg_input_size,
                          n_slots=cfg.unifusion.n_slots)
    device = next(comp.unet.parameters()).device
    res = grounding_gap(Trainable(comp), comp.vae, alphas_cumprod(cfg.schedule).to(device), data, n_images)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in res.items()}


# ---- the trainer ----------------------------------------------------------------------------------
def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)



class Trainer:
    """One training run: data, model, optimizer, EMA, state. :func:`train_shapes` is ``Trainer(cfg).run()``."""

    CSV_FIELDS = ("step", "loss", "lr", "grad_norm", "elapsed_s", "steps_per_s", "gap_loss", "gap_null",
                  "gap_shuffled")

    def __init__(self, cfg: TrainConfig, data: ShapesTrainSet | None = None):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out_dir)
        self.state_path = self.out / "state.pt"
        self.csv_path = self.out / "loss.csv"
        if self.state_path.exists() and not cfg.resume:
            raise ValueError(f"{self.state_path} exists: pass --resume to continue it, or choose another --out")
        self.model_cfg = model_config_of(cfg)
        if self.model_cfg.image_size != cfg.image_size:
            raise ValueError(f"model {self.model_cfg.name!r} makes {self.model_cfg.image_size}px images, "
                             f"the train config asks for {cfg.image_size}px")
        if self.model_cfg.vae.kind != "space_to_depth":
            raise ValueError("training from scratch needs a parameter-free autoencoder (vae.kind 'space_to_depth')")
        if data is None:
            uf = self.model_cfg.unifusion
            data = ShapesTrainSet(cfg.data_dir, cfg.n_train_images, cfg.data_seed, cfg.image_size,
                                  seg_size=uf.seg_input_size, n_slots=uf.n_slots, cache=cfg.cache, progress=cfg.progress)
        self.data = data
        self.comp = build_components(self.model_cfg, seed=cfg.seed)
        for f in self.comp.unet.fusers:
            with torch.no_grad():
                f.alpha_attn.fill_(cfg.fuser_gate_init)
                f.alpha_dense.fill_(cfg.fuser_gate_init)
        if cfg.init_from and not (cfg.resume and self.state_path.exists()):  # a resumed run has its own weights
            self._init_from(cfg.init_from)
        self.device = torch.device(cfg.device)
        self.model = Trainable(self.comp).train().requires_grad_(True).to(self.device)
        self.comp.vae.to(self.device)
        self.acp = alphas_cumprod(self.model_cfg.schedule).to(self.device)
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), foreach=True)
        self.ema = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.step = 0
        self.elapsed_s = 0.0  # training wall time, summed over sessions
        self.window: list[float] = []  # losses since the last log row
        self.resumed_from: int | None = None
        if cfg.resume and self.state_path.exists():
            self.load_state()
        elif self.csv_path.exists():
            self.csv_path.unlink()  # a fresh run: no rows of an earlier one

    def _init_from(self, folder: str) -> None:
        """Start from an exported model's weights (all of them, strictly; its config must be this run's but for the
        noise schedule, and with ``grow`` for added attention resolutions, whose new blocks start as the identity)."""
        src = load_converted(folder)
        theirs, ours = src.cfg.to_dict(), self.model_cfg.to_dict()
        theirs.pop("schedule"), ours.pop("schedule")  # not a weight: a run may move a model to another schedule
        if self.cfg.grow:  # the one field a grown model may change
            if not set(theirs["unet"].pop("attention_resolutions")) <= set(ours["unet"].pop("attention_resolutions")):
                raise ValueError(f"--grow: {folder} has attention where {self.cfg.model!r} has none")
        if theirs != ours:
            diff = sorted(k for k, v in theirs.items() if ours.get(k) != v)
            raise ValueError(f"--init-from {folder}: its model config differs from {self.cfg.model!r} in {diff}")
        sd = {n: v.float() for n, v in Trainable(src).state_dict().items()}
        mine = Trainable(self.comp)
        new = sorted(set(mine.state_dict()) - set(sd))
        res = mine.load_state_dict(sd, strict=not self.cfg.grow)
        if res.unexpected_keys:  # grow: every source weight must find its place
            raise ValueError(f"--grow: {len(res.unexpected_keys)} weights of {folder} have no place in "
                             f"{self.cfg.model!r}, e.g. {res.unexpected_keys[:3]}")
        blocks = {m.group(1) for n in new if (m := re.match(r"(.*\.attentions\.\d+)\.", n))}
        strays = [n for n in new if not any(n.startswith(b + ".") for b in blocks)]
        if strays:
            raise ValueError(f"--grow: {len(strays)} new weights outside new attention blocks, e.g. {strays[:3]}")
        with torch.no_grad():  # a new block adds proj_out(...) to its input: zero, it is the identity
            for n, p in mine.named_parameters():
                if any(n.startswith(b + ".proj_out.") for b in blocks):
                    p.zero_()

    # ---- pieces ---------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return lr_schedule(self.cfg, step)

    def ema_decay_at(self, step: int) -> float:
        return min(self.cfg.ema_decay, (1 + step) / (10 + step))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_step(self) -> tuple[float, float]:
        """One optimisation step at ``self.step``; returns (loss, grad norm before clipping)."""
        cfg = self.cfg
        idx = batch_indices(len(self.data), cfg.batch_size, cfg.seed, self.step)
        batch = self._to_device(self.data.batch(idx))
        r = step_noise(cfg, self.model_cfg, self.step)  # drawn on the CPU (same draws on any device)
        r = dataclasses.replace(r, t=r.t.to(self.device), noise=r.noise.to(self.device), null=r.null.to(self.device),
                                drop_caption=r.drop_caption.to(self.device))  # no-ops on the CPU
        loss = diffusion_loss(self.model, self.comp.vae, batch, r.t, r.noise, self.acp, r.drop, r.null, r.drop_caption)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        lr = self.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        d = self.ema_decay_at(self.step)
        with torch.no_grad():
            names = [n for n, _ in self.model.named_parameters()]
            torch._foreach_lerp_([self.ema[n] for n in names], [p.detach() for p in self.model.parameters()], 1.0 - d)
        self.step += 1
        return float(loss.detach()), gnorm

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor], t: torch.Tensor, noise: torch.Tensor,
                  use_ema: bool = False) -> float:
        """Loss on a fixed batch with fixed t and noise, no conditioning dropout (all modalities kept)."""
        backup = None
        if use_ema:
            backup = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            self._load_params(self.ema)
        try:
            return float(diffusion_loss(self.model, self.comp.vae, self._to_device(batch), t.to(self.device),
                                        noise.to(self.device), self.acp))
        finally:
            if backup is not None:
                self._load_params(backup)

    def _load_params(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(values[n])

    # ---- state ------------------------------------------------------------------------------------
    def save_state(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"format": STATE_FORMAT, "step": self.step, "elapsed_s": self.elapsed_s,
                 "model": self.model.state_dict(), "ema": self.ema, "optimizer": self.opt.state_dict(),
                 "window": list(self.window), "train_config": self.cfg.to_dict(),
                 "model_config": self.model_cfg.to_dict(),
                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
        _atomic_torch_save(state, self.state_path)
        return self.state_path

    def load_state(self) -> None:
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)  # our own file
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise RuntimeError(f"{self.state_path} is not an instdiff training state ({STATE_FORMAT})")
        old = state["train_config"]
        done = int(state["step"])
        diff = {k: (old.get(k), v) for k, v in self.cfg.to_dict().items()
                if k not in RESUME_MUTABLE and old.get(k, TrainConfig.__dataclass_fields__[k].default) != v}
        if set(diff) <= LR_DECAY_FIELDS and all(lr_schedule(TrainConfig.from_dict(old), k) == lr_schedule(self.cfg, k)
                                                 for k in range(done)):
            diff = {}  # a decay added (or moved) after the steps already taken: those steps are unchanged
        if diff:
            raise ValueError(f"cannot resume {self.state_path}: the run was started with different settings "
                             f"(saved, now): {diff}")
        if state["model_config"] != self.model_cfg.to_dict():
            raise ValueError(f"cannot resume {self.state_path}: its model config differs from {self.cfg.model!r}")
        self.model.load_state_dict(state["model"], strict=True)
        self.opt.load_state_dict(state["optimizer"])
        self.ema = {n: state["ema"][n].to(self.device).clone() for n, _ in self.model.named_parameters()}
        self.step, self.elapsed_s, self.window = int(state["step"]), float(state["elapsed_s"]), list(state["window"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.resumed_from = self.step
        if self.csv_path.exists():  # drop rows logged after the checkpoint (a crash between saves)
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]
            self._write_csv(rows)

    def _write_csv(self, rows: list[dict]) -> None:
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv_path)

    def _append_csv(self, row: dict) -> None:
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)

    def read_csv(self) -> list[dict]:
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    # ---- outputs ----------------------------------------------------------------------------------
    def ema_components(self) -> Components:
        """A copy of the components holding the EMA weights (eval mode)."""
        comp = build_components(self.model_cfg, seed=self.cfg.seed)
        target = Trainable(comp)
        sd = {n: v.cpu() for n, v in self.model.state_dict().items()}
        sd.update({n: v.cpu() for n, v in self.ema.items()})
        target.load_state_dict(sd, strict=True)
        comp.label = (f"{self.model_cfg.name} trained on Shapes ({self.cfg.n_train_images} train images, data seed "
                      f"{self.cfg.data_seed}), {self.step} steps, seed {self.cfg.seed}, EMA {self.cfg.ema_decay}")
        return comp.eval()

    def export(self) -> dict:
        comp = self.ema_components()
        source = {"trained_by": "instdiff train shapes", "step": self.step, "train_config": self.cfg.to_dict(),
                  "weights": "ema"}
        dtype = getattr(torch, self.cfg.export_dtype)
        save_converted(comp, self.out, dtype=dtype, source=source)
        manifest = json.loads((self.out / "manifest.json").read_text())
        return {"dir": str(self.out), "dtype": self.cfg.export_dtype,
                "bytes": sum(m["bytes"] for m in manifest["files"].values()),
                "files": {k: m["bytes"] for k, m in manifest["files"].items()}, "label": comp.label}

    def reproduce(self) -> str | list[str]:
        """The command(s) that remake this run's weights: for a fine-tuning run (``init_from``), the commands of the
        model it started from (from that folder's ``summary.json``, when it has one) and then this run's, reading
        the folder the earlier command writes."""
        cfg = self.cfg
        src = self._init_source() or {}
        cmd = (f"instdiff train shapes --out {cfg.out_dir} --steps {self.step} --seed {cfg.seed} "
               + (f"--model {cfg.model} " if cfg.model != TrainConfig.model else "") +
               f"--batch-size {cfg.batch_size} --n-images {cfg.n_train_images} --data-seed {cfg.data_seed}"
               + (f" --lr {cfg.lr:g}" if cfg.lr != TrainConfig.lr else "")
               + (f" --lr-decay-start {cfg.lr_decay_start} --lr-decay-steps {cfg.lr_decay_steps}"
                  if cfg.lr_decay_start is not None else "")
               + (f" --p-drop-masks {cfg.p_drop_masks:g}" if cfg.p_drop_masks is not None else "")
               + (f" --pyramid-noise {cfg.pyramid_noise:g}" if cfg.pyramid_noise else "")
               + (f" --beta-schedule {cfg.beta_schedule}" if cfg.beta_schedule is not None else "")
               + (f" --beta-start {cfg.beta_start:g}" if cfg.beta_start is not None else "")
               + (f" --beta-end {cfg.beta_end:g}" if cfg.beta_end is not None else "")
               + (f" --init-from {src.get('made_in') or cfg.init_from}" if cfg.init_from else "")
               + (" --grow" if cfg.grow else "")
               + f" --threads {torch.get_num_threads()}")
        prior = src.get("reproduce")
        if prior is None:
            return cmd
        return [*(prior if isinstance(prior, list) else [prior]), cmd]

    def _init_source(self) -> dict | None:
        """What a fine-tuning run started from: the folder, its weights' sha256 and, when the folder holds the
        summary of the run that made it, that run's folder (``made_in``) and command(s)."""
        if not self.cfg.init_from:
            return None
        folder = Path(self.cfg.init_from)
        manifest = json.loads((folder / "manifest.json").read_text())
        out = {"dir": str(folder), "sha256": {k: m["sha256"] for k, m in manifest["files"].items()}}
        source_cfg = ModelConfig.load(folder / "model_config.json")
        if source_cfg.unet.attention_resolutions != self.model_cfg.unet.attention_resolutions:
            out["attention_resolutions"] = list(source_cfg.unet.attention_resolutions)  # the source's (--grow)
        schedule = source_cfg.schedule
        if schedule != self.model_cfg.schedule:
            out["schedule"] = dataclasses.asdict(schedule)  # the source's, when this run trained it onto another one
        if (folder / "summary.json").exists():
            made = json.loads((folder / "summary.json").read_text())
            out.update(made_in=made.get("export", {}).get("dir"), steps=made.get("steps"),
                       reproduce=made.get("reproduce"))
        return out

    def plot(self) -> Path | None:
        if not self.cfg.figure:
            return None
        rows = self.read_csv()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = np.array([int(r["step"]) for r in rows])
        loss = np.array([float(r["loss"]) for r in rows])
        w = max(1, len(loss) // 25)  # rolling mean over ~4% of the run
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot(steps, loss, lw=0.8, alpha=0.4, label=f"mean loss per {self.cfg.log_every} steps")
        if w > 1:
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
            ax.plot(steps[w // 2: w // 2 + len(smooth)], smooth, lw=1.6, label=f"rolling mean of {w} points")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        target = {"v_prediction": "v", "epsilon": "epsilon"}[self.model_cfg.schedule.prediction_type]
        ax.set_ylabel(f"{target}-prediction MSE")
        decay = (f", cosine decay from step {self.cfg.lr_decay_start}" if self.cfg.lr_decay_start is not None
                 else "")
        ax.set_title(f"{self.model_cfg.name} on Shapes: batch {self.cfg.batch_size}, lr {self.cfg.lr:g}{decay}, "
                     f"seed {self.cfg.seed}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        gap = [(int(r["step"]), float(r["gap_null"]) / float(r["gap_loss"]),
                float(r["gap_shuffled"]) / float(r["gap_loss"])) for r in rows if r.get("gap_null")]
        if gap:
            g = np.array(gap)
            ax2 = ax.twinx()
            ax2.plot(g[:, 0], 100 * g[:, 1], "o-", color="tab:green", ms=3, lw=1, label="gap, null layout (% of loss)")
            ax2.plot(g[:, 0], 100 * g[:, 2], "s-", color="tab:red", ms=3, lw=1, label="gap, wrong layout (% of loss)")
            ax2.set_ylabel("grounding gap (% of loss)")
            ax2.set_ylim(bottom=0)
            handles = [h for a in (ax, ax2) for h in a.get_legend_handles_labels()[0]]
            ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="center right")
        else:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(self.cfg.figure)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path

    def _gap_columns(self) -> dict[str, str]:
        """The grounding gap at this step (every ``gap_every`` steps, on log steps): the loss with the true layout,
        and how much it rises with the null / the next image's layout (:func:`grounding_gap`, live weights). Its
        wall time is not counted in ``elapsed_s``. A run whose gaps stay near 0 is not learning to use its layouts."""
        every = self.cfg.gap_every
        if not every or self.step % every:
            return {}
        t0 = time.perf_counter()
        g = grounding_gap(self.model, self.comp.vae, self.acp, self.data, n_images=min(self.cfg.gap_images,
                          len(self.data)), drop="box", batch_size=min(32, self.cfg.gap_images))
        self._gap_s += time.perf_counter() - t0
        return {"gap_loss": f"{g['true']:.6f}", "gap_null": f"{g['gap_null']:.6f}",
                "gap_shuffled": f"{g['gap_shuffled']:.6f}"}

    # ---- the loop ---------------------------------------------------------------------------------
    def done(self) -> bool:
        """Budget reached? ``elapsed_s`` is the training wall time summed over sessions, updated every step."""
        cfg = self.cfg
        if cfg.steps is not None and self.step >= cfg.steps:
            return True
        return cfg.minutes is not None and self.elapsed_s >= cfg.minutes * 60

    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
        start_step = self.step
        t0 = time.perf_counter()
        elapsed0 = self.elapsed_s
        self._gap_s = 0.0  # time spent measuring grounding gaps this session (not training time)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step", dynamic_ncols=True,
                   desc=f"train {self.model_cfg.name}")
        smooth = None
        last_log_t, last_log_step = t0, self.step
        try:
            while not self.done():
                loss, gnorm = self.train_step()
                self.elapsed_s = elapsed0 + (time.perf_counter() - t0 - self._gap_s)
                self.window.append(loss)
                smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
                sps = (self.step - start_step) / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}", steps_per_s=f"{sps:.2f}", refresh=False)
                if self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    rate = (self.step - last_log_step) / max(now - last_log_t, 1e-9)
                    self._append_csv({"step": self.step, "loss": f"{float(np.mean(self.window)):.6f}",
                                      "lr": f"{self.lr_at(self.step - 1):.6g}", "grad_norm": f"{gnorm:.4f}",
                                      "elapsed_s": f"{self.elapsed_s:.2f}",
                                      "steps_per_s": f"{rate:.4f}", **self._gap_columns()})
                    self.window = []
                    last_log_t, last_log_step = time.perf_counter(), self.step
                if self.step % cfg.ckpt_every == 0:
                    self.save_state()
                    self.plot()
        except KeyboardInterrupt:
            self.save_state()
            print(f"\ninterrupted at step {self.step}: state saved to {self.state_path} (continue with --resume)")
            raise
        finally:
            bar.close()
        session_s = time.perf_counter() - t0
        self.save_state()
        figure = self.plot()
        export = self.export()
        rows = self.read_csv()
        tail = [float(r["loss"]) for r in rows[-10:]]
        summary = {
            "model": self.model_cfg.name, "steps": self.step, "resumed_from": self.resumed_from,
            "session_steps": self.step - start_step, "session_s": round(session_s, 2),
            "steps_per_s": round((self.step - start_step) / session_s, 4) if session_s > 0 else None,
            "elapsed_s": round(self.elapsed_s, 2), "threads": torch.get_num_threads(),
            "n_params": self.n_params(), "final_loss": round(float(np.mean(tail)), 6) if tail else None,
            "reproduce": self.reproduce(),
            "init_from": self._init_source(),
            "export": export, "state": str(self.state_path), "loss_csv": str(self.csv_path),
            "figure": str(figure) if figure else None, "train_config": cfg.to_dict(),
        }
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary


def model_config_of(cfg: TrainConfig) -> ModelConfig:
    """The model config a run trains: ``cfg.model``'s, with the run's noise-schedule overrides."""
    model_cfg = get_config(cfg.model)
    changes = {k: getattr(cfg, k) for k in ("beta_schedule", "beta_start", "beta_end") if getattr(cfg, k) is not None}
    if changes:
        model_cfg = model_cfg.replace(schedule=dataclasses.replace(model_cfg.schedule, **changes))
    return model_cfg


def train_shapes(cfg: TrainConfig) -> dict:
    """Train (or, with ``cfg.resume``, continue) the mini model on Shapes; returns the run summary."""
    return Trainer(cfg).run()


# ---- command line -----------------------------------------------------------------------------------
def _cmd_train_shapes(args: argparse.Namespace) -> int:
    cfg = TrainConfig(model=args.model, out_dir=args.out, data_dir=args.data_dir, n_train_images=args.n_images,
                      data_seed=args.data_seed, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                      lr_decay_start=args.lr_decay_start, lr_decay_steps=args.lr_decay_steps,
                      steps=args.steps, minutes=args.minutes, ema_decay=args.ema_decay, ckpt_every=args.ckpt_every,
                      log_every=args.log_every, gap_every=args.gap_every, seed=args.seed, figure=args.figure or None,
                      export_dtype=args.export_dtype, threads=args.threads, progress=not args.no_progress,
                      resume=args.resume, device=args.device, p_drop_masks=args.p_drop_masks,
                      init_from=args.init_from, pyramid_noise=args.pyramid_noise, beta_schedule=args.beta_schedule,
                      beta_start=args.beta_start, beta_end=args.beta_end, grow=args.grow)
    summary = train_shapes(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "train_config"}, indent=2))
    return 0


def add_train_parser(subparsers):
    """Register ``instdiff train shapes ...`` on the CLI's subparsers; returns the ``train`` sub-subparsers, where
    ``cli.py`` also registers the evaluators' trainers (``training.evaluators.add_evaluator_parsers``)."""
    d = TrainConfig(steps=1)
    tr = subparsers.add_parser("train", help="train a model from scratch (the mini InstanceDiffusion on Shapes)")
    tsub = tr.add_subparsers(dest="train_command", required=True)
    s = tsub.add_parser("shapes", help="train the mini InstanceDiffusion on the Shapes world (CPU)",
                        description=__doc__.split("\n\n")[0] if __doc__ else None)
    s.add_argument("--out", required=True, help="run folder: state.pt, loss.csv, summary.json, exported model")
    budget = s.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, default=None, help="total steps (reproducible)")
    budget.add_argument("--minutes", type=float, default=None, help="total wall-clock budget (summary names the steps)")
    s.add_argument("--resume", action="store_true", help="continue OUT/state.pt (starts fresh if there is none)")
    s.add_argument("--model", default=d.model, help="model preset or config file")
    s.add_argument("--data-dir", default=d.data_dir, help="Shapes root (the train split is written or reused)")
    s.add_argument("--n-images", type=int, default=d.n_train_images)
    s.add_argument("--data-seed", type=int, default=d.data_seed)
    s.add_argument("--batch-size", type=int, default=d.batch_size)
    s.add_argument("--lr", type=float, default=d.lr)
    s.add_argument("--warmup", type=int, default=d.warmup_steps)
    s.add_argument("--lr-decay-start", type=int, default=d.lr_decay_start,
                   help="step where a cosine decay of the learning rate begins (default: constant)")
    s.add_argument("--lr-decay-steps", type=int, default=d.lr_decay_steps)
    s.add_argument("--ema-decay", type=float, default=d.ema_decay)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    s.add_argument("--log-every", type=int, default=d.log_every)
    s.add_argument("--gap-every", type=int, default=d.gap_every,
                   help="log the grounding gap (null / wrong layout) every N steps (0: never)")
    s.add_argument("--figure", default=d.figure, help="loss-curve PNG ('' for none)")
    s.add_argument("--export-dtype", choices=EXPORT_DTYPES, default=d.export_dtype)
    s.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    s.add_argument("--device", default=d.device,
                   help="torch device (the committed model: cpu; cuda for recipe sweeps, not bit-equal to cpu)")
    s.add_argument("--p-drop-masks", type=float, default=d.p_drop_masks,
                   help="probability of dropping the masks in a batch (default: the official 0.1 of every modality); "
                        "higher trains the box-only case (shape from the instance's text) more often")
    s.add_argument("--pyramid-noise", type=float, default=d.pyramid_noise,
                   help="discount of multi-resolution training noise (0: white, official; e.g. 0.6)")
    s.add_argument("--init-from", default=d.init_from,
                   help="exported model folder whose weights start the run (fine-tuning; default: from scratch)")
    s.add_argument("--grow", action="store_true",
                   help="with --init-from: the run's model may add attention resolutions (new blocks start as the "
                        "identity)")
    s.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default=d.beta_schedule,
                   help="noise schedule of the trained model (default: the model preset's)")
    s.add_argument("--beta-start", type=float, default=d.beta_start, help="first beta (default: the preset's)")
    s.add_argument("--beta-end", type=float, default=d.beta_end, help="last beta (default: the preset's)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_train_shapes)
    return tsub
