"""The notebooks' steps that are about the report rather than the protocol: the world and the configurations a
notebook's parameters describe, the setup check's pieces, the demos, the extension's pieces, and writing each
notebook's ``results/<notebook>.json``.

The protocol steps (generate, detect, score, controls, aggregate) are in :mod:`instdiff_lib.evaluation.experiments`,
the tables the notebooks show in :mod:`.tables`, the figures in :mod:`.figures`. Steps whose output only goes to
the results file record it in ``run.steps``; the ``write_*`` step of each notebook writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from instdiff_lib.evaluation.experiments import RunRecord, Variant, ablation_grid, ablation_variants
from instdiff_lib.layouts.layout import Instance, Layout
from instdiff_lib.report.context import NotebookRun
from instdiff_lib.report.figures import load_png, panel
from instdiff_lib.report.tables import mapping_table
from instdiff_lib.results import device_description, package_versions, project_root
from instdiff_lib.viz import image_grid


# ---- from a notebook's parameters ------------------------------------------------------------------------------
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


def out_root(run: NotebookRun) -> Path:
    """Where the run's generated images go (``OUT_DIR``, default ``outputs/eval/<profile>``)."""
    return run.path(run.params.get("OUT_DIR") or f"outputs/eval/{run.profile}")


def base_variant(run: NotebookRun, setting: str, name: str | None = None) -> Variant:
    p = run.params
    return Variant(name=name or setting, setting=setting, steps=p["STEPS"], guidance=p["GUIDANCE"], alpha=p["ALPHA"],
                   mis=p["MIS"])


def variants(run: NotebookRun) -> list[Variant]:
    """One configuration per evaluation setting of ``SETTINGS``, with the notebook's sampler parameters."""
    return [base_variant(run, s) for s in run.params["SETTINGS"]]


def chance(world, settings) -> dict[str, float]:
    """Attribute accuracy of a uniform guess: 1 / the vocabulary size, per attribute setting."""
    from instdiff_lib.evaluation.experiments import attribute_vocab

    return {s: 1.0 / len(attribute_vocab(world, s)) for s in settings}


@dataclass
class AblationPlan:
    """The base configuration and, per ablated field, the variants that change only that field."""

    base: Variant
    pairs: list[tuple[str, Variant]]
    groups: dict[str, list[str]] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)  # base first, then each distinct name once


def ablation_plan(run: NotebookRun) -> AblationPlan:
    p = run.params
    base = base_variant(run, p["BASE_SETTING"], name="base")
    runs, groups = ablation_grid(base, p["ABLATE"])  # the generation array generates the same runs
    return AblationPlan(base, ablation_variants(base, p["ABLATE"]), groups, runs)


def _n(rows: dict[str, dict]) -> int:
    return int(sum(r["n_evaluated"] for r in rows.values()))


# ---- 00 setup check ----------------------------------------------------------------------------------------------
def environment(run: NotebookRun):
    """Package versions, the device and the torch threads (recorded for the results file)."""
    import torch

    env = {"versions": package_versions(), "device": device_description(), "torch_threads": torch.get_num_threads(),
           "cuda_available": torch.cuda.is_available()}
    run.steps.update(env)
    return mapping_table({**env["versions"], "device": env["device"], "torch threads": env["torch_threads"],
                          "CUDA available": env["cuda_available"]})


def weights_inventory(run: NotebookRun):
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
    else:  # every asset of the profile (report/assets.py), after the preflight has checked them all
        from instdiff_lib.report.assets import full_assets, preflight, profile_params

        preflight(run.profile)  # every asset of the chain; all missing ones listed at once, with their fetch commands
        for a in full_assets(profile_params(run.profile)):
            found[a.key] = {"path": str(a.path), "problem": a.problem(), "synthetic": bool(a.synthetic())}
        man = run.path(run.params["MODEL"]) / "manifest.json"
        if man.exists() and "model" in found:
            found["model"]["files"] = json.loads(man.read_text()).get("files")
    run.steps["weights"] = found
    rows = {f"{k} / {f}": sha for k, v in found.items() for f, sha in (v.items() if isinstance(v, dict) else [("", v)])}
    return mapping_table(rows, "sha256")


def first_image(run: NotebookRun, world):
    """One image from the first protocol layout (smoke) or the kitchen demo layout (full), all modalities fed."""
    pipe = world.pipeline()
    if run.smoke:
        layout = world.items(None, limit=1)[0].layout
    else:
        layout = Layout.from_json(project_root() / "layouts" / "boxes_kitchen_animals.json")
    p = run.params
    out = pipe(layout, seed=p["SEED"], steps=p["STEPS"], guidance=p["GUIDANCE"], alpha=p["ALPHA"], mis=p["MIS"],
               negative_prompt=world.negative_prompt, drop="all", progress=False)
    run.steps.update(world=world.label, model=pipe.c.label, image_seconds=out.info["seconds"],
                     unet_calls=out.info["unet_calls"])
    return load_png(run.figure(panel(layout, out.images[0], 256), "first_image"))


def parity_check(run: NotebookRun):
    """The parity checks against the official fixture, grouped (objs / eps / block / plms / mis)."""
    from instdiff_lib.parity import FixtureError, run_parity

    if not run.params.get("PARITY", True):
        run.steps["parity"] = None
        return "parity checks skipped (PARITY = False)"
    try:
        checks = run_parity()
    except FixtureError as e:
        run.steps["parity"] = f"parity fixture not available: {e}"
        return run.steps["parity"]
    groups: dict[str, dict] = {}
    for c in checks:
        g = groups.setdefault(c.name.split(".")[0], {"n": 0, "passed": 0, "max_err": 0.0})
        g["n"] += 1
        g["passed"] += int(c.ok)
        g["max_err"] = max(g["max_err"], float(c.max_abs))
    run.steps["parity"] = groups
    import pandas as pd

    return pd.DataFrame.from_dict(groups, orient="index")


def grounding_gap(run: NotebookRun, world):
    """Shapes only: the diffusion loss with the true, another image's, and no layout (detector-free)."""
    if world.name != "shapes":
        return "the grounding gap is measured for the Shapes model only"
    from instdiff_lib.training.diffusion import model_grounding_gap

    run.steps["grounding_gap"] = model_grounding_gap(world.pipeline().c)
    return mapping_table(run.steps["grounding_gap"])


# The official recipe (spec §1, §3) beside the committed Shapes model's, field by field: (what, official, key of the
# record below). The record's values come from the model folder's own model_config.json / train_config.json.
RECIPE_FIELDS = (
    ("start", "SD1.5 weights, fine-tuned", "start"),
    ("fuser attention", "full self-attention over visual and object tokens (masked attention off)", "fuser_attention"),
    ("prediction", "epsilon", "prediction_type"),
    ("autoencoder", "KL VAE, 4 x 64 x 64 latents", "vae"),
    ("text encoder", "CLIP ViT-L/14, frozen", "text"),
    ("fuser gates at init", "tanh(0) = 0", "fuser_gate_init"),
    ("learning rate", "5e-5, constant", "lr"),
    ("steps x batch", "as released (GPU cluster)", "steps"),
    ("training data", "COCO and SA-1B with generated instance captions", "data"),
)


def training_record(run: NotebookRun, world):
    """Shapes only: how the model in use was trained (its folder's ``summary.json`` / ``train_config.json`` /
    ``model_config.json``) and, field by field, where its recipe departs from the official one."""
    if world.name != "shapes":
        return "the released checkpoint: trained by the authors"
    import pandas as pd

    folder = Path(world.model)
    summary = json.loads((folder / "summary.json").read_text())
    tc = summary["train_config"]
    mc = json.loads((folder / "model_config.json").read_text())
    decay = (f", cosine decay to {tc.get('lr_min_ratio', 0):g}x from step {tc['lr_decay_start']} over "
             f"{tc['lr_decay_steps']} steps" if tc.get("lr_decay_start") is not None else ", constant")
    ours = {
        "start": "random initialisation (from scratch)",
        "fuser_attention": {"instance_masked": "instance-masked: a visual token sees an instance's location tokens "
                                               "only inside its region; seg tokens always",
                            "full": "full (as released)"}[mc.get("fuser_attention", "full")],
        "prediction_type": mc["schedule"]["prediction_type"],
        "vae": (f"{mc['vae']['kind']} (parameter-free)" if mc["vae"]["kind"] == "space_to_depth" else mc["vae"]["kind"]),
        "text": f"{mc['text']['num_hidden_layers']}-layer CLIP text tower of width {mc['text']['hidden_size']}, "
                "trained with the UNet",
        "fuser_gate_init": f"{tc['fuser_gate_init']:g}",
        "lr": f"{tc['lr']:g}, {tc['warmup_steps']} warm-up steps{decay}",
        "steps": f"{summary['steps']} x {tc['batch_size']} on {summary['threads']} CPU threads",
        "data": f"{tc['n_train_images']} procedural Shapes images (data seed {tc['data_seed']})",
    }
    rows = [{"what": what, "official": official, "this model": ours[key]} for what, official, key in RECIPE_FIELDS]
    run.steps["training"] = {"model": summary["export"]["label"], "steps": summary["steps"],
                             "compute_s": summary["elapsed_s"], "steps_per_s_last_session": summary["steps_per_s"],
                             "reproduce": summary["reproduce"], "recipe": rows}
    return pd.DataFrame(rows).set_index("what")


def write_setup(run: NotebookRun) -> dict[str, Any]:
    """``results/00_setup_check.json`` from the steps above."""
    s = run.steps
    info = {"parity": s.get("parity"), "versions": s["versions"], "device": s["device"],
            "torch_threads": s["torch_threads"], "cuda_available": s["cuda_available"], "world": s["world"],
            "model": s["model"], "weights": s["weights"], "image_seconds": s["image_seconds"],
            "unet_calls": s["unet_calls"]}
    for key in ("grounding_gap", "training"):
        if key in s:
            info[key] = s[key]
    path = run.write({"image_seconds": s["image_seconds"], "images_per_s": 1.0 / s["image_seconds"]}, n_evaluated=1,
                     extra={"setup": info})
    return {"results": str(path.relative_to(project_root()) if path.is_relative_to(project_root()) else path),
            "figures": run.figures}


# ---- 01 demos ------------------------------------------------------------------------------------------------------
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


def demo_scenes(run: NotebookRun):
    """The demo sections of the scenes file (``SCENES``): name, title, kind, drop preset and layout files."""
    import pandas as pd

    sections = yaml.safe_load(run.path(run.params["SCENES"]).read_text())
    return pd.DataFrame([{"name": s["name"], "title": s["title"], "kind": s.get("kind", "single"),
                          "drop": s.get("drop", "all"), "files": ", ".join(s["files"])} for s in sections]).set_index("name")


def demo(run: NotebookRun, world, name: str) -> Image.Image:
    """One demo section: its layouts generated from the same seed (hence the same noise), as [layout | image |
    layout over image] panels, one row per layout; saved as ``figures/01_demos__<name>.png``."""
    p = run.params
    scenes_file = run.path(p["SCENES"])
    sections = {s["name"]: s for s in yaml.safe_load(scenes_file.read_text())}
    if name not in sections:
        raise KeyError(f"{scenes_file} has no demo section {name!r}; it has {sorted(sections)}")
    sec = sections[name]
    pipe = world.pipeline()
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
        panels.append(panel(layout, out.images[0], p.get("PANEL_SIZE", 256)))
        secs.append(out.info["seconds"])
    path = run.figure(image_grid(panels, ncols=1), name)
    run.steps.setdefault("sections", {})[name] = {
        "title": sec["title"], "note": sec.get("note", ""), "files": sec["files"], "kind": sec.get("kind", "single"),
        "seconds": round(float(np.sum(secs)), 2), "figure": f"figures/{run.name}__{name}.png", "n_images": len(layouts)}
    return load_png(path)


def write_demos(run: NotebookRun, world):
    """``results/01_demos.json``: the sections shown above (a section of the scenes file no cell showed is named)."""
    import pandas as pd

    shown = {k: {f: v for f, v in sec.items() if f != "n_images"} for k, sec in run.steps.get("sections", {}).items()}
    n_images = sum(sec["n_images"] for sec in run.steps.get("sections", {}).values())
    in_file = [s["name"] for s in yaml.safe_load(run.path(run.params["SCENES"]).read_text())]
    not_shown = [n for n in in_file if n not in shown]
    if not_shown:
        print(f"sections of {run.params['SCENES']} not shown by this notebook: {not_shown}")
    run.write({"sections": shown, "images_per_s": n_images / max(1e-9, sum(s["seconds"] for s in shown.values()))},
              n_evaluated=n_images, extra={"world": world.label, "model": world.pipeline().c.label})
    return pd.DataFrame.from_dict({k: {"title": v["title"], "seconds": v["seconds"], "figure": v["figure"]}
                                   for k, v in shown.items()}, orient="index")


# ---- 10 / 11 / 20: results files -----------------------------------------------------------------------------------
def fid_note(world) -> str:
    if world.name == "shapes":
        return ("Shapes: Fréchet distance in the Shapes CLIP's image features (64-d), generated vs real val images; "
                "not comparable to Inception FID")
    return "FID: Inception-v3 pool3 (torch-fidelity weights), generated vs real val2017 resized to 512"


def write_location_formats(run: NotebookRun, world, rows: dict, real: dict, floor: dict) -> Path:
    """``results/10_location_formats.json``: the rows (mean, sd, 95% CI over seeds), the real-image ceiling and the
    shuffled-layout floor of every setting."""
    metrics = {"world": world.label, "rows": rows, "real": real, "shuffled": floor, "model": world.pipeline().c.label,
               "fid_note": fid_note(world)}
    return run.write(metrics, n_evaluated=_n(rows), extra={"world": world.label})


def write_attribute_binding(run: NotebookRun, world, rows: dict, real: dict, floor: dict,
                            chance_levels: dict[str, float]) -> Path:
    """``results/11_attribute_binding.json``: rows, the real-image ceiling, the shuffled-layout floor and chance."""
    metrics = {"world": world.label, "rows": rows, "real": real, "shuffled": floor, "chance": chance_levels,
               "model": world.pipeline().c.label}
    return run.write(metrics, n_evaluated=_n(rows), extra={"world": world.label})


def write_ablations(run: NotebookRun, world, plan: AblationPlan, records: list[RunRecord], rows: dict,
                    counts: dict, floor: dict | None = None, real: dict | None = None) -> Path:
    """``results/20_ablations.json``: rows, the ablation groups, the base row by instance count and its seed
    variance, the base's shuffled-layout floor (``floor``: aggregated rows) and the real-image ceiling of its setting
    (``real``). ``n_evaluated`` counts each (configuration, seed) once (rows that name the base share its images)."""
    seed_variance = {m: {"values": s["values"], "mean": s["mean"], "sd": s["sd"], "ci95": s["ci95"]}
                     for m, s in rows["base"]["metrics"].items()}
    metrics = {"world": world.label, "rows": rows, "groups": plan.groups, "by_instance_count": counts,
               "seed_variance": seed_variance, "base": rows["base"]["variant"], "model": world.pipeline().c.label}
    if floor is not None:
        metrics["shuffled"] = floor
    if real is not None:
        metrics["real"] = real
    scored = {(r.variant.key(), r.seed): r.n_evaluated for r in records}
    return run.write(metrics, n_evaluated=int(sum(scored.values())), extra={"world": world.label})


# ---- 30 extension --------------------------------------------------------------------------------------------------
def planner(run: NotebookRun):
    """The layout planner of ``PLANNER``: an OpenAI-compatible LLM, or the offline template planner (labelled)."""
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


def placement_detector(run: NotebookRun, world):
    """The grounding detector of the placement check (smoke: the Shapes YOLO behind the same interface)."""
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


def extension_dir(run: NotebookRun) -> Path:
    return out_root(run) / "extension"


@dataclass
class Planned:
    """The planned scenes: layout files, the prompt of each, and (after generation) the image of each."""

    files: list[Path]
    prompts: list[str]
    report: dict
    images: list[Path] = field(default_factory=list)


def plan_layouts(run: NotebookRun, planner_) -> Planned:
    """Plan ``PROMPTS`` (or ``N_SCENES`` prompts) into layout JSON files (kept: a rerun reuses them)."""
    from instdiff_lib.extension.planner import plan_many

    p = run.params
    out = extension_dir(run)
    plan = plan_many(p.get("PROMPTS") or p["N_SCENES"], planner_, out / "layouts", seed=p["SEED"])
    files = sorted((out / "layouts").glob("layout_*.json"))
    prompts = [json.loads(f.read_text()).get("prompt") or Layout.from_json(f).caption for f in files]
    report = {k: plan[k] for k in ("planner", "n_requested", "n_written", "n_failed", "totals")}
    return Planned(files, prompts, report)


def generate_planned(run: NotebookRun, world, planned: Planned) -> Image.Image:
    """One image per planned layout (boxes fed; seed SEED + index; an existing image is kept), shown as panels."""
    p = run.params
    pipe = world.pipeline()
    panels = []
    planned.images = []
    for k, f in enumerate(planned.files):
        layout = Layout.from_json(f)
        target = extension_dir(run) / "images" / f"{f.stem}.png"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            res = pipe(layout, seed=p["SEED"] + k, steps=p["STEPS"], guidance=p["GUIDANCE"], alpha=p["ALPHA"],
                       mis=p["MIS"], negative_prompt=world.negative_prompt, drop="box", progress=False)
            res.images[0].save(target)
        planned.images.append(target)
        with Image.open(target) as im:
            panels.append(panel(layout, im, 192))
    return image_grid(panels, ncols=1)


def check_placement(run: NotebookRun, world, planned: Planned, detector):
    """Where each planned instance ended up: the detector's box for its label vs the planned (and fed) box."""
    from instdiff_lib.extension.placement import evaluate_placement

    return evaluate_placement(planned.images, planned.files, detector, fed=planned.files, prompts=planned.prompts,
                              clip=world.clip(), image_ids=[f.stem for f in planned.files])


def rating_sheet(run: NotebookRun, planned: Planned) -> dict:
    """The blind rating sheet (HTML + CSV) of the generated images, and the ratings of ``RATINGS_CSV`` if given."""
    from instdiff_lib.extension.rating import export_rating_sheet, ingest_ratings

    p = run.params
    sheet = export_rating_sheet(planned.images, planned.prompts, extension_dir(run) / "rating", shuffle_seed=p["SEED"])
    ratings = ingest_ratings(run.path(p["RATINGS_CSV"]), sheet["manifest"]) if p.get("RATINGS_CSV") else None
    return {"rating_sheet": {k: str(v) for k, v in sheet.items()}, "ratings": ratings}


def write_extension(run: NotebookRun, world, planner_, detector, planned: Planned, result, sheet: dict) -> Path:
    """``results/30_extension.json``: the placement numbers, the plan report, the rating sheet."""
    v = result.values
    metrics = {"world": world.label, "planner": getattr(planner_, "label", "?"), "planner_settings": planner_.settings(),
               "detector": detector.settings(), "mean_iou": v.get("mean_iou"), "mean_iou_found": v.get("mean_iou_found"),
               "recall_at_0.5": v.get("recall_at_50"), "found_rate": v.get("found_rate"),
               "mean_iou_fed": v.get("mean_iou_fed"), "recall_at_0.5_fed": v.get("recall_at_50_fed"),
               "clip_global": v.get("clip_score"), "n_instances": v.get("n_instances"),
               "plan_report": planned.report, "notes": result.details["notes"], **sheet,
               "model": world.pipeline().c.label}
    return run.write(metrics, n_evaluated=result.n_evaluated, n_skipped=result.n_skipped,
                     extra={"world": world.label, "instances": result.details["instances"]})


# ---- 99 blogpost ---------------------------------------------------------------------------------------------------
def blogpost(run: NotebookRun) -> dict[str, Any]:
    from instdiff_lib.report.blog import render_blog

    path, info = render_blog(run.path(run.params.get("OUT", "blogpost.md")))
    run.write({"tables": info["tables"]}, n_evaluated=0, extra={"sources": info["sources"], "blog": str(path)})
    return info
