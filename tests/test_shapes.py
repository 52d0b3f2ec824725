"""Tests for instdiff_lib.datasets.shapes: the procedural Shapes world in COCO format."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from instdiff_lib.datasets import shapes
from instdiff_lib.layouts.layout import Layout, decode_mask, grounding_arrays
from instdiff_lib.datasets.shapes import (
    COLOR_RGB,
    COLORS,
    PATTERN_RGB,
    SHAPES,
    TEXTURE_ADJECTIVE,
    TEXTURES,
    ShapeSpec,
    ShapesSplit,
    make_shapes_dataset,
    render_scene,
    shape_mask,
    shapes_layouts,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """200 images of 64 px (the size the speed requirement names; its time is `instdiff bench --shapes-data`)."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_images=200, seed=3)


@pytest.fixture(scope="module")
def data(dataset):
    split = dataset
    inst = json.loads(split.instances_json.read_text())
    caps = json.loads(split.captions_json.read_text())
    images = {
        img["id"]: np.array(Image.open(split.image_dir / img["file_name"]).convert("RGB")) for img in inst["images"]
    }
    return inst, caps, images


def tight_box(mask):
    """[x, y, w, h] with x from the column index and y from the row index."""
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


def _files(split):
    return {p.relative_to(split.root): p.read_bytes() for p in sorted(split.root.rglob("*")) if p.is_file()}


# -----------------------------------------------------------------------------
# determinism and speed


def test_speed_bench_times_the_data_set_build_against_its_target():
    """The Shapes data set build (render, encode, write) is timed by `instdiff bench --shapes-data` as a ratio to its
    target scaled to the number of images, not asserted by a timed test."""
    from instdiff_lib.bench import run_shapes_data_bench

    r = run_shapes_data_bench(n_images=10, repeats=2)
    assert r["n_images"] == 10 and len(r["all_runs_s"]) == 2 and r["seconds"] == min(r["all_runs_s"])
    # both are rounded to 3 decimals: the ratio by 5e-4, seconds / 0.25 by 5e-4 / 0.25 (0.187 s reads 0.748, ratio 0.75)
    assert r["target_s"] == 0.25 and r["target_ratio"] == pytest.approx(r["seconds"] / 0.25, abs=5e-4 + 2e-3 + 1e-9)


def test_same_seed_and_split_give_identical_bytes(tmp_path):
    a = _files(make_shapes_dataset(tmp_path / "a", n_images=30, seed=11))
    b = _files(make_shapes_dataset(tmp_path / "b", n_images=30, seed=11))
    assert a.keys() == b.keys() and len(a) == 32  # 30 images + 2 json
    assert all(a[k] == b[k] for k in a)
    other_seed = _files(make_shapes_dataset(tmp_path / "c", n_images=30, seed=12))
    other_split = _files(make_shapes_dataset(tmp_path / "d", n_images=30, seed=11, split="train"))
    name = next(k for k in a if k.suffix == ".png")
    assert other_seed[name] != a[name]
    assert other_split[type(name)("train", name.name)] != a[name]


def test_an_image_does_not_depend_on_the_number_of_images(tmp_path):
    small = make_shapes_dataset(tmp_path / "small", n_images=5, seed=1)
    big = make_shapes_dataset(tmp_path / "big", n_images=20, seed=1)
    for i in range(1, 6):
        name = f"{i:012d}.png"
        assert (small.image_dir / name).read_bytes() == (big.image_dir / name).read_bytes()


# -----------------------------------------------------------------------------
# COCO structure


def test_pycocotools_loads_both_files_and_agrees_with_our_decoder(dataset):
    split = dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        coco = COCO(str(split.instances_json))
        caps = COCO(str(split.captions_json))
        assert sorted(coco.getImgIds()) == list(range(1, 201))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == SHAPES
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[1, 2, 3])):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), decode_mask(ann["segmentation"], 64, 64))
        assert len(caps.getAnnIds()) == 200


def test_annotation_fields_ids_and_categories(data):
    inst, caps, _ = data
    anns = inst["annotations"]
    assert [c["id"] for c in inst["categories"]] == list(range(1, len(SHAPES) + 1))
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))  # unique, sequential over the split
    assert all(isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0 for a in anns)
    per_image = np.bincount([a["image_id"] for a in anns], minlength=201)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 8
    assert {img["width"] for img in inst["images"]} == {64} == {img["height"] for img in inst["images"]}
    assert [c["image_id"] for c in caps["annotations"]] == list(range(1, 201))  # one caption per image


def test_drawn_colour_is_independent_of_the_annotation_id(data):
    inst, _, _ = data
    anns = inst["annotations"]
    same = np.mean([COLORS[a["id"] % 8] == a["color"] for a in anns])
    assert same < 0.3  # about 1/8 by chance, not 1
    assert {a["color"] for a in anns} == set(COLORS) and {a["texture"] for a in anns} == set(TEXTURES)


def test_bbox_is_the_tight_box_of_the_mask_and_area_its_pixel_count(data):
    inst, _, _ = data
    for a in inst["annotations"]:
        mask = decode_mask(a["segmentation"], 64, 64)
        assert a["bbox"] == tight_box(mask)
        assert a["area"] == int(mask.sum()) >= shapes.MIN_VISIBLE_PIXELS


def test_captions_name_colour_texture_and_shape(data):
    inst, caps, _ = data
    cat = {c["id"]: c["name"] for c in inst["categories"]}
    by_image = {}
    for a in inst["annotations"]:
        assert a["caption"] == f"a {a['color']} {TEXTURE_ADJECTIVE[a['texture']]} {cat[a['category_id']]}"
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    for c in caps["annotations"]:
        listed = by_image[c["image_id"]][:4]
        assert c["caption"].endswith(" on a light background")
        assert all(x in c["caption"] for x in listed)
        assert ("more shape" in c["caption"]) == (len(by_image[c["image_id"]]) > 4)


# -----------------------------------------------------------------------------
# pixels: masks are the visible parts


def test_masks_are_the_visible_parts_of_the_drawn_shapes(data):
    inst, _, images = data
    anns_of = {}
    for a in inst["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    palette = np.array(list(COLOR_RGB.values()) + list(PATTERN_RGB.values()))
    for image_id, img in images.items():
        union = np.zeros((64, 64), bool)
        for a in anns_of[image_id]:
            mask = decode_mask(a["segmentation"], 64, 64)
            assert not (union & mask).any(), "visible masks of one image must not overlap"
            union |= mask
            pixels = img[mask]
            colour, pattern = np.array(COLOR_RGB[a["color"]]), np.array(PATTERN_RGB[a["color"]])
            if a["texture"] == "solid":
                assert (pixels == colour).all()
            else:
                is_colour, is_pattern = (pixels == colour).all(1), (pixels == pattern).all(1)
                assert (is_colour | is_pattern).all() and is_colour.any() | is_pattern.any()
        # outside all masks: background, never one of the shape colours
        bg = img[~union]
        assert not (bg[:, None, :] == palette[None]).all(-1).any()


def test_occluded_shapes_keep_their_visible_part_and_hidden_ones_are_dropped():
    rng = np.random.default_rng(0)
    hidden = ShapeSpec("circle", "red", "solid", cx=32, cy=32, radius=5)
    partly = ShapeSpec("square", "blue", "solid", cx=14, cy=32, radius=10)
    top = ShapeSpec("square", "green", "stripes", cx=32, cy=32, radius=14)
    image, kept, masks = render_scene([hidden, partly, top], 64, rng)
    assert kept == [partly, top]
    np.testing.assert_array_equal(masks[0], shape_mask(partly, 64) & ~shape_mask(top, 64))
    np.testing.assert_array_equal(masks[1], shape_mask(top, 64))
    assert masks[0].sum() > 0 and (image[masks[0]] == COLOR_RGB["blue"]).all()


def test_x_is_the_column_and_y_the_row():
    spec = ShapeSpec("square", "red", "solid", cx=50.0, cy=12.0, radius=8.0)  # top-right
    image, kept, (mask,) = render_scene([spec], 64, np.random.default_rng(0))
    x, y, w, h = shapes.mask_bbox(mask)
    assert x > y
    assert (x, y, w, h) == (43, 5, 14, 14)  # |x - 50| <= 6.8 on pixel centres c + 0.5: columns 43..56
    assert mask[12, 50] and not mask[50, 12]
    assert tuple(image[12, 50]) == COLOR_RGB["red"]


def test_every_shape_kind_is_distinct_and_fills_a_sensible_fraction_of_its_box():
    masks = {s: shape_mask(ShapeSpec(s, "red", "solid", 32, 32, 14), 64) for s in SHAPES}
    for s, m in masks.items():
        x, y, w, h = shapes.mask_bbox(m)
        assert 0.3 < m.sum() / (w * h) <= 1.0, s
    kinds = list(masks)
    for i in range(len(kinds)):
        for j in range(i + 1, len(kinds)):
            iou = (masks[kinds[i]] & masks[kinds[j]]).sum() / (masks[kinds[i]] | masks[kinds[j]]).sum()
            assert iou < 0.9, (kinds[i], kinds[j])


# -----------------------------------------------------------------------------
# layouts and options


def test_shapes_layouts_are_valid_layouts_of_the_annotations(dataset, data):
    split = dataset
    inst, caps, _ = data
    layouts = shapes_layouts(split)
    assert [i for i, _, _ in layouts] == list(range(1, 201))
    first = {c["image_id"]: c["caption"] for c in caps["annotations"]}
    anns_of = {}
    for a in inst["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    for image_id, file_name, layout in layouts[:50]:
        assert isinstance(layout, Layout) and (split.image_dir / file_name).exists()
        assert layout.caption == first[image_id]
        for instance, a in zip(layout.instances, anns_of[image_id], strict=True):
            x, y, w, h = a["bbox"]
            assert instance.caption == a["caption"]
            assert instance.box == pytest.approx(((x) / 64, y / 64, (x + w) / 64, (y + h) / 64))
            np.testing.assert_array_equal(instance.mask, decode_mask(a["segmentation"], 64, 64))
    g = grounding_arrays(layouts[0][2], seed=0, seg_size=64)
    assert g["masks"].sum() == len(layouts[0][2].instances)
    assert shapes_layouts(split.root)[0][2].caption == layouts[0][2].caption  # root path works too


def test_options_instance_range_format_and_argument_checks(tmp_path):
    split = make_shapes_dataset(tmp_path, n_images=10, seed=0, size=48, min_instances=3, max_instances=4,
                                image_format="jpg", split="train")
    inst = json.loads(split.instances_json.read_text())
    counts = np.bincount([a["image_id"] for a in inst["annotations"]])[1:]
    assert len(counts) == 10 and counts.min() >= 3 and counts.max() <= 4
    assert all(img["file_name"].endswith(".jpg") for img in inst["images"])
    assert Image.open(split.image_dir / inst["images"][0]["file_name"]).size == (48, 48)
    assert ShapesSplit.load(tmp_path, "train") == split
    with pytest.raises(ValueError):
        make_shapes_dataset(tmp_path, 1, seed=0, min_instances=5, max_instances=4)
    with pytest.raises(ValueError):
        make_shapes_dataset(tmp_path, 1, seed=0, image_format="gif")


def test_every_instance_keeps_most_of_its_own_pixels_visible():
    """The world leaves every instance identifiable: a shape hidden below MIN_VISIBLE_FRACTION is dropped."""
    rng = np.random.default_rng(3)
    for _ in range(40):
        specs = shapes.random_specs(rng, 64, 8)
        _, kept, visible = shapes.render_scene(specs, 64, rng)
        for spec, m in zip(kept, visible):
            assert m.sum() >= shapes.MIN_VISIBLE_FRACTION * shapes.shape_mask(spec, 64).sum()
    # and the rule bites: a small shape fully under a big later one is removed
    big = shapes.ShapeSpec("square", "red", "solid", 32.0, 32.0, 30.0)
    small = shapes.ShapeSpec("circle", "blue", "solid", 32.0, 32.0, 8.0)
    _, kept, _ = shapes.render_scene([small, big], 64, np.random.default_rng(0))
    assert [s.shape for s in kept] == ["square"]
