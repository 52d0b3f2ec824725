"""Pipeline and text conditioning end to end on the tiny preset (random weights)."""

import json

import numpy as np
import pytest
import torch

from instdiff_lib.bench import synthetic_layout
from instdiff_lib.weights.checkpoint import build_components
from instdiff_lib.layouts.layout import Instance, Layout, LayoutError
from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline
from instdiff_lib.model.text import PromptTooLongError, clip_tokenizer


@pytest.fixture(scope="module")
def pipe():
    comp = build_components("tiny", seed=0)
    with torch.no_grad():
        for name, p in comp.unet.named_parameters():
            if name.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(1.0)
    return InstanceDiffusionPipeline(comp)


@pytest.fixture(scope="module")
def layout():
    return Layout.from_json("layouts/masks_street.json")


def test_tokenizer_is_the_clip_vocabulary():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_same_seed_same_image_and_seed_matters(pipe, layout):
    kw = dict(steps=3, mis=0.36, progress=False)
    a = pipe(layout, seed=5, **kw)
    b = pipe(layout, seed=5, **kw)
    c = pipe(layout, seed=6, **kw)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    assert (a.latents - c.latents).abs().max() > 1e-3
    assert a.images[0].size == (pipe.cfg.image_size,) * 2
    assert "untrained" in a.info["model"]
    assert a.info["unet_calls"] == (len(layout.instances) + 1) * (2 * 1 + 2) + 2 * (3 - 1)


def test_json_masks_are_honoured(pipe, layout):
    """Unlike the official inference.py, a mask given in the layout changes the result."""
    kw = dict(seed=1, steps=2, mis=0.0, progress=False, drop="mask")
    with_masks = pipe(layout, **kw).latents
    no_masks = Layout(layout.caption, layout.width, layout.height,
                      [Instance(caption=i.caption, box=i.box) for i in layout.instances])
    assert (pipe(no_masks, **kw).latents - with_masks).abs().max() > 1e-4
    # and with masks dropped (box preset) the masks no longer matter
    a = pipe(layout, **{**kw, "drop": "box"}).latents
    b = pipe(no_masks, **{**kw, "drop": "box"}).latents
    torch.testing.assert_close(a, b)


def test_num_images_batch_is_consistent(pipe, layout):
    one = pipe(layout, seed=3, steps=2, num_images=1, progress=False).latents
    two = pipe(layout, seed=3, steps=2, num_images=2, progress=False).latents
    torch.testing.assert_close(two[:1], one, atol=1e-4, rtol=1e-4)  # image k does not depend on the batch size
    assert (two[0] - two[1]).abs().max() > 1e-3


def test_generate_several_layouts_equals_one_at_a_time(pipe, layout):
    """``generate``: each layout keeps its own seed, noise and instances; info says how many shared the call."""
    other = synthetic_layout(2, size=512, seed=1)
    kw = dict(steps=3, mis=0.36, progress=False)
    many = pipe.generate([layout, other], [7, 8], **kw)
    for out, lay, seed in zip(many, [layout, other], [7, 8]):
        alone = pipe(lay, seed=seed, **kw)
        torch.testing.assert_close(out.latents, alone.latents, atol=1e-4, rtol=0)
        assert (out.info["seed"], out.info["n_instances"], out.info["layout_batch"]) == (seed, len(lay.instances), 2)
    assert many[0].info["unet_calls"] == (len(layout.instances) + 1 + 3) * (2 * 1 + 2) + 2 * 2 * (3 - 1)
    with pytest.raises(ValueError, match="one seed"):
        pipe.generate([layout, other], [7], **kw)


def test_layout_batch_bench_compares_the_two_ways():
    from instdiff_lib.bench import run_layout_batch_bench

    r = run_layout_batch_bench(model="tiny", layout_batch=2, n_layouts=3, steps=2)
    assert (r["n_layouts"], r["layout_batch"], r["config"]) == (3, 2, "tiny")
    assert r["max_abs_latent_diff"] < 1e-4
    assert r["speedup"] == round(r["one_per_call"]["seconds"] / r["2_per_call"]["seconds"], 2)


def test_long_captions_fail_clearly(pipe, layout):
    long = " ".join(["word"] * 80)
    bad = Layout(layout.caption, layout.width, layout.height, [Instance(caption=long, box=(0.1, 0.1, 0.5, 0.5))])
    with pytest.raises(PromptTooLongError, match="instance caption 0 is .* CLIP tokens"):
        pipe(bad, steps=1, progress=False)
    bad_prompt = Layout(long, layout.width, layout.height, layout.instances)
    with pytest.raises(PromptTooLongError, match="prompt"):
        pipe(bad_prompt, steps=1, progress=False)
    pipe(bad_prompt, steps=1, mis=0.0, progress=False, truncate_prompt=True)  # official eval truncates


def test_more_than_30_instances(pipe):
    big = synthetic_layout(31, size=64)
    with pytest.raises(LayoutError, match="31 instances"):
        pipe(big, steps=1, progress=False)


def test_generate_is_resumable_and_atomic(tmp_path, pipe):
    from instdiff_lib.sampling.generate import generate_from_layout

    paths = generate_from_layout("layouts/points_garden.json", tmp_path, steps=2, mis=0.0, pipe=pipe, drop="point")
    names = sorted(p.name for p in paths)
    assert names == sorted(["points_garden__seed0__0.png", "points_garden__seed0__overlay.png",
                            "points_garden__layout.png", "points_garden__seed0.json"])
    meta = json.loads((tmp_path / "points_garden__seed0.json").read_text())
    assert meta["drop"]["boxes"] is True and meta["seed"] == 0
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    generate_from_layout("layouts/points_garden.json", tmp_path, steps=2, mis=0.0, pipe=pipe, drop="point")
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # skipped: nothing regenerated
    assert not list(tmp_path.glob("*.tmp"))


def test_refine_without_weights_fails_clearly(tmp_path, pipe):
    from instdiff_lib.weights.checkpoint import CheckpointError
    from instdiff_lib.sampling.generate import generate_from_layout

    with pytest.raises(CheckpointError, match="SDXL refiner"):
        generate_from_layout("layouts/boxes_kitchen_animals.json", tmp_path, steps=1, mis=0.0, pipe=pipe, refine=0.3)


def test_quality_bar_attribute_check_uses_the_majority_baseline():
    import math

    from instdiff_lib.bench import clearly_above_chance, majority_baseline

    labels = ["checkered"] * 31 + ["solid"] * 26 + ["dotted"] * 24 + ["striped"] * 19
    assert majority_baseline(labels) == 0.31 and math.isnan(majority_baseline([]))
    acc = {"mean": 0.29, "ci95": 0.039}
    assert clearly_above_chance(acc, 0.25, [])  # the CI's lower end 0.251 is above 1/4 ...
    assert not clearly_above_chance(acc, 0.25, labels)  # ... but not above always answering "checkered" (0.31)
    assert not clearly_above_chance({"mean": 0.27, "ci95": 0.039}, 0.25, [])  # mean above 1/4, lower end 0.231 not
    assert not clearly_above_chance({"mean": 0.25, "ci95": 0.0}, 0.25, [])  # equal is not above
    assert clearly_above_chance({"mean": 0.6, "ci95": 0.05}, 0.25, labels)
    assert not clearly_above_chance({"mean": 0.6, "ci95": 0.05}, 0.25, ["solid"] * 10)  # majority 1.0
    assert clearly_above_chance({"mean": 0.3, "ci95": float("nan")}, 0.25, [])  # one seed, no labels: vs 1/K
