"""The figures of the report notebooks' steps: what was fed, what was generated, what the detector and CLIP saw,
and the plots of the aggregated numbers.

Each function saves ``figures/<notebook>__<name>.png`` through :meth:`NotebookRun.figure` and returns the saved
image, so the notebook cell shows exactly the file the blog links.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from instdiff_lib.evaluation.experiments import Generated, Variant, attribute_crops, detect
from instdiff_lib.evaluation.generation import SETTINGS, image_seed, read_manifest
from instdiff_lib.report.context import NotebookRun
from instdiff_lib.viz import draw_detections, draw_layout, fed_layout, image_grid, titled_grid


def load_png(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _save(run: NotebookRun, obj, name: str) -> Image.Image:
    path = run.figure(obj, name)
    if hasattr(obj, "savefig"):
        import matplotlib.pyplot as plt

        plt.close(obj)
    return load_png(path)


def _first_seed(generated: Sequence[Generated]) -> list[tuple[Generated, str]]:
    """One run per distinct image folder at its row's first seed, with a label: the row's name, and how many other
    rows share those images (an ablation's base value has the base's folder)."""
    first: dict[str, Generated] = {}
    for g in generated:
        first.setdefault(g.variant.name, g)
    by_folder: dict[str, list[str]] = {}
    for name, g in first.items():
        by_folder.setdefault(g.folder, []).append(name)
    runs = {g.folder: g for g in first.values()}
    return [(runs[f], names[0] + (f" (+{len(names) - 1} same)" if len(names) > 1 else ""))
            for f, names in by_folder.items()]


def _files(g: Generated, n: int) -> list[tuple[int, Path]]:
    """The first ``n`` images of a generated folder (manifest order = image id order), as scored."""
    return [(r["image_id"], Path(g.folder) / r["file"]) for r in read_manifest(g.folder)[:n]]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _bare(layout):
    """The layout without its global caption (in small cells the caption band would hide the image)."""
    from instdiff_lib.layouts.layout import Layout

    return Layout(caption="", width=layout.width, height=layout.height, instances=layout.instances)


def panel(layout, image: Image.Image, size: int) -> Image.Image:
    """[layout on white (with the prompt) | generated image | layout over the image], each ``size`` px."""
    img = image.convert("RGB").resize((size, size), Image.NEAREST if image.width < size else Image.BICUBIC)
    return image_grid([draw_layout(layout, None, size), img, draw_layout(_bare(layout), img, size)], ncols=3)


# ---- inputs ----------------------------------------------------------------------------------------------------
def fed_layouts_figure(run: NotebookRun, world, variants: Sequence[Variant], n: int, seed: int = 0,
                       size: int = 160, name: str = "layouts") -> Image.Image:
    """The first ``n`` protocol items: the real image the layout was annotated on, then, per variant, the layout
    exactly as the model is fed it (its drop preset; points and scribbles derived with the image's seed)."""
    from instdiff_lib.model.config import DropFlags

    items = world.items(None, limit=n)
    cells = [_open(Path(world.real_image_dir) / it.file_name) for it in items]
    titles = [f"real image {it.image_id}\n{len(it.boxes)} instances" for it in items]
    for v in variants:
        drop = v.drop or SETTINGS[v.setting]["drop"]
        by_id = {it.image_id: it for it in world.items(SETTINGS[v.setting]["attribute"], limit=n)}
        for it in items:
            layout = fed_layout(by_id[it.image_id].layout, DropFlags.preset(drop), image_seed(seed, it.image_id))
            cells.append(draw_layout(_bare(layout), None, size))
            titles.append(f"{v.name}: drop preset '{drop}'\nimage {it.image_id}, seed {seed}")
    return _save(run, titled_grid(cells, titles, ncols=n, size=size), name)


# ---- generated images -------------------------------------------------------------------------------------------
def sample_grid(run: NotebookRun, world, generated: Sequence[Generated], name: str = "samples", per_row: int = 4,
                size: int = 160) -> Image.Image:
    """The first images of each row (first seed) with the layout they were generated from drawn over them."""
    cells, titles = [], []
    for g, label in _first_seed(generated):
        by_id = {it.image_id: it for it in world.items(SETTINGS[g.variant.setting]["attribute"], limit=per_row)}
        for image_id, path in _files(g, per_row):
            cells.append(draw_layout(_bare(by_id[image_id].layout), _open(path).resize((size, size), Image.NEAREST),
                                     size))
            titles.append(f"{label}\nseed {g.seed}, image {image_id}")
    if not cells:
        raise ValueError("no generated images to show (run the generation step first)")
    return _save(run, titled_grid(cells, titles, ncols=per_row, size=size), name)


def detections_figure(run: NotebookRun, world, generated: Sequence[Generated], n: int = 4, min_score: float = 0.25,
                      size: int = 160, name: str = "detections") -> Image.Image:
    """Per row (first seed), the first ``n`` generated images twice: with the layout that was asked for, and with
    what the protocol's detector found (``yolo val`` settings; only detections with score >= ``min_score`` drawn,
    the metrics use all of them down to 0.001)."""
    names = {c["id"]: c["name"] for c in json.loads(Path(world.instances_json).read_text())["categories"]}
    cells, titles = [], []
    for g, _ in _first_seed(generated):
        files = _files(g, n)
        preds = detect(world, files)
        by_id = {it.image_id: it for it in world.items(SETTINGS[g.variant.setting]["attribute"], limit=n)}
        for image_id, path in files:
            img = _open(path)
            mine = [p for p in preds if p["image_id"] == image_id]
            cells += [draw_layout(_bare(by_id[image_id].layout), img.resize((size, size), Image.NEAREST), size),
                      draw_detections(img, mine, size=size, min_score=min_score, names=names)]
            kept = sum(p["score"] >= min_score for p in mine)
            titles += [f"{g.variant.name} {image_id}: asked\n{len(by_id[image_id].boxes)} instances",
                       f"{g.variant.name} {image_id}: found\n{kept} >= {min_score} ({len(mine)} in all)"]
    return _save(run, titled_grid(cells, titles, ncols=2 * n, size=size), name)


def crops_figure(run: NotebookRun, world, generated: Sequence[Generated], n_images: int = 4, max_crops: int = 12,
                 size: int = 96, name: str = "crops") -> Image.Image:
    """Per attribute row (first seed): the ground-truth box crops of the first ``n_images`` images, as CLIP scores
    them, titled with the attribute that was asked for and the one CLIP's zero-shot choice picked."""
    cells, titles = [], []
    for g, _ in _first_seed(generated):
        crops = attribute_crops(world, g, n_images)[:max_crops]
        for c in crops:
            cells.append(c["crop"])
            mark = "ok" if c["predicted"] == c["attribute"] else "x"
            titles.append(f"{g.variant.name} {c['image_id']}/{c['instance']}\nasked {c['attribute']}\n"
                          f"CLIP: {c['predicted']} ({mark})")
    if not cells:
        raise ValueError("no attribute crops to show")
    return _save(run, titled_grid(cells, titles, ncols=min(max_crops, 6), size=size), name)


# ---- plots of the aggregated numbers ----------------------------------------------------------------------------
def metrics_figure(run: NotebookRun, rows: dict[str, dict], metrics: Sequence[str], title: str,
                   real: dict | None = None, floor: dict[str, dict] | None = None,
                   chance: dict[str, float] | None = None, name: str = "metrics",
                   real_per_row: dict[str, str] | None = None) -> Image.Image:
    """Seaborn bars (mean over seeds) with 95% CI error bars, one panel per metric; the real-image ceiling as a red
    dashed line (or a red bar marker where ``real`` has it per row: ``{metric}_{row}`` such as ``PiM_point``, or the
    key template of ``real_per_row``, e.g. ``{"attr_acc": "{row}_acc"}``), each row's shuffled-layout floor as a grey
    bar marker, chance (attribute accuracy) as an orange dotted line."""
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
        floors = [(i, (floor or {}).get(n, {}).get("metrics", {}).get(m, {}).get("mean")) for i, n in enumerate(names)]
        floors = [(i, f) for i, f in floors if f is not None and not np.isnan(f)]
        if floors:
            ax.scatter([i for i, _ in floors], [f for _, f in floors], marker="_", s=900, linewidths=3,
                       color="dimgray", zorder=5, label="shuffled layout")
        # a control without a value (NaN: e.g. PiM when nothing was detected) draws nothing: NaN markers also break
        # the legend's placement in matplotlib
        ceiling = (real or {}).get(m)
        ceiling = None if ceiling is None or np.isnan(ceiling) else ceiling
        if ceiling is not None:
            ax.axhline(ceiling, color="crimson", ls="--", lw=1.5, label="real images")
        key = (real_per_row or {}).get(m, f"{m}_{{row}}")
        per_row = [(i, real[key.format(row=n)]) for i, n in enumerate(names) if real and key.format(row=n) in real]
        per_row = [(i, v) for i, v in per_row if v is not None and not np.isnan(v)]
        if per_row:  # a ceiling per setting (PiM_point, PiM_scribble)
            ax.scatter([i for i, _ in per_row], [v for _, v in per_row], marker="_", s=900, linewidths=3,
                       color="crimson", zorder=5, label="real images")
        if chance and m == "attr_acc":
            for k, (attr, c) in enumerate(chance.items()):
                ax.axhline(c, color="darkorange", ls=":", lw=1.5, label="chance" if k == 0 else None)
        if floors or per_row or ceiling is not None or (chance and m == "attr_acc"):
            ax.legend(fontsize=10)
        ax.set_title(m)
        ax.tick_params(axis="x", rotation=30, labelsize=11)
    fig.suptitle(title, fontsize=14)
    fig.tight_layout()
    return _save(run, fig, name)


def ablation_figure(run: NotebookRun, rows: dict[str, dict], groups: dict[str, list[str]], metrics: Sequence[str],
                    label: str, name: str = "groups", floor: dict | None = None,
                    real: dict[str, float] | None = None) -> Image.Image:
    """One panel per (metric, ablated field): mean and 95% CI over seeds for each value of the field; the base
    configuration's shuffled-layout floor (``floor``: the aggregated shuffled rows, its ``base`` row is drawn) in grey
    and the real-image ceiling (``real``: metric -> value) in red, as dashed lines."""
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
            low = (floor or {}).get("base", {}).get("metrics", {}).get(m, {}).get("mean")
            lines = [(v, c, lab) for v, c, lab in ((low, "dimgray", "shuffled layout (base)"),
                                                    ((real or {}).get(m), "crimson", "real images"))
                     if v is not None and not np.isnan(v)]
            for v, c, lab in lines:
                ax.axhline(v, color=c, ls="--", lw=1.2, label=lab)
            if lines and j == 0:
                ax.legend(fontsize=8)
            ax.set_xticks(range(len(xs)), xs)
            ax.set_title(f"{g}" if i == 0 else "")
            ax.set_ylabel(m if j == 0 else "")
    fig.suptitle(f"{label}: ablations (mean and 95% CI over seeds)")
    fig.tight_layout()
    return _save(run, fig, name)


def instance_count_figure(run: NotebookRun, counts: dict[str, dict], label: str,
                          name: str = "instance_count") -> Image.Image:
    """Per-image mask IoU of the base configuration by the number of instances in the layout."""
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
    return _save(run, fig, name)


def placement_figure(run: NotebookRun, images: Sequence[Path], records: list[dict], ids: Sequence[str], n: int,
                     name: str = "placement") -> Image.Image | None:
    """Generated images of the extension with the planned boxes (green, with the IoU) and the detected box of the
    same instance (red)."""
    from PIL import ImageDraw

    cells = []
    for path, image_id in list(zip(images, ids))[:n]:
        img = _open(path)
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
    return _save(run, image_grid(cells, ncols=min(3, len(cells))), name) if cells else None
