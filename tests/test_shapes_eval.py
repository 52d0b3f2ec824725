"""The Shapes mini world end to end: evaluators' data and losses, the planner/detector adapters, the protocol switch,
v-prediction, and the committed checkpoints (they load, verify and generate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from instdiff_lib.datasets.coco import protocol_items
from instdiff_lib.datasets.shapes import COLORS, SHAPES, make_shapes_dataset
from instdiff_lib.evaluation.shapes_evaluators import ZERO_SHOT
from instdiff_lib.extension.shapes import ShapesPlanner
from instdiff_lib.training.evaluators import export_yolo_seg, mask_polygon, multi_positive_clip_loss
from instdiff_lib.weights.embedded import models_dir


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 6, seed=3)


def test_mask_polygon_square():
    m = np.zeros((20, 20), bool)
    m[5:10, 2:8] = True
    poly = mask_polygon(m)
    assert poly[:, 0].min() == 2 and poly[:, 0].max() == 7 and poly[:, 1].min() == 5 and poly[:, 1].max() == 9
    assert mask_polygon(np.zeros((4, 4), bool)) is None


def test_export_yolo_seg_labels(split, tmp_path):
    yaml = export_yolo_seg({"train": split, "val": split}, tmp_path / "y")
    inst = json.loads(split.instances_json.read_text())
    first = inst["images"][0]
    anns = [a for a in inst["annotations"] if a["image_id"] == first["id"]]
    lines = (tmp_path / "y" / "labels" / "train" / (first["file_name"].rsplit(".", 1)[0] + ".txt")).read_text().split("\n")
    lines = [l for l in lines if l]
    assert len(lines) == len(anns)
    for line, a in zip(lines, anns):
        vals = line.split()
        assert int(vals[0]) == a["category_id"] - 1  # class k = category k + 1
        xy = np.array(vals[1:], float).reshape(-1, 2) * 64
        x, y, w, h = a["bbox"]
        # the polygon lies on the visible mask's outline: inside its box (pixel-corner coordinates, +-1)
        assert xy[:, 0].min() >= x - 1 and xy[:, 0].max() <= x + w and xy[:, 1].min() >= y - 1 and xy[:, 1].max() <= y + h
    assert "names:" in yaml.read_text() and SHAPES[0] in yaml.read_text()


def test_multi_positive_loss():
    torch.manual_seed(0)
    txt = torch.randn(3, 8)
    index = torch.tensor([0, 0, 1, 2])
    aligned = multi_positive_clip_loss(txt[index] * 5, txt, index, torch.tensor(10.0))
    shuffled = multi_positive_clip_loss(txt[torch.tensor([2, 1, 0, 0])] * 5, txt, index, torch.tensor(10.0))
    assert torch.isfinite(aligned) and aligned < shuffled


def test_zero_shot_template_is_the_metric_prompt():
    from instdiff_lib.evaluation.metrics.clip_metrics import PROMPT

    assert ZERO_SHOT == PROMPT


def test_protocol_phrase_source_annotation(split):
    inst = json.loads(split.instances_json.read_text())
    items = protocol_items(split.instances_json, split.captions_json, attribute="color", phrase_source="annotation")
    a0 = [a for a in inst["annotations"] if a["image_id"] == items[0].image_id]
    assert items[0].phrases == [a["caption"] for a in a0]
    assert items[0].attributes == [a["color"] for a in a0]  # the drawn colour, not COLORS[ann_id % 8]
    caps = json.loads(split.captions_json.read_text())["annotations"]
    assert items[0].prompt == caps[0]["caption"]
    official = protocol_items(split.instances_json, split.captions_json, attribute="color")
    assert official[0].attributes == [COLORS[a["id"] % 8] for a in a0]
    with pytest.raises(ValueError):
        protocol_items(split.instances_json, None, phrase_source="nope")


def test_shapes_planner_parses_and_is_deterministic():
    p = ShapesPlanner(seed=1)
    a = p.plan("a red striped circle and a blue square", seed=4)
    b = p.plan("a red striped circle and a blue square", seed=4)
    caps = [i.caption for i in a.layout.instances]
    assert caps[0] == "a red striped circle" and caps[1].startswith("a blue ") and caps[1].endswith(" square")
    assert caps == [i.caption for i in b.layout.instances]
    assert a.planner_label == "offline-shapes-template"
    for inst in a.layout.instances:
        x0, y0, x1, y1 = inst.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def test_v_prediction_sampler_conversion():
    """An oracle v-model (v = sqrt(a) eps - sqrt(1-a) x0) is turned into the exact eps by the sampler."""
    from instdiff_lib.model.config import ScheduleConfig
    from instdiff_lib.sampling.sampler import Sampler, alphas_cumprod

    cfg = ScheduleConfig(prediction_type="v_prediction")
    acp = alphas_cumprod(cfg)
    x0, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = 700
    a = acp[t]
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    s = Sampler.__new__(Sampler)
    s.schedule_cfg = cfg
    assert torch.allclose(s._as_eps(v, x, t), eps, atol=1e-5)
    s.schedule_cfg = ScheduleConfig()
    assert s._as_eps(v, x, t) is v
    with pytest.raises(ValueError):
        ScheduleConfig(prediction_type="x0")


# ---- the committed checkpoints ------------------------------------------------------------------------------
needs_models = pytest.mark.skipif(not (models_dir() / "shapes-mini" / "manifest.json").exists(),
                                  reason="committed Shapes weights not present")


@needs_models
def test_committed_mini_model_loads_and_generates():
    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline
    from instdiff_lib.layouts.layout import Instance, Layout

    pipe = InstanceDiffusionPipeline.from_pretrained(str(models_dir() / "shapes-mini"))  # sha256-verified
    assert pipe.cfg.name == "shapes-mini" and pipe.cfg.schedule.prediction_type == "v_prediction"
    layout = Layout.from_json(models_dir().parent / "layouts" / "shapes" / "boxes.json")
    moved = Layout(layout.caption, layout.width, layout.height,
                   [Instance(i.caption, box=(i.box[0] + 0.3, i.box[1], i.box[2] + 0.3, i.box[3])) if k == 0 else i
                    for k, i in enumerate(layout.instances)])
    kw = dict(seed=0, steps=4, guidance=5.0, negative_prompt="", drop="box", mis=0.0, progress=False)
    out = pipe(layout, **kw)
    assert np.asarray(out.images[0]).shape == (64, 64, 3)
    # grounded: moving one box (same captions, same noise) changes the result; without the fusers (alpha 0) it
    # cannot, so the change comes from the layout tokens, not from anything else the two runs differ in
    change = (pipe(moved, **kw).latents - out.latents).abs().max()
    assert change > 1e-2, float(change)
    torch.testing.assert_close(pipe(moved, alpha=0.0, **kw).latents, pipe(layout, alpha=0.0, **kw).latents,
                               rtol=0, atol=0)
    summary = json.loads((models_dir() / "shapes-mini" / "summary.json").read_text())
    assert summary["export"]["bytes"] <= 20 * 2**20 and summary["train_config"]["data_seed"] == 0


@pytest.mark.skipif(not (models_dir() / "shapes-clip" / "shapes_clip.pt").exists(), reason="no committed CLIP")
def test_committed_clip_loads_and_separates_colours():
    from instdiff_lib.evaluation.shapes_evaluators import load_shapes_clip

    clip = load_shapes_clip(models_dir() / "shapes-clip")
    with torch.no_grad():
        t = clip.model.encode_text(clip.tokenizer([ZERO_SHOT.format(c) for c in COLORS]))
    t = torch.nn.functional.normalize(t.float(), dim=-1)
    off_diag = (t @ t.T)[~torch.eye(len(COLORS), dtype=bool)]
    assert off_diag.max() < 0.99  # trained: the colour prompts are distinct


@pytest.mark.skipif(not (models_dir() / "shapes-yolo" / "shapes_yolo.pt").exists(), reason="no committed YOLO")
def test_committed_yolo_loads_with_shapes_classes():
    from instdiff_lib.evaluation.shapes_evaluators import load_shapes_yolo

    yolo = load_shapes_yolo(models_dir() / "shapes-yolo")
    assert [yolo.names[k] for k in range(len(yolo.names))] == SHAPES


def test_corrupt_evaluator_weights_are_refused(tmp_path):
    from instdiff_lib.evaluation.shapes_evaluators import _check_sha

    w = tmp_path / "w.pt"
    w.write_bytes(b"abc")
    (tmp_path / "s.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(RuntimeError, match="sha256"):
        _check_sha(w, tmp_path / "s.json")
    with pytest.raises(FileNotFoundError, match="train it"):
        _check_sha(tmp_path / "missing.pt", tmp_path / "s.json")
