"""``instdiff bench --protocol``: what the full protocol costs on this machine's accelerator, and its projection.

Measured on the full-size model (random weights unless ``model`` names a converted folder: the speed does not depend
on the values), in the dtype the full profile uses:

1. **cost model**: the UNet forward time per batch size (2 = one guidance pair; ``2 (n + 1)`` = an MIS step with n
   instances), with its peak memory. A PLMS run of S steps makes S + 1 guided evaluations (the first step takes two);
   with MIS the first ``int(S * mis)`` steps (and the extra one) run every branch, so an image with n instances costs
   ``(S + 1 - k) f(2) + k f(2 (n + 1)) + rest`` with ``k = int(S * mis) + 1`` (0 without MIS) and ``rest`` the
   tokens, the text tower, the VAE decode and the JPEG, measured end to end.
2. **MIS, batched against the official call order** (every branch and guidance half its own batch-1 UNet call) at a
   few instance counts: seconds per image, peak memory, largest latent difference.
3. **end to end** through the generation array's own code (:func:`generate_eval`: pipeline, JPEG, manifest), per
   evaluation setting, on layouts of 1 to 30 instances: seconds and peak memory per image, and the cost model's
   prediction beside each.

:func:`project_protocol` then multiplies the images the full profile's params files ask for (10, 11 and every ablation
of 20; each image folder once) by the cost model at COCO's instance counts. Read the numbers from the printed table;
no test times anything.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from instdiff_lib.bench import _sync, _timed, synthetic_layout
from instdiff_lib.sampling.pipeline import resolve_drop

COCO_MEAN_INSTANCES = 7.4  # COCO val2017 annotations per image, incl. crowd, capped at 30 (spec section 4.7)
BATCHES = (2, 4, 8, 16, 32, 62)  # 62 = both guidance halves of 31 branches (30 instances)
E2E_COUNTS = (1, 2, 4, 8, 16, 30)
MIS_COUNTS = (1, 8, 30)
SETTINGS = ("box", "mask", "point", "scribble", "color", "texture")


@dataclass
class _Item:  # what generate_eval reads of a COCO item
    image_id: int
    file_name: str
    layout: Any


def _peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def mis_evaluations(steps: int, mis: float, n_instances: int) -> int:
    """Guided evaluations that run every MIS branch (the sampler's rule: the first ``int(steps * mis)`` steps, plus
    the improved-Euler step's second evaluation; none without instances or MIS)."""
    k = int(steps * mis)
    return k + 1 if k > 0 and n_instances > 0 else 0


def predict_seconds(cost: dict, n_instances: int, steps: int, mis: float) -> float:
    """Seconds per image of the cost model (``cost`` as :func:`run_protocol_bench` returns it)."""
    bs = [int(b) for b in cost["unet_s"]]
    ts = [cost["unet_s"][str(b)] for b in bs]

    def f(b: float) -> float:  # linear between measured batch sizes, extrapolated linearly beyond them
        if b <= bs[-1]:
            return float(np.interp(b, bs, ts))
        return ts[-1] + (b - bs[-1]) * (ts[-1] - ts[-2]) / (bs[-1] - bs[-2])

    n = min(n_instances, 30)
    k = mis_evaluations(steps, mis, n)
    return (steps + 1 - k) * f(2) + k * f(2 * (n + 1)) + cost["rest_s"]


def _layout(n: int, seed: int, size: int):
    """n instances with boxes and elliptical masks (every modality derivable), COCO-like phrases and a caption."""
    lay = synthetic_layout(n, size=size, seed=seed)
    words = ["person", "dog", "car", "chair", "cup", "bicycle", "horse", "bottle"]
    for i, inst in enumerate(lay.instances):
        inst.caption = words[(seed + i) % len(words)]
    lay.caption = "A photo of a busy scene." + ", ".join(i.caption for i in lay.instances)
    return lay


def _time_unet(unet, cfg, dev, dtype, batch: int, repeats: int) -> tuple[float, float | None]:
    s = cfg.unet.sample_size
    g = torch.Generator(device="cpu").manual_seed(batch)
    x = torch.randn(batch, cfg.unet.in_channels, s, s, generator=g).to(dev, dtype)
    ctx = torch.randn(batch, cfg.text.max_position_embeddings, cfg.unet.context_dim, generator=g).to(dev, dtype)
    t = torch.full((batch,), 500, device=dev)
    with torch.no_grad():
        null = unet.position_net.null_grounding(batch, device=dev, seg_size=1)
        objs = unet.tokenize(null, resolve_drop(None)).to(dtype)
        unet(x, t, ctx, objs, 1)  # warm-up
        _sync(dev)
        _reset_peak(dev)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            unet(x, t, ctx, objs, 1)
            _sync(dev)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), _peak_gib(dev)


def run_protocol_bench(config: str = "sd15", model: str | None = None, device: str = "cuda",
                       dtype: torch.dtype = torch.float16, steps: int = 50, mis: float = 0.36,
                       batches: Sequence[int] = BATCHES, repeats: int = 5, mis_counts: Sequence[int] = MIS_COUNTS,
                       settings: Sequence[str] = SETTINGS, counts: Sequence[int] = E2E_COUNTS,
                       images_per_setting: int = 12, out_dir: str | Path | None = None,
                       budget_s: float | None = None, log=print) -> dict:
    """The three measurements (module docstring). ``budget_s`` stops the end-to-end part early (what ran is kept)."""
    from instdiff_lib.evaluation.generation import generate_eval
    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline
    from instdiff_lib.weights.checkpoint import build_components, load_any

    t_start = time.perf_counter()
    dev = torch.device(device)
    t = time.perf_counter()
    if model:
        comp = load_any(model)
    else:
        comp = build_components(config, seed=0)
        with torch.no_grad():  # non-zero gates and ScaleU, as trained weights have (the fusers do real work)
            for p in comp.unet.parameters():
                if not p.any():
                    p.normal_(0, 0.05)
    pipe = InstanceDiffusionPipeline(comp, device=dev, dtype=dtype)
    cfg = comp.cfg
    out: dict[str, Any] = {
        "model": comp.label, "config": cfg.name, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "steps": steps, "mis": mis, "image_size": cfg.image_size,
        "load_s": round(time.perf_counter() - t, 1)}
    log(f"model: {comp.label} on {out['device_name']} ({out['dtype']}), loaded in {out['load_s']} s")

    # 1. UNet time per batch size
    out["unet_s"], out["unet_peak_gib"] = {}, {}
    for b in batches:
        sec, peak = _time_unet(comp.unet, cfg, dev, dtype, b, repeats)
        out["unet_s"][str(b)], out["unet_peak_gib"][str(b)] = round(sec, 5), peak
        log(f"unet batch {b:3d}: {sec * 1e3:8.1f} ms  ({sec / b * 1e3:6.1f} ms/sample)  peak {peak} GiB")

    # 2. MIS batched vs the official call order
    out["mis_compare"] = []
    for n in mis_counts:
        lay = _layout(n, seed=n, size=cfg.image_size)
        row = {"instances": n}
        lat = {}
        for name, batched in (("batched", True), ("official_order", False)):
            _reset_peak(dev)
            r = _timed(pipe, lay, dev, steps=steps, mis=mis, num_images=1, batched=batched,
                       max_batch=pipe.resolve_max_batch(2 * (n + 1)) if batched else None)
            lat[name] = r.pop("_latents")
            row[name] = {**r, "peak_mem_gib": _peak_gib(dev)}
        row["speedup"] = round(row["official_order"]["seconds"] / row["batched"]["seconds"], 2)
        row["max_abs_diff"] = float((lat["batched"].float() - lat["official_order"].float()).abs().max())
        out["mis_compare"].append(row)
        log(f"MIS n={n:2d}: batched {row['batched']['seconds']:.2f} s, official order "
            f"{row['official_order']['seconds']:.2f} s ({row['speedup']}x), max |diff| {row['max_abs_diff']:.2e}")

    # 3. end to end through generate_eval, per setting (the "rest" term is fitted from these images below)
    out["rest_s"] = 0.0
    e2e = []
    tmp = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="instdiff_protocol_bench_"))
    stopped = False
    for setting in settings:
        for k in range(images_per_setting):
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                stopped = True
                break
            n = counts[k % len(counts)]
            item = _Item(k + 1, f"{k + 1:012d}.jpg", _layout(n, seed=100 + k, size=cfg.image_size))
            _reset_peak(dev)
            _sync(dev)
            t0 = time.perf_counter()
            generate_eval([item], tmp / setting, pipe, setting, steps=steps, mis=mis, progress=False)
            _sync(dev)
            sec = time.perf_counter() - t0
            e2e.append({"setting": setting, "instances": n, "seconds": round(sec, 3), "peak_mem_gib": _peak_gib(dev)})
        if stopped:
            break
    # rest = what the UNet calls do not explain (tokens, text tower, decode, JPEG, manifest): median over images
    rests = [r["seconds"] - predict_seconds(out, r["instances"], steps, mis) for r in e2e]
    out["rest_s"] = round(statistics.median(rests), 4) if rests else 0.0
    for r in e2e:
        r["predicted_s"] = round(predict_seconds(out, r["instances"], steps, mis), 3)
    out["end_to_end"] = e2e
    out["end_to_end_stopped_early"] = stopped
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    return out


def _variant_seconds(cost: dict, variant, mean_instances: float, counts: dict[int, int] | None) -> float:
    """Mean seconds per image of one variant: over the given instance-count histogram, else linear in n between the
    two integers around ``mean_instances``."""
    if counts:
        total = sum(counts.values())
        return sum(c * predict_seconds(cost, n, variant.steps, variant.mis) for n, c in counts.items()) / total
    lo = int(mean_instances)
    w = mean_instances - lo
    return ((1 - w) * predict_seconds(cost, lo, variant.steps, variant.mis)
            + w * predict_seconds(cost, lo + 1, variant.steps, variant.mis))


def coco_instance_counts(coco_root: str | Path) -> dict[int, int]:
    """Per-image instance counts of COCO val2017 as the protocol conditions on them (all annotations incl. crowd,
    the first 30): {n: number of images}."""
    path = Path(coco_root) / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    per = {im["id"]: 0 for im in data["images"]}
    for a in data["annotations"]:
        per[a["image_id"]] = per.get(a["image_id"], 0) + 1
    hist: dict[int, int] = {}
    for n in per.values():
        hist[min(n, 30)] = hist.get(min(n, 30), 0) + 1
    return hist


def protocol_images(profile: str = "full", params_dir: str | Path | None = None) -> list[dict]:
    """Every image folder the generation array fills for ``profile`` (10, 11, the ablations of 20), each once, with
    how many images it holds and which notebooks read it."""
    from instdiff_lib.evaluation.experiments import variant_folder
    from instdiff_lib.report.context import NotebookRun
    from instdiff_lib.report.params import GENERATION_NOTEBOOKS, effective_params, params_path
    from instdiff_lib.report.runner import generation_runs

    folders: dict[str, dict] = {}
    for name in GENERATION_NOTEBOOKS:
        run = NotebookRun(name, effective_params(name, profile, params_path(name, profile, params_dir)))
        for variant, seed in generation_runs(run):
            key = str(variant_folder("", variant, seed))
            row = folders.setdefault(key, {"folder": key, "variant": variant, "seed": seed, "images": 0,
                                           "notebooks": []})
            row["images"] = max(row["images"], int(run.params["N_IMAGES"]))  # a smaller run reads the first ones
            row["notebooks"].append(name)
    return list(folders.values())


def project_protocol(cost: dict, profile: str = "full", params_dir: str | Path | None = None,
                     mean_instances: float = COCO_MEAN_INSTANCES, coco_root: str | Path | None = None) -> dict:
    """GPU-hours of the profile's generation on the measured machine, per notebook and in all."""
    counts = coco_instance_counts(coco_root) if coco_root else None
    rows, per_nb = [], {}
    for f in protocol_images(profile, params_dir):
        v = f["variant"]
        s = _variant_seconds(cost, v, mean_instances, counts)
        hours = f["images"] * s / 3600
        rows.append({"folder": f["folder"], "notebooks": f["notebooks"], "images": f["images"], "steps": v.steps,
                     "mis": v.mis, "s_per_image": round(s, 3), "gpu_hours": round(hours, 2)})
        nb = f["notebooks"][0]
        per_nb[nb] = per_nb.get(nb, 0.0) + hours
    return {"device_name": cost.get("device_name"), "dtype": cost.get("dtype"), "profile": profile,
            "instances": "COCO histogram" if counts else f"mean {mean_instances} (spec 4.7; pass coco_root for the "
                                                          "exact histogram)",
            "images": sum(r["images"] for r in rows), "gpu_hours": round(sum(r["gpu_hours"] for r in rows), 1),
            "per_notebook_gpu_hours": {k: round(v, 1) for k, v in per_nb.items()}, "folders": rows}


def format_protocol(cost: dict, proj: dict | None) -> str:
    lines = [f"{cost['device_name']} {cost['dtype']}, {cost['steps']} PLMS steps, MIS {cost['mis']}, "
             f"{cost['image_size']} px",
             "UNet batch   ms/call  ms/sample  peak GiB"]
    for b, s in cost["unet_s"].items():
        lines.append(f"{int(b):10d} {s * 1e3:9.1f} {s / int(b) * 1e3:10.1f}  {cost['unet_peak_gib'][b]}")
    lines.append("MIS n   batched s  official-order s  speed-up  peak GiB (batched / official)  max|diff|")
    for r in cost["mis_compare"]:
        lines.append(f"{r['instances']:5d} {r['batched']['seconds']:11.2f} {r['official_order']['seconds']:17.2f} "
                     f"{r['speedup']:9.2f}  {r['batched']['peak_mem_gib']} / {r['official_order']['peak_mem_gib']}"
                     f"  {r['max_abs_diff']:.2e}")
    lines.append("setting    images  s/image (mean)  predicted  peak GiB (max)")
    for s in dict.fromkeys(r["setting"] for r in cost["end_to_end"]):
        rs = [r for r in cost["end_to_end"] if r["setting"] == s]
        peaks = [r["peak_mem_gib"] for r in rs if r["peak_mem_gib"] is not None]
        lines.append(f"{s:10s} {len(rs):6d} {statistics.mean(r['seconds'] for r in rs):15.2f} "
                     f"{statistics.mean(r['predicted_s'] for r in rs):10.2f}  {max(peaks) if peaks else '-'}")
    lines.append(f"rest (tokens, text, VAE decode, JPEG) {cost['rest_s']:.3f} s per image")
    if proj:
        lines.append(f"projection ({proj['profile']} profile, instances: {proj['instances']}): {proj['images']} images,"
                     f" {proj['gpu_hours']} GPU-hours")
        for nb, h in proj["per_notebook_gpu_hours"].items():
            lines.append(f"  {nb}: {h} GPU-hours")
    return "\n".join(lines)
