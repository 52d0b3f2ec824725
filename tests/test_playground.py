"""The playground's library: drawing and editing with pointer events, bad input as messages, save/load as official
demo JSON, and Generate = ``instdiff generate`` on the saved file (same image). The browser test drives the same code
through JupyterLab (tests/test_playground_browser.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instdiff_lib.layouts import Layout
from instdiff_lib.layouts.derive import box_from_mask
from instdiff_lib.playground import Editor, PlaygroundError, Session, Settings, layout_files


def new(ed: Editor, tool: str, caption: str) -> None:
    """Caption first, then draw: deselect (the caption field edits the selected instance), pick the tool."""
    ed.select(None)
    ed.set_tool(tool)
    ed.set_caption(caption)


def drag(ed: Editor, a, b, steps: int = 4) -> None:
    ed.press(*a)
    for k in range(1, steps + 1):
        ed.drag_to(a[0] + (b[0] - a[0]) * k / steps, a[1] + (b[1] - a[1]) * k / steps)
    ed.release(*b)


def click(ed: Editor, p) -> None:
    ed.press(*p)
    ed.release(*p)


def draw_scene(ed: Editor) -> None:
    """A box, a painted mask and a scribble, each captioned."""
    new(ed, "box", "a red solid circle")
    drag(ed, (0.05, 0.05), (0.45, 0.45))
    new(ed, "paint", "a blue striped square")
    drag(ed, (0.6, 0.6), (0.85, 0.8))
    new(ed, "scribble", "a yellow dotted star")
    drag(ed, (0.1, 0.8), (0.4, 0.95))


# ---- drawing ------------------------------------------------------------------------------------------------------
def test_box_point_scribble_are_snapped_to_the_frame():
    ed = Editor(64, 64)
    ed.set_caption("a red solid circle")
    drag(ed, (0.30, 0.40), (0.05, 0.10))  # dragged up-left: corners are ordered
    assert ed.instances[0].box == (3 / 64, 6 / 64, 19 / 64, 26 / 64)  # round(0.05*64)=3, round(0.1*64)=6, ...
    assert ed.selected == 0 and ed.instances[0].caption == "a red solid circle"
    new(ed, "point", "a blue solid star")
    click(ed, (0.5, 0.52))
    assert ed.instances[1].point == (32 / 64, 33 / 64) and ed.instances[1].box is None
    new(ed, "scribble", "a green solid cross")
    drag(ed, (0.1, 0.9), (0.4, 0.9))
    assert [i.caption for i in ed.instances] == ["a red solid circle", "a blue solid star", "a green solid cross"]
    s = ed.instances[2].scribble
    assert s.shape[1] == 2 and len(s) >= 3 and np.all(s[:, 1] == round(0.9 * 64) / 64)
    layout = ed.layout("scene")
    assert layout.validate() is layout
    doc = layout.to_json()
    assert doc["annos"][0]["bbox"] == [3, 6, 16, 20] and doc["annos"][1]["point"] == [32, 33]


def test_polygon_and_paint_make_masks():
    ed = Editor(64, 64)
    ed.set_tool("polygon")
    ed.set_caption("a green solid triangle")
    for p in ((0.5, 0.1), (0.9, 0.8), (0.1, 0.8)):
        click(ed, p)
    assert not ed.instances and len(ed.polygon) == 3
    click(ed, (0.505, 0.105))  # the first vertex again closes it
    m = ed.instances[0].mask
    assert m.shape == (64, 64) and m[40, 32] and not m[5, 5]
    assert ed.instances[0].box == pytest.approx((6 / 64, 6 / 64, 58 / 64, 52 / 64), abs=1.5 / 64)
    ed.set_tool("paint")
    ed.select(None)
    drag(ed, (0.1, 0.1), (0.2, 0.1))  # a new painted instance
    assert len(ed.instances) == 2 and ed.instances[1].mask[6, 9] and ed.instances[1].box is not None
    before = ed.instances[1].mask.sum()
    drag(ed, (0.2, 0.3), (0.3, 0.3))  # paints into the selected instance
    assert len(ed.instances) == 2 and ed.instances[1].mask.sum() > before
    ed.set_tool("polygon")
    click(ed, (0.1, 0.1))
    assert not ed.finish() and "at least 3 vertices" in ed.message


def test_select_move_resize_delete():
    ed = Editor(64, 64)
    drag(ed, (0.25, 0.25), (0.5, 0.5))
    ed.set_tool("paint")
    drag(ed, (0.75, 0.75), (0.8, 0.8))
    ed.set_tool("select")
    click(ed, (0.9, 0.1))
    assert ed.selected is None  # nothing there
    drag(ed, (0.3, 0.3), (0.4, 0.45))  # pixels 19 -> 26 and 19 -> 29 of the 64 px frame
    assert ed.instances[0].box == pytest.approx((0.25 + 7 / 64, 0.25 + 10 / 64, 0.5 + 7 / 64, 0.5 + 10 / 64))
    drag(ed, (0.4, 0.45), (-2.0, -2.0))  # far outside: it stops at the canvas edge
    assert ed.instances[0].box[:2] == (0.0, 0.0) and ed.instances[0].box[2] == pytest.approx(0.25)
    # resize: drag the bottom-right corner
    drag(ed, (0.25, 0.25), (0.5, 0.375))
    assert ed.instances[0].box == (0.0, 0.0, 0.5, 0.375)
    drag(ed, (0.5, 0.375), (0.0, 0.2))  # to zero width: refused, the last valid size stays
    assert "needs an area" in ed.message and ed.instances[0].box[2] > 0
    # the painted mask moves with its instance, pixel for pixel
    mask = ed.instances[1].mask.copy()
    drag(ed, (0.78, 0.78), (0.78 - 10 / 64, 0.78 - 5 / 64))
    assert np.array_equal(ed.instances[1].mask, np.roll(mask, (-5, -10), axis=(0, 1)))
    assert ed.instances[1].box == pytest.approx(tuple(np.add(box_from_mask(mask), (-10 / 64, -5 / 64, -10 / 64, -5 / 64))))
    assert ed.delete() and len(ed.instances) == 1 and ed.selected is None
    assert not ed.delete() and "select an instance" in ed.message


def test_resize_stretches_points_and_masks_with_the_box():
    ed = Editor(64, 64)
    ed.set_tool("polygon")
    for p in ((0.25, 0.25), (0.5, 0.25), (0.5, 0.5), (0.25, 0.5)):
        click(ed, p)
    assert ed.finish()
    area = ed.instances[0].mask.sum()
    ed.set_tool("select")
    box = ed.instances[0].box
    click(ed, (0.3, 0.3))
    drag(ed, (box[2], box[3]), (box[2] + (box[2] - box[0]), box[3]))  # twice as wide
    assert ed.instances[0].mask.sum() == pytest.approx(2 * area, rel=0.1)
    assert ed.instances[0].box[2] - ed.instances[0].box[0] == pytest.approx(2 * (box[2] - box[0]))


# ---- bad input: a message, not a traceback ------------------------------------------------------------------------
def test_zero_area_box_and_31st_instance_are_refused_with_a_message():
    ed = Editor(64, 64)
    click(ed, (0.5, 0.5))  # the box tool, clicked without dragging
    assert not ed.instances and "needs an area" in ed.message and "0 x 0 pixels" in ed.message
    drag(ed, (0.1, 0.1), (0.1, 0.6))  # a line, no area
    assert not ed.instances and "0 x 32 pixels" in ed.message
    ed.set_tool("point")
    for k in range(30):
        click(ed, (0.02 + k * 0.03, 0.5))
    assert len(ed.instances) == 30 and ed.message == ""
    click(ed, (0.5, 0.9))
    assert len(ed.instances) == 30 and "30 instance slots" in ed.message


def test_session_names_bad_input(tmp_path):
    s = Session(out_dir=str(tmp_path))
    with pytest.raises(PlaygroundError, match="layout is empty"):
        s.layout()
    drag(s.editor, (0.1, 0.1), (0.4, 0.4))  # no caption typed
    with pytest.raises(PlaygroundError, match="instance 0: missing or empty caption"):
        s.generate(progress=False)
    many = {"caption": "x", "width": 64, "height": 64,
            "annos": [{"caption": f"shape {k}", "bbox": [k, k, 2, 2]} for k in range(31)]}
    (tmp_path / "many.json").write_text(json.dumps(many))
    with pytest.raises(PlaygroundError, match="31 instances but the model has only 30"):
        s.load(tmp_path / "many.json")
    assert len(s.editor.instances) == 1  # the drawing is kept
    s.editor.set_caption(" ".join(["a red solid circle"] * 20))
    with pytest.raises(PlaygroundError, match=r"instance 0: its caption is \d+ CLIP tokens, more than .* 77"):
        s.generate(progress=False)
    s.editor.set_caption("a red solid circle")
    s.caption = "a very long prompt " * 20
    with pytest.raises(PlaygroundError, match="the prompt is .* CLIP tokens"):
        s.generate(progress=False)
    s.settings.mis = 1.5
    with pytest.raises(PlaygroundError, match="mis is a fraction"):
        s.generate(progress=False)
    with pytest.raises(PlaygroundError, match="ends in .json"):
        s.save(tmp_path / "layout.txt")
    assert not list(tmp_path.glob("*.png"))  # nothing was generated


def test_app_shows_messages_not_tracebacks(tmp_path):
    pytest.importorskip("ipywidgets")
    from instdiff_lib.playground.app import App

    s = Session(out_dir=str(tmp_path))
    app = App(s)
    ev = lambda kind, x, y: app._on_mouse({"type": kind, "relativeX": x, "relativeY": y,  # noqa: E731
                                           "boundingRectWidth": 512, "boundingRectHeight": 512})
    ev("mousedown", 100, 100)
    ev("mouseup", 100, 100)  # a click with the box tool
    assert "needs an area" in app.message.value and not s.editor.instances
    ev("mousedown", 40, 40)
    ev("mousemove", 120, 100)
    ev("mouseup", 200, 180)
    assert app.instances.options == ("0: (no caption) [box]",) and app.instances.index == 0
    app.generate.click()  # empty caption
    assert "missing or empty caption" in app.message.value and not app.generate.disabled
    app.caption.value = "a red solid circle"
    assert s.editor.instances[0].caption == "a red solid circle"
    assert app.instances.options == ("0: a red solid circle [box]",)
    app.caption.value = "a red solid circle " * 20
    app.generate.click()
    assert "CLIP tokens" in app.message.value
    app.save_path.value = str(tmp_path / "x.txt")
    app.save.click()
    assert "ends in .json" in app.message.value
    app.load_file.value = "layouts/shapes/boxes.json"
    app.load.click()
    assert "loaded layouts/shapes/boxes.json: 3 instances" in app.message.value and len(app.instances.options) == 3
    assert app.prompt.value == s.caption and "light background" in s.caption
    app.tool.value = "select"
    ev("mousedown", 60, 60)  # inside the red circle's box
    assert app.instances.index == 0 and app.caption.value == "a red solid circle"
    app.delete.click()
    assert len(s.editor.instances) == 2
    assert "layouts/shapes/boxes.json" in layout_files() and "layouts/masks_street.json" in layout_files()


# ---- save, load, generate = instdiff generate ---------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    s = Session(out_dir=str(tmp_path))
    ed = s.editor
    draw_scene(ed)
    new(ed, "point", "a pink solid cross")
    click(ed, (0.8, 0.2))
    ed.set_caption("a pink checkered cross")  # typed after drawing: edits the instance just drawn
    path = s.save(tmp_path / "sub" / "drawn.json")
    doc = json.loads(path.read_text())
    assert Layout.from_json(path).to_json() == doc
    assert doc["caption"] == ("a red solid circle, a blue striped square, a yellow dotted star and a pink checkered "
                              "cross on a light background")
    s2 = Session(out_dir=str(tmp_path))
    s2.load(path)
    for a, b in zip(s.editor.instances, s2.editor.instances):
        assert a.caption == b.caption and a.box == pytest.approx(b.box) if a.box else b.box is None
        assert (a.mask is None) == (b.mask is None) and (a.mask is None or np.array_equal(a.mask, b.mask))
    assert s2.save(tmp_path / "again.json").read_text() == path.read_text()


@pytest.mark.slow
def test_generate_equals_instdiff_generate_on_the_saved_file(tmp_path):
    """The image of a drawn layout equals the image `instdiff generate` makes from the file Generate wrote, with the
    command line Generate shows (pixels and bytes)."""
    s = Session(out_dir=str(tmp_path / "pg"), settings=Settings(seed=7, steps=2, guidance=3.0, alpha=0.8, mis=0.5,
                                                                   drop="all", skip_mode="freeu"))
    ed = s.editor
    draw_scene(ed)
    assert [i.caption for i in ed.instances] == ["a red solid circle", "a blue striped square", "a yellow dotted star"]
    r = s.generate(progress=False)
    assert r.image_file.exists() and not r.reused
    assert s.pipeline().c.unet.skip_mode == "scaleu"  # the model's own mode is restored after a freeu run
    cmd = r.command()
    assert cmd[:3] == ["instdiff", "generate", str(r.layout_file)]
    other = tmp_path / "cli"
    cmd[cmd.index("--out") + 1] = str(other)
    cli = [str(Path(sys.executable).with_name("instdiff")), *cmd[1:]]
    # the same intra-op thread count as this process (an earlier test may have changed it): CPU kernels may sum in
    # another order with another count, and the comparison is bit for bit
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = other / r.image_file.name
    assert np.array_equal(np.asarray(Image.open(theirs)), np.asarray(Image.open(r.image_file)))
    assert theirs.read_bytes() == r.image_file.read_bytes()
    meta = json.loads((other / r.meta_file.name).read_text())
    assert meta["skip_mode"] == "freeu" and meta["seed"] == 7 and meta["steps"] == 2
    # the same drawing and settings again: reused, not regenerated; an edit with a kept seed: a new file
    again = s.generate(progress=False)
    assert again.reused and again.image_file == r.image_file
    ed.set_tool("select")
    drag(ed, (0.2, 0.2), (0.3, 0.2))
    s.settings.keep_seed = False  # the next Generate takes the next seed
    moved = s.generate(progress=False)
    assert moved.image_file != r.image_file and moved.settings.seed == 8 and r.image_file.exists()
    assert len(s.results) == 3 and Image.open(moved.image_file).size == (64, 64)
    assert r.panel(size=128).size == (3 * 128, 128)


@pytest.mark.slow
def test_headless_notebook_writes_the_example_figure(tmp_path, monkeypatch):
    """Under papermill (HEADLESS) the playground renders its layout and saves figures/02_playground__example.png."""
    from instdiff_lib.report.runner import run_notebook

    monkeypatch.setenv("INSTDIFF_FIGURES_DIR", str(tmp_path / "figures"))
    params = tmp_path / "p.yaml"
    params.write_text(f"SMOKE: true\nHEADLESS: true\nSTEPS: 2\nOUT_DIR: {json.dumps(str(tmp_path / 'pg'))}\n")
    executed = run_notebook("02_playground", "smoke", params, out_dir=tmp_path / "exec", html=False, progress=False)
    fig = tmp_path / "figures" / "02_playground__example.png"
    assert Image.open(fig).size == (3 * 256, 256)
    assert "instdiff generate" in executed.read_text()
    assert len(list((tmp_path / "pg").glob("layout-*__seed0__0.png"))) == 1
