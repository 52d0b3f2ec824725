"""The notebooks' steps: the shuffled-layout control, resumable generation and scoring steps, what the figures draw,
the tables, and the blog's control rows and links."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from instdiff_lib.datasets.shapes import make_shapes_dataset
from instdiff_lib.evaluation.experiments import Generated, RunRecord, Variant, score_runs
from instdiff_lib.evaluation.scoring import score_setting
from instdiff_lib.layouts.layout import Instance, Layout, grounding_arrays
from instdiff_lib.report.runner import NOTEBOOKS, notebook_path
from instdiff_lib.weights.embedded import models_dir

YOLO = models_dir() / "shapes-yolo" / "shapes_yolo.pt"
SHAPES_KW = {"imgsz": 64, "class_map": "index+1", "phrase_source": "annotation"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 12, seed=5, size=64)


def _real_as_generated(shapes, dst: Path, setting: str = "box") -> Path:
    """A folder with a valid manifest whose 'generated' images are the real ones: a model that follows its layouts
    perfectly. (Scored without ``real_image_dir``, so the real-copy guard does not refuse it.)"""
    dst.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in sorted(shapes.image_dir.glob("*.png")):
        shutil.copy(p, dst / p.name)
        rows.append({"image_id": int(p.stem), "file": p.name, "seed": 0, "config_hash": "x", "setting": setting,
                     "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    (dst / "manifest-000-of-001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_shuffled_layout_drops_a_perfect_model_to_the_floor(shapes, tmp_path):
    """The same images against their own layouts vs another image's: box AP50 and mask IoU fall, PiM too."""
    from instdiff_lib.evaluation.metrics.detection import load_yolo

    folder = _real_as_generated(shapes, tmp_path / "box")
    yolo = load_yolo(YOLO)
    own = score_setting("box", instances_json=shapes.instances_json, images_dir=folder, yolo=yolo, progress=False,
                        **SHAPES_KW)
    shuffled = score_setting("box", instances_json=shapes.instances_json, images_dir=folder, yolo=yolo,
                             progress=False, shuffle=1, **SHAPES_KW)
    assert shuffled["n_images"] == own["n_images"] == 12 and "shuffled-layout control" in shuffled["source"]
    ap_own, ap_shuf = own["metrics"]["box"]["values"]["AP50"], shuffled["metrics"]["box"]["values"]["AP50"]
    assert ap_own > 0.3 and ap_shuf < 0.5 * ap_own, (ap_own, ap_shuf)
    iou_own, iou_shuf = own["metrics"]["mask_iou"]["values"]["IoU"], shuffled["metrics"]["mask_iou"]["values"]["IoU"]
    assert iou_shuf < 0.6 * iou_own, (iou_own, iou_shuf)
    # image k is scored as image k+1: the per-image keys are the shifted ids, over the same set of ids
    assert set(shuffled["metrics"]["mask_iou"]["per_image"]) == set(own["metrics"]["mask_iou"]["per_image"])

    point = _real_as_generated(shapes, tmp_path / "point", "point")
    own = score_setting("point", instances_json=shapes.instances_json, images_dir=point, yolo=yolo, progress=False,
                        **SHAPES_KW)["metrics"]["pim"]["values"]["PiM"]
    shuf = score_setting("point", instances_json=shapes.instances_json, images_dir=point, yolo=yolo, progress=False,
                         shuffle=3, **SHAPES_KW)["metrics"]["pim"]["values"]["PiM"]
    assert shuf < own, (own, shuf)


def test_shuffle_needs_another_image(shapes, tmp_path):
    folder = _real_as_generated(shapes, tmp_path / "box")
    for shuffle, limit in ((1, 1), (12, None), (4, 4)):
        with pytest.raises(ValueError, match="another image's layout"):
            score_setting("box", instances_json=shapes.instances_json, images_dir=folder, yolo=YOLO, limit=limit,
                          progress=False, shuffle=shuffle, **SHAPES_KW)


def test_shuffled_attributes_fall_towards_chance(shapes, tmp_path):
    from instdiff_lib.evaluation.shapes_evaluators import SHAPES_ATTRIBUTE_VOCAB, load_shapes_clip

    folder = _real_as_generated(shapes, tmp_path / "color", "color")
    clip = load_shapes_clip(models_dir() / "shapes-clip")
    kw = dict(instances_json=shapes.instances_json, captions_json=shapes.captions_json, images_dir=folder, clip=clip,
              attribute_vocab=SHAPES_ATTRIBUTE_VOCAB["color"], progress=False, phrase_source="annotation")
    own = score_setting("color", **kw)["metrics"]["attribute"]["values"]["acc"]
    shuf = score_setting("color", shuffle=1, **kw)["metrics"]["attribute"]["values"]["acc"]
    assert own > 0.7 and shuf < own - 0.3, (own, shuf)


class _CountingWorld:
    """Just enough of a World for score_runs: counts the scoring calls."""

    def __init__(self):
        self.calls = []

    def score(self, setting, folder, *, limit, fid, progress, shuffle, images_setting):
        self.calls.append((setting, folder, limit, shuffle, images_setting))
        return {"n_images": limit, "metrics": {"box": {"values": {"AP": 0.1, "AP50": 0.2, "AR100": 0.3}},
                                               "mask_iou": {"values": {"IoU": 0.4}, "per_image": {"1": 0.4}}}}


def test_score_runs_scores_a_shared_folder_once():
    base = Variant("base", "mask", steps=5)
    same = Variant("mis=0.36", "mask", steps=5)
    other = Variant("mis=0.0", "mask", steps=5, mis=0.0)
    gens = [Generated(base, 0, "f/base", 3, 0, 1.0), Generated(same, 0, "f/base", 0, 3, 0.0),
            Generated(other, 0, "f/other", 3, 0, 1.0)]
    world = _CountingWorld()
    records = score_runs(world, gens, 3, shuffle=2, progress=False)
    assert [c[1] for c in world.calls] == ["f/base", "f/other"] and all(c[3] == 2 for c in world.calls)
    assert [r.variant.name for r in records] == ["base", "mis=0.36", "mis=0.0"]
    assert records[1].metrics == {"box_AP": 0.1, "box_AP50": 0.2, "box_AR": 0.3, "mask_IoU": 0.4}
    assert records[1].n_reused == 3 and records[0].per_image == {"1": 0.4}
    # one folder for two settings (an ablation's drop=box row on the box setting's images): scored once per setting
    world = _CountingWorld()
    box, box_only = Variant("box", "box", steps=5), Variant("drop=box", "mask", steps=5, drop="box")
    score_runs(world, [Generated(box, 0, "f/box", 3, 0, 1.0), Generated(box_only, 0, "f/box", 0, 3, 0.0)], 3,
               progress=False)
    assert [(c[0], c[1], c[4]) for c in world.calls] == [("box", "f/box", "box"), ("mask", "f/box", "box")]


def _layout() -> Layout:
    mask = np.zeros((64, 64), bool)
    mask[10:30, 40:60] = True  # x (columns) 40..59, y (rows) 10..29
    return Layout("a scene", 64, 64, [Instance("a red square", mask=mask), Instance("a dot", box=(0.1, 0.6, 0.3, 0.9))])


def test_fed_layout_keeps_only_the_fed_modalities():
    from instdiff_lib.model.config import DropFlags
    from instdiff_lib.viz import fed_layout

    layout = _layout()
    arrays = grounding_arrays(layout, seed=7, seg_size=8)
    point_only = fed_layout(layout, DropFlags.preset("point"), seed=7)
    for inst, k in zip(point_only.instances, range(2)):
        assert inst.box is None and inst.mask is None and inst.scribble is None
        assert inst.point == pytest.approx(tuple(arrays["points"][k]))
    assert point_only.instances[0].point == pytest.approx((0.78125, 0.3125))  # the mask's box centre, x = column
    box = fed_layout(layout, DropFlags.preset("box"), seed=7).instances[0]
    assert box.box == layout.instances[0].box and box.mask is None and box.scribble is None
    everything = fed_layout(layout, DropFlags.preset("all"), seed=7)
    assert everything.instances[0].mask is not None
    assert np.allclose(everything.instances[0].scribble.reshape(-1), arrays["scribbles"][0])
    assert everything.instances[1].scribble is None  # no mask: nothing to draw a scribble from


def test_draw_detections_draws_only_confident_detections():
    from instdiff_lib.evaluation.metrics.detection import rle_encode
    from instdiff_lib.viz import draw_detections

    image = Image.new("RGB", (64, 64), (200, 200, 200))
    mask = np.zeros((1, 64, 64), np.uint8)
    mask[0, 8:24, 32:56] = 1
    det = {"image_id": 1, "bbox": [32, 8, 24, 16], "score": 0.9, "category_id": 1,
           "segmentation": rle_encode(mask)[0]}
    drawn = np.asarray(draw_detections(image, [det], size=128, names={1: "square"}))
    plain = np.asarray(draw_detections(image, [{**det, "score": 0.1}], size=128))
    assert (plain == 200).all()  # below min_score: nothing drawn
    assert (drawn[40, 90] != 200).any()  # inside the mask (row 20, column 45 at 64 px): tinted
    assert (drawn[110, 10] == 200).all()  # far from it: untouched


def test_titled_grid_checks_its_titles():
    from instdiff_lib.viz import titled_grid

    grid = titled_grid([Image.new("RGB", (64, 64))] * 3, ["a", "b\nc", "d"], ncols=2, size=96)
    assert grid.width == 2 * 96 and grid.height > 2 * 96
    with pytest.raises(ValueError, match="3 images but 2 titles"):
        titled_grid([Image.new("RGB", (8, 8))] * 3, ["a", "b"], ncols=2)


def test_attribute_binding_reports_each_crop():
    from instdiff_lib.evaluation.metrics.clip_metrics import AttributeItem, attribute_binding, tiny_clip

    items = [AttributeItem(1, 64, 64, [[0, 0, 32, 32], [32, 32, 32, 32]], ["red a", "blue b"], ["red", "blue"]),
             AttributeItem(2, 64, 64, [[8, 8, 16, 16]], ["green c"], ["green"])]
    images = {1: Image.new("RGB", (64, 64), "red"), 2: Image.new("RGB", (64, 64), "green")}
    r = attribute_binding(items, images, tiny_clip(), per_image=True)
    crops = r.details["per_crop"]
    assert len(crops) == r.n_evaluated == 3
    assert [(c["image_id"], c["instance"], c["attribute"]) for c in crops] == [(1, 0, "red"), (1, 1, "blue"),
                                                                              (2, 0, "green")]
    acc = np.mean([np.mean([c["predicted"] == c["attribute"] for c in crops if c["image_id"] == i]) for i in (1, 2)])
    assert acc == pytest.approx(r.values["acc"])


def _rows(values):
    from instdiff_lib.evaluation.experiments import ci95

    return {"metrics": {k: ci95(v) for k, v in values.items()}, "n_evaluated": 32, "n_images_per_seed": 16,
            "seeds": [0, 1], "variant": {}, "gen_seconds": 1.0, "n_generated": 32}


def test_summary_table_and_blog_show_the_floor(tmp_path, monkeypatch):
    from instdiff_lib.report.blog import render_blog
    from instdiff_lib.report.tables import summary_table
    from instdiff_lib.results import write_results

    rows = {"color": _rows({"attr_acc": [0.5, 0.7]})}
    floor = {"color": _rows({"attr_acc": [0.12, 0.14]})}
    table = summary_table(rows, ["attr_acc"], floor=floor, chance={"color": 0.125},
                          real={"metrics": {"color_acc": 0.93}, "n_images": 16}, real_per_row={"attr_acc": "{row}_acc"})
    assert list(table.index) == ["color", "color · shuffled layout (floor)", "color · chance",
                                 "color · real images (ceiling)"]
    assert table.loc["color · real images (ceiling)", "attr_acc"] == "93.0"
    assert table.loc["color · shuffled layout (floor)", "attr_acc"].startswith("13.0 ±")
    assert table.loc["color · chance", "attr_acc"] == "12.5"

    res = tmp_path / "results"
    monkeypatch.setenv("INSTDIFF_RESULTS_DIR", str(res))
    doc = {"world": "Shapes (mini scale)", "rows": rows, "shuffled": floor, "chance": {"color": 0.125},
           "real": {"metrics": {"color_acc": 0.93}, "n_images": 16}}
    write_results(res / "11_attribute_binding.json", doc, params={"SMOKE": True}, n_evaluated=32, profile="smoke",
                  extra={"notebook": "11_attribute_binding"})
    text = render_blog(tmp_path / "blog.md", res)[0].read_text()
    floor_line = next(l for l in text.splitlines() if l.startswith("| color · shuffled layout (floor) |"))
    assert "13.0 ±" in floor_line
    assert "| color · chance | 12.5 |" in text
    assert "| color · real images (upper bound) | 93.0 |" in text
    assert "(outputs/report/smoke/11_attribute_binding.html)" in text

    write_results(res / "11_attribute_binding.json", doc, params={"SMOKE": False}, n_evaluated=32, profile="full",
                  extra={"notebook": "11_attribute_binding"})
    text = render_blog(tmp_path / "blog.md", res)[0].read_text()
    assert "floor, chance and ceiling (COCO, full profile)" in text and "| color · chance | 12.5 |" in text


@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if n != "99_blogpost"])
def test_report_notebooks_walk_through_their_steps(name):
    """At least 8 code cells, markdown between the steps, and no cell that calls more than a few library functions."""
    import ast

    nb = nbformat.read(notebook_path(name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 8, f"{name}: {len(code)} code cells"
    kinds = "".join("c" if c.cell_type == "code" else "m" for c in nb.cells)
    assert kinds.startswith("m") and "cccc" not in kinds, f"{name}: steps without narrative between them ({kinds})"
    for c in code[2:]:
        calls = [n for n in ast.walk(ast.parse(c.source)) if isinstance(n, ast.Call)]
        assert len(calls) <= 4, f"{name}: a cell with {len(calls)} calls: {c.source[:80]!r}"


class _FigureRun:
    """A stand-in for NotebookRun.figure: saves the PNG and keeps the matplotlib figure to read its artists."""

    def __init__(self, folder: Path):
        self.folder, self.figs = folder, []

    def figure(self, obj, name):
        self.figs.append(obj)
        path = self.folder / f"{name}.png"
        obj.savefig(path)
        return path


def _stat(mean):
    return {"mean": mean, "ci95": 0.02}


def test_ablation_figure_draws_the_floor_and_ceiling_of_each_metric(tmp_path):
    from instdiff_lib.report.figures import ablation_figure

    rows = {"alpha=0.0": {"metrics": {"box_AP50": _stat(0.02), "mask_IoU": _stat(0.1)}},
            "alpha=1.0": {"metrics": {"box_AP50": _stat(0.3), "mask_IoU": _stat(0.5)}}}
    floor = {"base": {"metrics": {"box_AP50": _stat(0.04), "mask_IoU": _stat(0.12)}}}
    real = {"box_AP50": 0.81, "mask_IoU": 0.73}
    run = _FigureRun(tmp_path)
    ablation_figure(run, rows, {"alpha": list(rows)}, ["box_AP50", "mask_IoU"], "Shapes", floor=floor, real=real)
    axes = run.figs[0].axes
    hlines = [sorted({round(float(ln.get_ydata()[0]), 6) for ln in ax.lines if len(set(ln.get_ydata())) == 1})
              for ax in axes]
    assert hlines == [[0.04, 0.81], [0.12, 0.73]]  # each metric its own floor and ceiling, not another's
    run2 = _FigureRun(tmp_path)
    ablation_figure(run2, rows, {"alpha": list(rows)}, ["box_AP50"], "Shapes")
    assert all(len(set(ln.get_ydata())) > 1 for ln in run2.figs[0].axes[0].lines)  # no controls given: none drawn


def test_attribute_figure_marks_each_rows_real_crop_ceiling(tmp_path):
    from instdiff_lib.report.figures import metrics_figure

    rows = {"color": {"metrics": {"attr_acc": _stat(0.9)}}, "texture": {"metrics": {"attr_acc": _stat(0.6)}}}
    run = _FigureRun(tmp_path)
    metrics_figure(run, rows, ["attr_acc"], "t", real={"color_acc": 1.0, "texture_acc": 0.93},
                   real_per_row={"attr_acc": "{row}_acc"}, chance={"color": 0.125, "texture": 0.25})
    ax = run.figs[0].axes[0]
    marks = [tuple(np.round(o, 6)) for c in ax.collections for o in c.get_offsets()]
    assert (0.0, 1.0) in marks and (1.0, 0.93) in marks  # color's ceiling over bar 0, texture's over bar 1
    assert "real images" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_metrics_figure_draws_controls_that_have_no_value_as_nothing(tmp_path):
    """A rehearsal with random weights scores PiM as NaN (nothing detected) for the rows and for the real images: the
    figure is still drawn (NaN markers made matplotlib's legend placement raise), without a NaN ceiling."""
    from instdiff_lib.report.figures import metrics_figure

    nan = float("nan")
    rows = {"box": {"metrics": {"box_AP50": _stat(0.0)}}, "point": {"metrics": {"PiM": _stat(nan)}},
            "scribble": {"metrics": {"PiM": _stat(nan)}}}
    run = _FigureRun(tmp_path)
    metrics_figure(run, rows, ["box_AP50", "PiM"], "t", real={"box_AP50": nan, "PiM_point": nan, "PiM_scribble": 0.4})
    box_ax, pim_ax = run.figs[0].axes
    assert "real images" not in [ln.get_label() for ln in box_ax.lines]  # no ceiling line at NaN
    marks = [tuple(np.round(o, 6)) for c in pim_ax.collections if c.get_label() == "real images"
             for o in c.get_offsets()]
    assert marks == [(1.0, 0.4)]  # scribble's ceiling only


def test_shuffled_floor_with_one_image_is_left_out_not_an_error(capsys):
    """With one image per folder there is no other layout to score against: no floor rows (a rehearsal runs 1 image),
    and the steps after it take the empty floor."""
    from instdiff_lib.evaluation.experiments import aggregate

    g = Generated(Variant("base", "mask"), 0, "/nonexistent", 1, 0, 1.0)
    assert score_runs(None, [g], 1, shuffle=1, progress=False) == []  # never opens the folder nor the world
    assert "needs at least 2 images" in capsys.readouterr().out
    assert aggregate([]) == {}
    from instdiff_lib.report.tables import per_seed_table

    assert per_seed_table([], ["box_AP50"]).empty  # the notebook's table of the (absent) floor
