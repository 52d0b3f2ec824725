"""The experiments behind the report's notebooks, one protocol step per function (the notebooks call them cell by
cell)::

    generate_runs(world, variants, seeds, out_root, n)   resumable images, one folder per (variant, seed)
    detect(world, files)                                  the protocol's detector on a few images (for a look)
    score_runs(world, generated, n)                       the paper's metric code per (variant, seed)
    score_runs(world, generated, n, shuffle=1)            the shuffled-layout floor: the same images, another layout
    runs_named(generated, name)                           one variant's runs (e.g. an ablation's base), every seed
    real_control(world, n)                                the real-image ceiling: the val images, same metric code
    aggregate(records)                                    mean, sd and 95% CI over seeds per row

An experiment is a list of :class:`Variant` (an evaluation setting plus generation parameters: steps,
guidance, alpha, MIS fraction, modality drop, skip mode) run for several base seeds on the first
``n_images`` protocol images of a :class:`~instdiff_lib.evaluation.world.World`. Every (variant, seed) writes its images
into its own folder (named from a hash of its configuration, so reruns resume and never mix settings) and is
scored by the same metric code as the paper protocol. :func:`aggregate` turns per-seed numbers into
mean, standard deviation and a 95% confidence interval (Student t over seeds).

Results rows have the shape the blog renderer reads (``results/<notebook>.json`` -> ``metrics.rows``)::

    {"<row>": {"metrics": {"box_AP50": {"mean", "sd", "ci95", "n_seeds", "values"}, ...},
               "n_evaluated": images scored (summed over seeds), "n_skipped": ..., "variant": {...}}}
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from instdiff_lib.evaluation.generation import IMAGE_FORMAT, JPEG_QUALITY, SETTINGS, generate_eval

# metrics as fractions in [0, 1] (the blog prints percentages), except FD/FID and CLIP cosines
PERCENT_METRICS = ("box_AP", "box_AP50", "box_AR", "mask_AP", "mask_AP50", "mask_AR", "mask_IoU", "PiM",
                   "attr_acc")


@dataclass(frozen=True)
class Variant:
    """One generation configuration: ``setting`` (box/mask/point/scribble/color/texture) plus overrides."""

    name: str
    setting: str
    steps: int = 50
    guidance: float = 7.5
    alpha: float = 1.0
    mis: float = 0.36
    drop: str | None = None  # None: the setting's own preset
    skip_mode: str | None = None  # None: the model's config

    def __post_init__(self):
        if self.setting not in SETTINGS or self.setting == "real":
            raise ValueError(f"setting must be one of {[s for s in SETTINGS if s != 'real']}, got {self.setting!r}")

    @property
    def images_setting(self) -> str:
        """The setting whose images these are: a setting's images depend only on its modality preset and attribute,
        so a variant that overrides ``drop`` with another setting's preset (an ablation's ``drop=box`` on the mask
        setting) makes that setting's images, shares its folder and is scored as its own ``setting``."""
        drop, attribute = self.drop or SETTINGS[self.setting]["drop"], SETTINGS[self.setting]["attribute"]
        same = [s for s, v in SETTINGS.items() if (v["drop"], v["attribute"]) == (drop, attribute)]
        return self.setting if self.setting in same or not same else same[0]

    def key(self) -> str:
        """Hash of what the images depend on (not the name, nor a setting that only changes the scoring: see
        :attr:`images_setting`). ``drop=None`` counts as the setting's own preset and ``skip_mode=None`` as the
        config default "scaleu" (a model configured otherwise is caught by ``generate_eval``'s configuration check,
        never silently mixed)."""
        from instdiff_lib.model.config import ModelConfig

        d = asdict(self)
        d.pop("name")
        d["drop"] = self.drop or SETTINGS[self.setting]["drop"]
        d["setting"] = self.images_setting
        d["skip_mode"] = self.skip_mode or ModelConfig().skip_mode
        d["format"] = [IMAGE_FORMAT, JPEG_QUALITY]  # how the images are stored (folders of another format are not reused)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def ci95(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd and the half-width of the 95% Student-t interval of the mean over ``values`` (NaNs dropped)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    out: dict[str, Any] = {"values": [float(x) for x in values], "n_seeds": int(len(v))}
    if len(v) == 0:
        return {**out, "mean": float("nan"), "sd": float("nan"), "ci95": float("nan")}
    mean = float(v.mean())
    if len(v) == 1:
        return {**out, "mean": mean, "sd": float("nan"), "ci95": float("nan")}
    from scipy import stats

    sd = float(v.std(ddof=1))
    return {**out, "mean": mean, "sd": sd, "ci95": float(stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v)))}


def flat_metrics(score: dict) -> dict[str, float]:
    """The headline numbers of a :func:`score_setting` result under stable names."""
    m, out = score["metrics"], {}
    if "box" in m:
        v = m["box"]["values"]
        out.update(box_AP=v["AP"], box_AP50=v["AP50"], box_AR=v["AR100"])
    if "mask" in m:
        v = m["mask"]["values"]
        out.update(mask_AP=v["AP"], mask_AP50=v["AP50"], mask_AR=v["AR100"])
    if "mask_iou" in m:
        out["mask_IoU"] = m["mask_iou"]["values"]["IoU"]
    if "pim" in m:
        out["PiM"] = m["pim"]["values"]["PiM"]
    if "attribute" in m:
        out.update(attr_acc=m["attribute"]["values"]["acc"], clip_local=m["attribute"]["values"]["clip_local"])
    if "fid" in m:
        out["FID"] = m["fid"]["values"]["FID"]
    return {k: float(v) for k, v in out.items()}


@dataclass
class RunRecord:
    variant: Variant
    seed: int
    folder: str
    metrics: dict[str, float]
    n_evaluated: int
    n_generated: int
    n_reused: int
    gen_seconds: float
    per_image: dict = field(default_factory=dict)
    image_ids: list = field(default_factory=list)  # every image scored (per_image lacks those without a mask IoU)


def variant_folder(out_root: str | Path, variant: Variant, seed: int) -> Path:
    return Path(out_root) / f"{variant.images_setting}__{variant.key()}__seed{seed}"


def generate_variant(world, variant: Variant, seed: int, out_root: str | Path, n_images: int,
                     shard: tuple[int, int] = (0, 1), progress: bool = False):
    """Generate (resuming) the images of one variant at one base seed, or one shard of them (SLURM arrays)."""
    items = world.items(SETTINGS[variant.setting]["attribute"], limit=n_images)
    return generate_eval(items, variant_folder(out_root, variant, seed), world.pipeline(), variant.images_setting,
                         shard=shard, base_seed=seed, image_format=IMAGE_FORMAT, quality=JPEG_QUALITY, steps=variant.steps,
                         guidance=variant.guidance, alpha=variant.alpha, mis=variant.mis,
                         negative_prompt=world.negative_prompt, progress=progress, drop=variant.drop,
                         skip_mode=variant.skip_mode, layout_batch=world.layout_batch)


@dataclass
class Generated:
    """The images of one (variant, seed): their folder and what this call generated or found done."""

    variant: Variant
    seed: int
    folder: str
    n_generated: int
    n_reused: int
    gen_seconds: float


def generate_runs(world, variants: Iterable[Variant], seeds: Sequence[int], out_root: str | Path, n_images: int, *,
                  progress: bool = True) -> list[Generated]:
    """Every variant at every seed, generated (resuming: finished images are kept) into its own folder."""
    from tqdm.auto import tqdm

    runs = [(v, s) for v in variants for s in seeds]
    out = []
    for v, s in tqdm(runs, desc="generation (variant x seed)", disable=not progress):
        summary = generate_variant(world, v, s, out_root, n_images)
        out.append(Generated(v, s, str(variant_folder(out_root, v, s)), summary.n_generated,
                             summary.n_skipped_existing, round(summary.seconds, 2)))
    return out


def runs_named(generated: Sequence[Generated], name: str) -> list[Generated]:
    """The runs of one variant name (e.g. an ablation's ``base``), every seed."""
    out = [g for g in generated if g.variant.name == name]
    if not out:
        raise KeyError(f"no generated run is named {name!r}; the names are {sorted({g.variant.name for g in generated})}")
    return out


def score_runs(world, generated: Sequence[Generated], n_images: int, *, fid: bool = False, shuffle: int = 0,
               progress: bool = True) -> list[RunRecord]:
    """Score the first ``n_images`` of each generated folder with the protocol's metric code (:meth:`World.score`).

    ``shuffle=k``: the shuffled-layout control (each image scored against the layout of the image k later); with
    fewer than 2 images per folder there is no other layout: no records (the floor is left out, said in a line).
    A folder listed twice for one setting (variants that differ only in name, e.g. an ablation's base value) is
    scored once."""
    from tqdm.auto import tqdm

    if shuffle and n_images < 2:
        print(f"shuffled-layout floor not computed: it scores each image against another image's layout and needs at "
              f"least 2 images per folder (n_images = {n_images})")
        return []

    scores: dict[tuple[str, str], dict] = {}
    records = []
    for g in tqdm(generated, desc="scoring (variant x seed)" + (" shuffled" if shuffle else ""),
                  disable=not progress):
        key = (g.folder, g.variant.setting)  # a folder may serve two settings (Variant.images_setting)
        if key not in scores:
            # only the first n_images (a folder shared with a larger run, e.g. notebook 10's, may hold more)
            scores[key] = world.score(g.variant.setting, g.folder, limit=n_images, fid=fid, progress=False,
                                      shuffle=shuffle, images_setting=g.variant.images_setting)
        score = scores[key]
        per_image = score["metrics"].get("mask_iou", {}).get("per_image", {})
        records.append(RunRecord(g.variant, g.seed, g.folder, flat_metrics(score), score["n_images"], g.n_generated,
                                 g.n_reused, g.gen_seconds, per_image, list(score.get("image_ids", []))))
    return records


def run_grid(world, variants: Iterable[Variant], seeds: Sequence[int], out_root: str | Path, n_images: int, *,
             fid: bool = False, progress: bool = True) -> list[RunRecord]:
    """Every variant at every seed: :func:`generate_runs`, then :func:`score_runs`."""
    generated = generate_runs(world, variants, seeds, out_root, n_images, progress=progress)
    return score_runs(world, generated, n_images, fid=fid, progress=progress)


def aggregate(records: Sequence[RunRecord], row_of=lambda r: r.variant.name) -> dict[str, dict]:
    """Rows of the results file: per row, each metric's :func:`ci95` over the row's seeds."""
    rows: dict[str, dict] = {}
    for r in records:
        row = rows.setdefault(row_of(r), {"runs": [], "variant": asdict(r.variant)})
        row["runs"].append(r)
    out = {}
    for name, row in rows.items():
        runs = row["runs"]
        keys = sorted({k for r in runs for k in r.metrics})
        out[name] = {"metrics": {k: ci95([r.metrics.get(k, float("nan")) for r in runs]) for k in keys},
                     "n_evaluated": int(sum(r.n_evaluated for r in runs)),
                     "n_images_per_seed": int(max(r.n_evaluated for r in runs)),
                     "seeds": [r.seed for r in runs], "variant": row["variant"],
                     "gen_seconds": round(sum(r.gen_seconds for r in runs), 2),
                     "n_generated": int(sum(r.n_generated for r in runs))}
    return out


def attribute_vocab(world, attribute: str) -> list[str]:
    """The words CLIP chooses among for ``attribute``: the world's vocabulary, else the official colours/textures."""
    from instdiff_lib.datasets.coco import TEXTURES_COCO
    from instdiff_lib.evaluation.metrics.clip_metrics import COLORS

    vocab = (world.attribute_vocab or {}).get(attribute)
    return list(vocab) if vocab else list(COLORS if attribute == "color" else TEXTURES_COCO)


def attribute_crops(world, generated: Generated, n_images: int) -> list[dict]:
    """What the attribute metric looks at on the first ``n_images`` of one colour/texture run: per ground-truth box
    crop (``attribute_binding``'s own crops and zero-shot choice), the crop image, the attribute asked for and the
    one CLIP picked."""
    from PIL import Image

    from instdiff_lib.evaluation.generation import read_manifest
    from instdiff_lib.evaluation.metrics.clip_metrics import attribute_binding, crop_instance
    from instdiff_lib.evaluation.scoring import attribute_items

    attribute = SETTINGS[generated.variant.setting]["attribute"]
    if attribute is None:
        raise ValueError(f"setting {generated.variant.setting!r} has no attribute to crop for")
    files = {r["image_id"]: Path(generated.folder) / r["file"] for r in read_manifest(generated.folder)[:n_images]}
    by_id = {it.image_id: it for it in world.items(attribute)}
    items = attribute_items([by_id[i] for i in files])
    result = attribute_binding(items, files, world.clip(), attribute_vocab(world, attribute), per_image=True)
    item_of = {it.image_id: it for it in items}
    out = []
    for c in result.details["per_crop"]:
        it = item_of[c["image_id"]]
        with Image.open(files[c["image_id"]]) as im:
            out.append({**c, "crop": crop_instance(im.convert("RGB"), it.boxes[c["instance"]], it.width, it.height)})
    return out


def detect(world, files: Sequence[tuple[int, str | Path]]) -> list[dict]:
    """The world's detector on ``(image_id, path)`` pairs with the protocol's settings (``yolo val``: conf 0.001,
    NMS IoU 0.7, the world's image size and class map): COCO result dicts with RLE masks."""
    from instdiff_lib.evaluation.metrics.detection import yolo_predict

    kw = {"imgsz": world.imgsz} if world.imgsz else {}
    return yolo_predict(world.detector(), files, device=world.device, class_map=world.class_map, **kw)


def real_control(world, n_images: int, settings: Sequence[str] = ("box", "point", "scribble", "color", "texture"),
                 ) -> dict[str, Any]:
    """The upper-bound row: the *real* val images scored by the same metric functions (no generation).

    One detector pass over the real files (in the GT frame) feeds box/mask AP, mask IoU and PiM; attribute binding
    runs on the same files. The metric functions are called directly: the generated-image guard of
    ``score_setting`` would rightly refuse real images in a generated setting.
    """
    from instdiff_lib.evaluation.scoring import attribute_items, predict_real
    from instdiff_lib.evaluation.metrics.clip_metrics import attribute_binding
    from instdiff_lib.evaluation.metrics.detection import coco_ap, mask_iou
    from instdiff_lib.evaluation.metrics.pim import pim

    items = world.items(None, limit=n_images)
    files = [(it.image_id, Path(world.real_image_dir) / it.file_name) for it in items]
    ids = [i for i, _ in files]
    kw = {"imgsz": world.imgsz} if world.imgsz else {}
    preds = predict_real(world.detector(), files, {it.image_id: it for it in items}, device=world.device,
                         class_map=world.class_map, **kw)
    packed = {"box": coco_ap(world.instances_json, preds, "bbox", ids),
              "mask": coco_ap(world.instances_json, preds, "segm", ids),
              "mask_iou": mask_iou(world.instances_json, preds, ids)}
    out: dict[str, float] = flat_metrics({"metrics": {k: {"values": v.values} for k, v in packed.items()}})
    for mode in ("point", "scribble"):
        if mode in settings:
            out[f"PiM_{mode}"] = float(pim(world.instances_json, preds, ids, mode=mode, seed=0).values["PiM"])
    for attribute in ("color", "texture"):
        if attribute not in settings:
            continue
        attr_items = attribute_items(world.items(attribute, limit=n_images))
        r = attribute_binding(attr_items, dict(files), world.clip(), attribute_vocab(world, attribute))
        out[f"{attribute}_acc"] = float(r.values["acc"])
        out[f"{attribute}_clip_local"] = float(r.values["clip_local"])
    return {"metrics": out, "n_images": len(files)}


COUNT_BINS = ((0, 0), (1, 2), (3, 4), (5, 8), (9, None))  # every image falls in one (None: no upper bound)


def by_instance_count(records: Sequence[RunRecord], world, bins: Sequence[tuple[int, int | None]] = COUNT_BINS,
                      row: str | None = None) -> dict[str, dict]:
    """Per-image mask IoU (best same-class prediction per GT instance, averaged per image) binned by the number of
    instances in the layout: mean and 95% CI over the seeds of the per-seed bin means (of the records of ``row``
    only, when given).

    Every scored image is counted in exactly one bin (``n_images``, summed over seeds); ``n_without_iou`` of them have
    no mask IoU (no instance, or crowd annotations only). Bins must cover 0 .. any count: an image outside every bin
    raises instead of silently vanishing."""
    n_inst = {it.image_id: len(it.boxes) for it in world.items(None)}
    label = lambda lo, hi: str(lo) if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}")  # noqa: E731
    out = {label(lo, hi): {"per_seed": [], "n_images": 0, "n_without_iou": 0} for lo, hi in bins}
    for r in (r for r in records if row is None or r.variant.name == row):
        ids = list(r.image_ids) or [int(i) for i in r.per_image]
        values: dict[str, list[float]] = {k: [] for k in out}
        for image_id in ids:
            n = n_inst[int(image_id)]
            k = next((label(lo, hi) for lo, hi in bins if lo <= n and (hi is None or n <= hi)), None)
            if k is None:
                raise ValueError(f"image {image_id} has {n} instances, outside every bin {list(bins)}")
            out[k]["n_images"] += 1
            v = r.per_image.get(str(image_id), r.per_image.get(image_id))
            if v is None:
                out[k]["n_without_iou"] += 1
            else:
                values[k].append(v)
        for k, vals in values.items():
            out[k]["per_seed"].append(float(np.mean(vals)) if vals else float("nan"))
    return {k: {**ci95(b.pop("per_seed")), **b} for k, b in out.items()}


def ablation_grid(base: Variant, spec: dict[str, Sequence]) -> tuple[list[Variant], dict[str, list[str]]]:
    """The runs of an ablation study: the base variant, then each variant of :func:`ablation_variants` once (a variant
    equal to the base shares its images), and the groups (field -> row names) for the tables."""
    pairs = ablation_variants(base, spec)
    unique: dict[str, Variant] = {}
    groups: dict[str, list[str]] = {}
    for group, v in pairs:
        unique.setdefault(v.name, v)
        groups.setdefault(group, []).append(v.name)
    return [base] + list(unique.values()), groups


def ablation_variants(base: Variant, spec: dict[str, Sequence]) -> list[tuple[str, Variant]]:
    """(group, variant) pairs: for each field in ``spec`` (e.g. ``{"mis": [0, 0.2, 0.36, 0.5]}``) the base variant
    with that one field changed. The base itself appears once per group (so every group has its reference)."""
    out = []
    for fld, values in spec.items():
        for v in values:
            var = replace(base, **{fld: v})
            out.append((fld, replace(var, name=f"{fld}={v}")))
    return out


def timed(fn, *args, **kw) -> tuple[Any, float]:
    t = time.perf_counter()
    r = fn(*args, **kw)
    return r, time.perf_counter() - t
