"""What each report notebook does, as library calls (the notebooks hold only parameters and these calls).

Every driver takes the :class:`NotebookRun` of its notebook, reads its parameters from ``run.params``, saves
figures through ``run.figure`` and writes ``results/<notebook>.json`` through ``run.write``; it returns a small
dict for display in the notebook.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from instdiff_lib.evaluation.experiments import (Variant, ablation_grid, aggregate, by_instance_count, real_control, run_grid)
from instdiff_lib.layouts.layout import Instance, Layout
from instdiff_lib.results import device_description, package_versions, project_root
from instdiff_lib.viz import draw_layout, image_grid
from instdiff_lib.report.context import NotebookRun


# ---- shared ------------------------------------------------------------------------------------------
def world_of(run: NotebookRun):
    """The evaluation world of the run's profile from its parameters (smoke: Shapes; full: COCO)."""
    from instdiff_lib.evaluation.world import coco_world, shapes_world

    from instdiff_lib.report.assets import hf_cache, inception_path

    p = run.params
    model = p.get("MODEL") or None
    max_batch = p.get("MAX_BATCH") or None
    if run.smoke:
        return shapes_world(n_val=p.get("N_VAL", 200), model=model, device=p.get("DEVICE", "cpu"), max_batch=max_batch)
    if not model:
        raise ValueError("the full profile needs MODEL (a converted checkpoint folder, see README)")
    return coco_world(run.path(p["COCO_ROOT"]), model=str(run.path(model)),
                      yolo=str(run.path(p.get("YOLO", "yolov8m-seg.pt"))), device=p.get("DEVICE", "cuda"),
                      dtype=p.get("DTYPE", "float16"), clip_cache_dir=hf_cache(), fid_weights=inception_path(),
                      max_batch=max_batch)


def _out_root(run: NotebookRun) -> Path:
    return run.path(run.params.get("OUT_DIR") or f"outputs/eval/{run.profile}")


def _base_variant(run: NotebookRun, setting: str, name: str | None = None) -> Variant:
    p = run.params
    return Variant(name=name or setting, setting=setting, steps=p["STEPS"], guidance=p["GUIDANCE"], alpha=p["ALPHA"],
                   mis=p["MIS"])


def _panel(layout: Layout, image: Image.Image, size: int) -> Image.Image:
    """[layout on white | generated image | layout over the image], each ``size`` px."""
    img = image.convert("RGB").resize((size, size), Image.NEAREST if image.width < size else Image.BICUBIC)
    return image_grid([draw_layout(layout, None, size), img, draw_layout(layout, img, size)], ncols=3)


def sample_grid(run: NotebookRun, world, records, name: str, per_setting: int = 4, size: int = 192) -> Path:
    """The first images of each setting (first seed) with their layouts drawn over them."""
    from instdiff_lib.evaluation.generation import SETTINGS, read_manifest

    cells, seen = [], set()
    for r in records:
        if (r.variant.name in seen) or r.seed != records[0].seed:
            continue
        seen.add(r.variant.name)
        items = world.items(SETTINGS[r.variant.setting]["attribute"], limit=per_setting)
        files = {row["image_id"]: row["file"] for row in read_manifest(r.folder)}
        for it in items:
            path = Path(r.folder) / files.get(it.image_id, "-")
            if path.is_file():
                with Image.open(path) as im:
                    img = im.convert("RGB").resize((size, size), Image.NEAREST)
                cells.append(draw_layout(it.layout, img, size))
    return run.figure(image_grid(cells, ncols=per_setting), name)


def _bar_plot(rows: dict[str, dict], metrics: list[str], title: str, real: dict | None = None):
    """Seaborn bars (mean over seeds) with 95% CI error bars, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="talk")
    present = [m for m in metrics if any(m in r["metrics"] for r in rows.values())]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4.2 * max(1, len(present)), 4.2), squeeze=False)
    for ax, m in zip(axes[0], present):
        names = [n for n, r in rows.items() if m in r["metrics"]]
        means = [rows[n]["metrics"][m]["mean"] for n in names]
        cis = [rows[n]["metrics"][m]["ci95"] for n in names]
        sns.barplot(x=names, y=means, ax=ax, color=sns.color_palette()[0])
        ax.errorbar(range(len(names)), means, yerr=[0 if np.isnan(c) else c for c in cis], fmt="none",
                    ecolor="black", capsize=5)
        if real and m in real:
            ax.axhline(real[m], color="crimson", ls="--", lw=1.5, label="real images")
            ax.legend(fontsize=10)
        ax.set_title(m)
        ax.tick_params(axis="x", rotation=30, labelsize=11)
    fig.suptitle(title, fontsize=14)
    fig.tight_layout()
    return fig


def _n(rows: dict[str, dict]) -> int:
    return int(sum(r["n_evaluated"] for r in rows.values()))


# ---- 00 setup check ----------------------------------------------------------------------------------------
def weights_inventory(run: NotebookRun) -> dict[str, Any]:
    """Which weights were found, with their sha256 (from the manifests written when they were made)."""
    from instdiff_lib.weights.embedded import models_dir

    found: dict[str, Any] = {}
    if run.smoke:
        for folder in sorted(p for p in models_dir().iterdir() if p.is_dir()) if models_dir().exists() else []:
            entry: dict[str, Any] = {}
            for meta in ("manifest.json", "shapes_yolo.json", "shapes_clip.json"):
                if (folder / meta).exists():
                    doc = json.loads((folder / meta).read_text())
                    if "files" in doc and isinstance(doc["files"], dict):
                        entry.update({k: (v.get("sha256") if isinstance(v, dict) else v) for k, v in doc["files"].items()})
                    if "sha256" in doc:
                        entry[doc.get("weights", meta)] = doc["sha256"]
            found[folder.name] = entry or "no manifest"
    else:  # every asset of the profile (report/assets.py); the preflight has checked them all
        from instdiff_lib.report.assets import full_assets, profile_params

        for a in full_assets(profile_params(run.profile)):
            found[a.key] = {"path": str(a.path), "problem": a.problem(), "synthetic": bool(a.synthetic())}
        man = run.path(run.params["MODEL"]) / "manifest.json"
        if man.exists():
            found["model"]["files"] = json.loads(man.read_text()).get("files")
    return found


def setup_check(run: NotebookRun) -> dict[str, Any]:
    import torch

    from instdiff_lib.report.assets import preflight

    preflight(run.profile)  # full: every asset of the chain, all missing ones listed at once
    world = world_of(run)
    weights = weights_inventory(run)
    pipe = world.pipeline()
    if run.smoke:
        layout = world.items(None, limit=1)[0].layout
    else:
        layout = Layout.from_json(project_root() / "layouts" / "boxes_kitchen_animals.json")
    p = run.params
    out = pipe(layout, seed=p["SEED"], steps=p["STEPS"], guidance=p["GUIDANCE"], alpha=p["ALPHA"], mis=p["MIS"],
               negative_prompt=world.negative_prompt, drop="all", progress=False)
    run.figure(_panel(layout, out.images[0], 256), "first_image")
    info = {"parity": parity_summary() if p.get("PARITY", True) else None, "versions": package_versions(), "device": device_description(), "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(), "world": world.label, "model": pipe.c.label,
            "weights": weights, "image_seconds": out.info["seconds"], "unet_calls": out.info["unet_calls"]}
    if world.name == "shapes":  # does the mini model use its layout at all? (detector-free; see bench --quality)
        from instdiff_lib.training.diffusion import model_grounding_gap

        info["grounding_gap"] = model_grounding_gap(pipe.c)
    run.write({"image_seconds": out.info["seconds"], "images_per_s": 1.0 / out.info["seconds"]}, n_evaluated=1,
              extra={"setup": info})
    return info


def parity_summary() -> dict[str, Any] | str:
    """The parity checks against the official fixture, grouped (objs / eps / block / plms / mis)."""
    from instdiff_lib.parity import FixtureError, run_parity

    try:
        checks = run_parity()
    except FixtureError as e:
        return f"parity fixture not available: {e}"
    groups: dict[str, dict] = {}
    for c in checks:
        g = groups.setdefault(c.name.split(".")[0], {"n": 0, "passed": 0, "max_err": 0.0})
        g["n"] += 1
        g["passed"] += int(c.ok)
        g["max_err"] = max(g["max_err"], float(c.max_abs))
    return groups


# ---- 01 demos ---------------------------------------------------------------------------------------------
def _single_format(inst: Instance, fmt: str, rng: np.random.Generator) -> Instance:
    from instdiff_lib.layouts.derive import box_from_mask, scribble_from_mask

    if inst.mask is None:
        raise ValueError(f"the four-formats demo needs an instance with a mask ({inst.caption!r} has none)")
    if fmt == "box":
        return Instance(inst.caption, box=box_from_mask(inst.mask), category=inst.category)
    if fmt == "point":
        ys, xs = np.nonzero(inst.mask)
        h, w = inst.mask.shape
        return Instance(inst.caption, point=((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h), category=inst.category)
    if fmt == "scribble":
        return Instance(inst.caption, scribble=scribble_from_mask(inst.mask, rng), category=inst.category)
    return Instance(inst.caption, mask=inst.mask, category=inst.category)


def demos(run: NotebookRun) -> dict[str, Any]:
    """Every demo section of the scenes file: its layouts generated from the same seed (hence the same noise)."""
    p = run.params
    scenes_file = run.path(p["SCENES"])
    sections = yaml.safe_load(scenes_file.read_text())
    world = world_of(run)
    pipe = world.pipeline()
    size = p.get("PANEL_SIZE", 256)
    shown: dict[str, Any] = {}
    n_images = 0
    for sec in sections:
        layouts = [Layout.from_json(scenes_file.parent / f) for f in sec["files"]]
        if sec.get("kind") == "four_formats":
            rng = np.random.default_rng(p["SEED"])
            base = layouts[0]
            layouts = [Layout(caption=base.caption, width=base.width, height=base.height,
                              instances=[_single_format(i, fmt, rng) for i in base.instances]).validate()
                       for fmt in ("box", "point", "scribble", "mask")]
        panels, secs = [], []
        for layout in layouts:
            out = pipe(layout, seed=p["SEED"], steps=p["STEPS"], guidance=p["GUIDANCE"], alpha=p["ALPHA"],
                       mis=p["MIS"], negative_prompt=world.negative_prompt, drop=sec.get("drop", "all"), progress=False)
            panels.append(_panel(layout, out.images[0], size))
            secs.append(out.info["seconds"])
            n_images += 1
        run.figure(image_grid(panels, ncols=1), sec["name"])
        shown[sec["name"]] = {"title": sec["title"], "note": sec.get("note", ""), "files": sec["files"],
                              "kind": sec.get("kind", "single"), "seconds": round(float(np.sum(secs)), 2),
                              "figure": f"figures/{run.name}__{sec['name']}.png"}
    run.write({"sections": shown, "images_per_s": n_images / max(1e-9, sum(s["seconds"] for s in shown.values()))},
              n_evaluated=n_images, extra={"world": world.label, "model": pipe.c.label})
    return shown


# ---- 10 location formats ------------------------------------------------------------------------------------
def location_formats(run: NotebookRun) -> dict[str, Any]:
    p = run.params
    world = world_of(run)
    variants = [_base_variant(run, s) for s in p["SETTINGS"]]
    records = run_grid(world, variants, p["SEEDS"], _out_root(run), p["N_IMAGES"], fid=p.get("FID", False))
    rows = aggregate(records)
    real = real_control(world, p["N_IMAGES"], settings=("box", "point", "scribble"))
    sample_grid(run, world, records, "samples")
    fig = _bar_plot(rows, ["box_AP50", "mask_AP50", "mask_IoU", "PiM"], f"{world.label}: location formats "
                    f"(mean and 95% CI over {len(p['SEEDS'])} seeds)", real["metrics"])
    run.figure(fig, "metrics")
    metrics = {"world": world.label, "rows": rows, "real": real, "model": world.pipeline().c.label,
               "fid_note": _fid_note(world)}
    run.write(metrics, n_evaluated=_n(rows), extra={"world": world.label})
    return metrics


def _fid_note(world) -> str:
    if world.name == "shapes":
        return ("Shapes: Fréchet distance in the Shapes CLIP's image features (64-d), generated vs real val images; "
                "not comparable to Inception FID")
    return "FID: Inception-v3 pool3 (torch-fidelity weights), generated vs real val2017 resized to 512"


# ---- 11 attribute binding -----------------------------------------------------------------------------------
def attribute_binding(run: NotebookRun) -> dict[str, Any]:
    p = run.params
    world = world_of(run)
    variants = [_base_variant(run, s) for s in p["SETTINGS"]]
    records = run_grid(world, variants, p["SEEDS"], _out_root(run), p["N_IMAGES"])
    rows = aggregate(records)
    real = real_control(world, p["N_IMAGES"], settings=tuple(p["SETTINGS"]))
    sample_grid(run, world, records, "samples")
    real_flat = {}
    for s in p["SETTINGS"]:
        if f"{s}_acc" in real["metrics"]:
            real_flat[f"attr_acc_{s}"] = real["metrics"][f"{s}_acc"]
    fig = _bar_plot(rows, ["attr_acc", "clip_local"], f"{world.label}: attribute binding "
                    f"(mean and 95% CI over {len(p['SEEDS'])} seeds)")
    run.figure(fig, "metrics")
    chance = {s: 1.0 / len((world.attribute_vocab or {}).get(s, [None] * 8)) for s in p["SETTINGS"]}
    metrics = {"world": world.label, "rows": rows, "real": real, "chance": chance, "model": world.pipeline().c.label}
    run.write(metrics, n_evaluated=_n(rows), extra={"world": world.label})
    return metrics


# ---- 20 ablations --------------------------------------------------------------------------------------------
def ablations(run: NotebookRun) -> dict[str, Any]:
    p = run.params
    world = world_of(run)
    variants, groups = ablation_grid(_base_variant(run, p["BASE_SETTING"], name="base"), p["ABLATE"])
    records = run_grid(world, variants, p["SEEDS"], _out_root(run), p["N_IMAGES"])  # full: the array generated them
    rows = aggregate(records)
    counts = by_instance_count([r for r in records if r.variant.name == "base"], world)
    base_rows = rows["base"]["metrics"]
    seed_variance = {m: {"values": s["values"], "mean": s["mean"], "sd": s["sd"], "ci95": s["ci95"]}
                     for m, s in base_rows.items()}
    fig = _ablation_plot(rows, groups, p.get("PLOT_METRICS", ["box_AP50", "mask_IoU"]), world.label)
    run.figure(fig, "groups")
    fig2 = _count_plot(counts, world.label)
    run.figure(fig2, "instance_count")
    metrics = {"world": world.label, "rows": rows, "groups": groups, "by_instance_count": counts,
               "seed_variance": seed_variance, "base": rows["base"]["variant"], "model": world.pipeline().c.label}
    # images scored once per (variant, seed) run; rows that name the base configuration share its images
    scored = {(r.variant.key(), r.seed): r.n_evaluated for r in records}
    run.write(metrics, n_evaluated=int(sum(scored.values())), extra={"world": world.label})
    return metrics


def _ablation_plot(rows, groups, metrics, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(len(metrics), len(groups), figsize=(3.4 * len(groups), 3.0 * len(metrics)),
                             squeeze=False)
    for j, (g, names) in enumerate(groups.items()):
        for i, m in enumerate(metrics):
            ax = axes[i][j]
            xs = [n.split("=", 1)[1] for n in names]
            means = [rows[n]["metrics"].get(m, {}).get("mean", np.nan) for n in names]
            cis = [rows[n]["metrics"].get(m, {}).get("ci95", np.nan) for n in names]
            ax.errorbar(range(len(xs)), means, yerr=[0 if np.isnan(c) else c for c in cis], fmt="o-", capsize=4)
            ax.set_xticks(range(len(xs)), xs)
            ax.set_title(f"{g}" if i == 0 else "")
            ax.set_ylabel(m if j == 0 else "")
    fig.suptitle(f"{label}: ablations (mean and 95% CI over seeds)")
    fig.tight_layout()
    return fig


def _count_plot(counts, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(counts)
    means = [counts[n]["mean"] for n in names]
    cis = [0 if np.isnan(counts[n]["ci95"]) else counts[n]["ci95"] for n in names]
    ax.bar(names, means, yerr=cis, capsize=5, color="#4c72b0")
    ax.set_xlabel("instances in the layout")
    ax.set_ylabel("per-image mask IoU")
    ax.set_title(f"{label}: by number of instances")
    fig.tight_layout()
    return fig


# ---- 30 extension ---------------------------------------------------------------------------------------------
def _planner(run: NotebookRun):
    p = run.params
    if p["PLANNER"] == "offline":
        if run.smoke:
            from instdiff_lib.extension.shapes import ShapesPlanner

            return ShapesPlanner(n_instances=tuple(p["N_INSTANCES"]), seed=p["SEED"])
        from instdiff_lib.extension.planner import OfflinePlanner

        return OfflinePlanner(n_instances=tuple(p["N_INSTANCES"]), seed=p["SEED"])
    from instdiff_lib.extension.planner import LLMPlanner

    size = 64 if run.smoke else 512
    return LLMPlanner(p.get("PLANNER_MODEL") or None, base_url=p.get("PLANNER_BASE_URL") or None, width=size,
                      height=size, n_instances=tuple(p["N_INSTANCES"]), seed=p["SEED"])


def _placement_detector(run: NotebookRun, world):
    p = run.params
    if run.smoke and p.get("DETECTOR", "shapes-yolo") == "shapes-yolo":
        from instdiff_lib.extension.shapes import ShapesYoloDetector

        return ShapesYoloDetector(world.detector())
    from instdiff_lib.extension.placement import load_detector

    from instdiff_lib.report.assets import hf_cache

    folder = p.get("DETECTOR_MODEL") or None  # a local folder (anchored at the project root) or a hub id
    if folder and run.path(folder).is_dir():
        folder = str(run.path(folder))
    return load_detector(p.get("DETECTOR", "grounding-dino"), folder, device=world.device, cache_dir=str(hf_cache()))


def extension(run: NotebookRun) -> dict[str, Any]:
    """Plan layouts from prompts, generate them, and check where the instances ended up (placement evaluation of planned layouts)."""
    from instdiff_lib.extension.placement import evaluate_placement
    from instdiff_lib.extension.planner import plan_many
    from instdiff_lib.extension.rating import export_rating_sheet, ingest_ratings

    p = run.params
    world = world_of(run)
    out = _out_root(run) / "extension"
    planner = _planner(run)
    prompts = p.get("PROMPTS") or p["N_SCENES"]
    plan = plan_many(prompts, planner, out / "layouts", seed=p["SEED"])
    files = sorted((out / "layouts").glob("layout_*.json"))
    pipe = world.pipeline()
    images, planned, prompts_used = [], [], []
    for k, f in enumerate(files):
        layout = Layout.from_json(f)
        target = out / "images" / f"{f.stem}.png"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            res = pipe(layout, seed=p["SEED"] + k, steps=p["STEPS"], guidance=p["GUIDANCE"], alpha=p["ALPHA"],
                       mis=p["MIS"], negative_prompt=world.negative_prompt, drop="box", progress=False)
            res.images[0].save(target)
        images.append(target)
        planned.append(f)
        prompts_used.append(json.loads(f.read_text()).get("prompt") or layout.caption)
    detector = _placement_detector(run, world)
    result = evaluate_placement(images, planned, detector, fed=planned, prompts=prompts_used, clip=world.clip(),
                                image_ids=[f.stem for f in files])
    _placement_figure(run, images, result.details["instances"], [f.stem for f in files], p.get("FIGURE_IMAGES", 6))
    sheet = export_rating_sheet(images, prompts_used, out / "rating", shuffle_seed=p["SEED"])
    ratings = None
    if p.get("RATINGS_CSV"):
        ratings = ingest_ratings(run.path(p["RATINGS_CSV"]), sheet["manifest"])
    v = result.values
    metrics = {"world": world.label, "planner": getattr(planner, "label", "?"), "planner_settings": planner.settings(),
               "detector": detector.settings(), "mean_iou": v.get("mean_iou"), "mean_iou_found": v.get("mean_iou_found"),
               "recall_at_0.5": v.get("recall_at_50"), "found_rate": v.get("found_rate"),
               "mean_iou_fed": v.get("mean_iou_fed"), "recall_at_0.5_fed": v.get("recall_at_50_fed"),
               "clip_global": v.get("clip_score"), "n_instances": v.get("n_instances"),
               "plan_report": {k: plan[k] for k in ("planner", "n_requested", "n_written", "n_failed", "totals")},
               "notes": result.details["notes"], "rating_sheet": {k: str(v) for k, v in sheet.items()},
               "ratings": ratings, "model": pipe.c.label}
    run.write(metrics, n_evaluated=result.n_evaluated, n_skipped=result.n_skipped,
              extra={"world": world.label, "instances": result.details["instances"]})
    return metrics


def _placement_figure(run, images, records, ids, n: int) -> None:
    from PIL import ImageDraw

    cells = []
    for path, image_id in list(zip(images, ids))[:n]:
        with Image.open(path) as im:
            img = im.convert("RGB")
        scale = 256 / img.width
        img = img.resize((256, 256), Image.NEAREST)
        d = ImageDraw.Draw(img)
        for r in (r for r in records if r["image"] == image_id):
            d.rectangle([v * scale for v in r["planned_box"]], outline=(0, 170, 0), width=2)
            if r["detected_box"] is not None:
                d.rectangle([v * scale for v in r["detected_box"]], outline=(220, 0, 0), width=2)
            d.text((r["planned_box"][0] * scale + 2, r["planned_box"][1] * scale + 1), f"{r['iou']:.2f}",
                   fill=(0, 120, 0))
        cells.append(img)
    if cells:
        run.figure(image_grid(cells, ncols=min(3, len(cells))), "placement")


# ---- 99 blogpost ---------------------------------------------------------------------------------------------
def blogpost(run: NotebookRun) -> dict[str, Any]:
    from instdiff_lib.report.blog import render_blog

    path, info = render_blog(run.path(run.params.get("OUT", "blogpost.md")))
    run.write({"tables": info["tables"]}, n_evaluated=0, extra={"sources": info["sources"], "blog": str(path)})
    return info
