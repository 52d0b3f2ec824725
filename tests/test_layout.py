"""Tests for instdiff_lib.layouts.layout: demo JSON parsing, validation, round trips and grounding arrays."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from instdiff_lib.layouts import derive
from instdiff_lib.layouts.layout import (
    N_SLOTS,
    Instance,
    Layout,
    LayoutError,
    decode_mask,
    encode_mask,
    grounding_arrays,
    grounding_for_instance,
)

LAYOUT_DIR = Path(__file__).resolve().parents[1] / "layouts"
LAYOUT_FILES = sorted(LAYOUT_DIR.glob("*.json"))


def wide_top_right_mask(h: int = 512, w: int = 512) -> np.ndarray:
    """rows 10..29, cols 300..499: a wide, short rectangle where x > y."""
    m = np.zeros((h, w), bool)
    m[10:30, 300:500] = True
    return m


def scene(annos: list[dict], width: int = 512, height: int = 512, caption: str = "a scene") -> dict:
    return {"caption": caption, "width": width, "height": height, "annos": annos}


def mixed_layout() -> Layout:
    """A layout with every location type, masks and scribbles included."""
    disc = np.zeros((512, 512), bool)
    yy, xx = np.mgrid[:512, :512]
    disc[(yy - 300) ** 2 + (xx - 120) ** 2 <= 60**2] = True
    return Layout(
        caption="a test scene",
        width=512,
        height=512,
        instances=[
            Instance("a box", box=(0.1, 0.2, 0.5, 0.6), category="thing"),
            Instance("a point", point=(0.25, 0.75)),
            Instance("a scribble", scribble=np.array([[0.1, 0.1], [0.2, 0.15], [0.3, 0.3]])),
            Instance("a wide mask", mask=wide_top_right_mask()),
            Instance("a disc", mask=disc, scribble=np.array([[0.2, 0.55], [0.25, 0.6]])),
        ],
    )


def assert_same_layout(a: Layout, b: Layout) -> None:
    assert (a.caption, a.width, a.height) == (b.caption, b.width, b.height)
    assert len(a.instances) == len(b.instances)
    for x, y in zip(a.instances, b.instances):
        assert (x.caption, x.category) == (y.caption, y.category)
        for name in ("box", "point", "scribble"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            if u is not None:
                np.testing.assert_allclose(u, v, rtol=0, atol=1e-9)
        assert (x.mask is None) == (y.mask is None)
        if x.mask is not None:
            assert np.array_equal(x.mask, y.mask)


# -----------------------------------------------------------------------------
# demo files and round trips


def _formats(inst: Instance) -> set[str]:
    return {name for name in ("box", "point", "scribble", "mask") if getattr(inst, name) is not None}


def _round_change(a: Layout, b: Layout) -> str:
    """The one edit from round a to round b: add, replace (caption), move or resize (box); else 'several'."""
    if len(b.instances) > len(a.instances):
        same = all(x.caption == y.caption and x.box == y.box for x, y in zip(a.instances, b.instances))
        return "add" if same else "several"
    diff = [(x, y) for x, y in zip(a.instances, b.instances) if (x.caption, x.box) != (y.caption, y.box)]
    if len(a.instances) != len(b.instances) or len(diff) != 1:
        return "several"
    (x, y), = diff
    if x.caption != y.caption:
        return "replace"
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = x.box, y.box
    same_size = np.isclose(ax1 - ax0, bx1 - bx0) and np.isclose(ay1 - ay0, by1 - by0)
    return "move" if same_size else "resize"


@pytest.mark.parametrize("folder", [LAYOUT_DIR, LAYOUT_DIR / "shapes"], ids=["coco", "shapes"])
def test_demo_sections_hold_what_their_titles_promise(folder):
    """Every file of demos.yaml loads, and each section's layouts are what the demo notebook says they show."""
    import yaml

    sections = {s["name"]: s for s in yaml.safe_load((folder / "demos.yaml").read_text())}
    assert {"boxes", "points", "scribbles", "masks", "mixed", "four_formats", "parts", "iterative"} <= set(sections)
    lay = {name: [Layout.from_json(folder / f) for f in sec["files"]] for name, sec in sections.items()}
    for name, fmt in (("points", "point"), ("scribbles", "scribble"), ("masks", "mask")):
        for layout in lay[name]:
            assert all(fmt in _formats(i) for i in layout.instances), (name, [_formats(i) for i in layout.instances])
    for layout in lay["boxes"]:
        assert all(_formats(i) == {"box"} for i in layout.instances)
    for layout in lay["mixed"]:
        assert len({frozenset(_formats(i)) for i in layout.instances}) >= 3  # several formats in one image
    assert any("mask" in _formats(i) for i in lay["four_formats"][0].instances)
    left, right = lay["parts"]
    moved = [(x, y) for x, y in zip(left.instances, right.instances) if x.box != y.box]
    assert len(left.instances) == len(right.instances) and len(moved) == 1  # one box moves, the rest stay
    assert [x.caption for x in left.instances] == [y.caption for y in right.instances]
    rounds = lay["iterative"]
    changes = [_round_change(a, b) for a, b in zip(rounds, rounds[1:])]
    assert len(rounds) == 5 and sorted(changes) == ["add", "move", "replace", "resize"], changes


@pytest.mark.parametrize("path", LAYOUT_FILES, ids=lambda p: p.name)
def test_every_demo_layout_loads_and_round_trips(path):
    layout = Layout.from_json(path)
    assert 1 <= len(layout.instances) <= N_SLOTS
    text = json.dumps(layout.to_json())  # JSON-serialisable (RLE counts are str)
    assert_same_layout(layout, Layout.from_json(text))


def test_demo_masks_are_real_rle_and_boxes_match_them():
    layout = Layout.from_json(LAYOUT_DIR / "masks_street.json")
    for inst in layout.instances:
        assert inst.mask.shape == (512, 512) and inst.mask.sum() > 100
        np.testing.assert_allclose(inst.box, derive.box_from_mask(inst.mask), atol=1e-9)


def test_eagle_layouts_differ_only_in_the_beak_box():
    left = Layout.from_json(LAYOUT_DIR / "eagle_head_left.json").to_json()
    right = Layout.from_json(LAYOUT_DIR / "eagle_head_right.json").to_json()
    diff = [i for i, (a, b) in enumerate(zip(left["annos"], right["annos"])) if a != b]
    assert len(diff) == 1 and "beak" in left["annos"][diff[0]]["caption"]


def test_round_trip_with_masks_and_scribbles():
    layout = mixed_layout().validate()
    data = json.loads(json.dumps(layout.to_json()))
    assert data["annos"][2]["scribble"] == pytest.approx([51.2, 51.2, 102.4, 76.8, 153.6, 153.6])
    assert isinstance(data["annos"][3]["mask"]["counts"], str)
    assert data["annos"][3]["bbox"] == [300, 10, 200, 20]  # box derived from the mask
    assert_same_layout(layout, Layout.from_json(data))


# -----------------------------------------------------------------------------
# parsing


def test_pixels_are_normalised_by_width_and_height():
    layout = Layout.from_json(scene([
        {"caption": "a", "bbox": [384, 128, 192, 64], "point": [600, 500]},
    ], width=768, height=512))
    inst = layout.instances[0]
    assert inst.box == (0.5, 0.25, 0.75, 0.375)
    assert inst.point == (600 / 768, 500 / 512)


def test_flat_and_paired_scribbles_are_equivalent():
    flat = Layout.from_json(scene([{"caption": "s", "scribble": [10, 20, 30, 40, 50, 60]}]))
    pairs = Layout.from_json(scene([{"caption": "s", "scribble": [[10, 20], [30, 40], [50, 60]]}]))
    assert np.array_equal(flat.instances[0].scribble, pairs.instances[0].scribble)
    assert flat.instances[0].scribble.shape == (3, 2)
    np.testing.assert_allclose(flat.instances[0].scribble[1], [30 / 512, 40 / 512])


def test_missing_or_zero_bbox_means_no_box_and_mask_gives_the_box():
    m = wide_top_right_mask()
    layout = Layout.from_json(scene([
        {"caption": "p", "point": [5, 5]},
        {"caption": "z", "bbox": [0, 0, 0, 0], "point": [5, 5], "mask": []},
        {"caption": "m", "mask": encode_mask(m)},
    ]))
    a, b, c = layout.instances
    assert a.box is None and b.box is None and b.mask is None
    assert c.box == (300 / 512, 10 / 512, 500 / 512, 30 / 512)


def test_compressed_rle_decodes_to_the_encoded_mask():
    m = wide_top_right_mask()
    m[200:260, 40:90] = True
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rle = {"size": rle["size"], "counts": rle["counts"].decode()}
    layout = Layout.from_json(scene([{"caption": "m", "mask": rle}]))
    assert np.array_equal(layout.instances[0].mask, m)


def test_uncompressed_rle_decodes():
    m = np.zeros((16, 24), bool)
    m[3:7, 10:20] = True
    flat = m.flatten(order="F").astype(np.int8)  # COCO runs are column-major, starting with zeros
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    layout = Layout.from_json(scene([{"caption": "m", "mask": {"size": [16, 24], "counts": counts}}], 24, 16))
    assert np.array_equal(layout.instances[0].mask, m)


def test_polygon_mask_decodes_in_x_y_order():
    layout = Layout.from_json(scene([{"caption": "poly", "mask": [[100, 10, 400, 10, 400, 50, 100, 50]]}]))
    m = layout.instances[0].mask
    assert m.shape == (512, 512)
    assert m[30, 250] and not m[250, 30]
    x0, y0, x1, y1 = layout.instances[0].box
    assert (x1 - x0) > 5 * (y1 - y0)  # wide and short, as drawn


def test_unknown_keys_are_ignored():
    layout = Layout.from_json(scene([{"caption": "a", "bbox": [1, 2, 3, 4], "foo": 1}]) | {"bar": [1]})
    assert len(layout.instances) == 1


# -----------------------------------------------------------------------------
# validation errors


def too_many(n: int) -> dict:
    return scene([{"caption": f"thing {i}", "point": [i, i]} for i in range(n)])


def test_more_than_30_instances_is_an_error_that_suggests_truncate():
    with pytest.raises(LayoutError, match=r"31 instances.*truncate=True"):
        Layout.from_json(too_many(31))


def test_truncate_keeps_the_first_30_and_warns():
    with pytest.warns(UserWarning, match="keeping the first 30"):
        layout = Layout.from_json(too_many(33), truncate=True)
    assert [i.caption for i in layout.instances] == [f"thing {i}" for i in range(30)]


@pytest.mark.parametrize(
    "anno, fragments",
    [
        ({"caption": "a red car", "bbox": [10, 20, 600, 40]},
         ["instance 1 ('a red car')", "box [10, 20, 600, 40]", "512x512", "x + w = 610 > 512"]),
        ({"caption": "a red car", "bbox": [10, 500, 60, 40]}, ["instance 1 ('a red car')", "y + h = 540 > 512"]),
        ({"caption": "a red car", "bbox": [-5, 20, 60, 40]}, ["instance 1 ('a red car')", "x = -5 < 0"]),
        ({"caption": "flat", "bbox": [10, 20, 0, 40]}, ["instance 1 ('flat')", "zero or negative size", "w = 0"]),
        ({"caption": "neg", "bbox": [10, 20, 30, -4]}, ["instance 1 ('neg')", "h = -4"]),
        ({"caption": "p", "point": [600, 20]}, ["instance 1 ('p')", "point [600, 20]", "outside the 512x512"]),
        ({"caption": "s", "scribble": [10, 10, 20, 700]}, ["instance 1 ('s')", "scribble point 1 [20, 700]"]),
        ({"caption": "nan box", "bbox": [float("nan"), 1, 2, 3]}, ["instance 1 ('nan box')", "NaN"]),
        ({"caption": "inf pt", "point": [float("inf"), 1]}, ["instance 1 ('inf pt')", "NaN/inf"]),
        ({"caption": "nothing"}, ["instance 1 ('nothing')", "no location"]),
        ({"bbox": [1, 2, 3, 4]}, ["instance 1", "caption"]),
        ({"caption": "  ", "bbox": [1, 2, 3, 4]}, ["instance 1", "caption"]),
        ({"caption": "short", "bbox": [1, 2, 3]}, ["instance 1 ('short')", "'bbox'", "4 numbers"]),
        ({"caption": "text", "bbox": [1, 2, "3", 4]}, ["instance 1 ('text')", "'bbox'", "numbers"]),
        ({"caption": "odd", "scribble": [1, 2, 3]}, ["instance 1 ('odd')", "even"]),
        ({"caption": "bad mask", "mask": {"counts": "abc"}}, ["instance 1 ('bad mask')", "'mask'"]),
        ({"caption": "bad rle", "mask": {"size": [512, 512], "counts": "zz"}}, ["instance 1 ('bad rle')", "invalid"]),
        ({"caption": "short rle", "mask": {"size": [512, 512], "counts": encode_mask(np.ones((8, 8), bool))["counts"]}},
         ["instance 1 ('short rle')", "do not cover height*width = 262144 pixels"]),
        ({"caption": "nan box", "bbox": [10, 20, float("nan"), 3]}, ["box [10, 20, nan, 3] contains NaN/inf"]),
        ({"caption": "small mask", "mask": encode_mask(np.ones((256, 256), bool))},
         ["instance 1 ('small mask')", "mask shape (256, 256)", "(512, 512)"]),
        ({"caption": "thin", "bbox": [10, 20, 30, 0]}, ["instance 1 ('thin')", "zero or negative size", "h = 0"]),
        ({"caption": "up", "bbox": [10, -5, 20, 20]},
         ["instance 1 ('up'): box [10, -5, 20, 20] starts above the 512x512 canvas (y = -5 < 0)"]),
        ({"caption": "s", "scribble": [[1, 2, 3]]}, ["instance 1 ('s'): 'scribble' must have 2 numbers"]),
        ({"caption": "s", "scribble": [[1, 2], 3]},
         ["instance 1 ('s'): 'scribble' must be [x1, y1, ...] or [[x, y], ...] in pixels"]),
        ({"caption": "p", "point": [1, 2, 3]}, ["instance 1 ('p'): 'point' must have 2 numbers"]),
        ({"caption": "c", "bbox": [1, 2, 3, 4], "category_name": 5},
         ["instance 1 ('c'): 'category_name' must be a string, got 5"]),
        ({"caption": "no size", "mask": {"counts": "abc"}}, ["an RLE mask needs 'size' and 'counts'"]),
        ({"caption": "int counts", "mask": {"size": [512, 512], "counts": 7}},
         ["RLE 'counts' must be a string or a list of non-negative ints"]),
        ({"caption": "flat poly", "mask": [10, 10, 50, 10, 50, 50]},
         ["instance 1 ('flat poly')", "mask must be a COCO RLE dict, a list of polygons, or []"]),
    ],
)
def test_invalid_instances_raise_naming_instance_and_problem(anno, fragments):
    data = scene([{"caption": "fine", "bbox": [0, 0, 512, 512]}, anno])
    with pytest.raises(LayoutError) as err:
        Layout.from_json(json.dumps(data))
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level"),
        (json.dumps(scene([])).replace('"annos": []', '"annos": {}'), "'annos' must be a list"),
        (json.dumps({"caption": "x", "width": 512, "annos": []}), "'height'"),
        (json.dumps({"caption": "x", "width": 0, "height": 512, "annos": []}), "'width'"),
        (json.dumps({"caption": "x", "width": 512.5, "height": 512, "annos": []}), "'width'"),
        (json.dumps(scene(["a string"])), "instance 0"),
        ("[1, 2]", "top level must be a JSON object, got list"),
        (json.dumps(scene(["a string"])), "instance 0: each entry of 'annos' must be an object, got str"),
        (json.dumps(scene([]) | {"caption": 5}), "'caption' (global) must be a string, got 5"),
    ],
)
def test_malformed_json_raises_layout_error(data, fragment):
    with pytest.raises(LayoutError) as err:
        Layout.from_json(data)
    assert fragment in str(err.value)


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(scene([{"caption": "a red car", "bbox": [10, 20, 600, 40]}])))
    with pytest.raises(LayoutError) as err:
        Layout.from_json(path)
    assert str(path) in str(err.value) and "a red car" in str(err.value)
    path.write_text("{oops")
    with pytest.raises(LayoutError, match="broken.json"):
        Layout.from_json(str(path))
    with pytest.raises(LayoutError, match="missing.json"):
        Layout.from_json(tmp_path / "missing.json")


def test_boxes_touching_the_border_and_empty_global_caption_are_fine():
    layout = Layout.from_json(scene([{"caption": "all", "bbox": [0, 0, 512, 512]}], caption=""))
    assert layout.instances[0].box == (0.0, 0.0, 1.0, 1.0)
    # a hair outside (float noise from another tool) is tolerated, a pixel is not
    Layout("", 512, 512, [Instance("a", box=(0, 0, 1 + 1e-9, 1))]).validate()
    with pytest.raises(LayoutError, match="513 > 512"):
        Layout("", 512, 512, [Instance("a", box=(0, 0, 513 / 512, 1))]).validate()


def test_validate_checks_directly_built_layouts():
    with pytest.raises(LayoutError, match=r"instance 0 \('s'\): scribble contains NaN"):
        Layout("", 512, 512, [Instance("s", scribble=np.array([[0.1, np.nan]]))]).validate()
    with pytest.raises(LayoutError, match="width must be a positive integer"):
        Layout("", -1, 512, [Instance("a", point=(0.5, 0.5))]).validate()
    with pytest.raises(LayoutError, match=r"mask shape \(512, 512\).*\(256, 512\)"):
        Layout("", 512, 256, [Instance("m", mask=wide_top_right_mask())]).validate()


def test_empty_mask_is_allowed():
    layout = Layout("", 64, 64, [Instance("ghost", mask=np.zeros((64, 64), bool))]).validate()
    g = grounding_arrays(layout, seed=0, seg_size=64)
    assert g["masks"][0] == 1 and not g["polygons"].any() and not g["scribbles"].any() and not g["segs"].any()


# -----------------------------------------------------------------------------
# grounding arrays


def test_grounding_shapes_dtypes_and_padding():
    g = grounding_arrays(mixed_layout(), seed=0)
    shapes = {"boxes": (30, 4), "masks": (30,), "points": (30, 2), "scribbles": (30, 40),
              "polygons": (30, 512), "segs": (30, 512, 512)}
    assert {k: v.shape for k, v in g.items()} == shapes
    assert all(v.dtype == np.float32 for v in g.values())
    assert g["masks"].tolist() == [1.0] * 5 + [0.0] * 25
    for v in g.values():
        assert not v[5:].any()


def test_grounding_points_default_to_box_centres_and_keep_given_points():
    g = grounding_arrays(mixed_layout(), seed=0)
    np.testing.assert_allclose(g["boxes"][0], [0.1, 0.2, 0.5, 0.6], rtol=1e-6)
    np.testing.assert_allclose(g["points"][0], [0.3, 0.4], rtol=1e-6)  # box centre
    np.testing.assert_allclose(g["points"][1], [0.25, 0.75])  # the given point
    assert not g["boxes"][1].any()  # point-only instance: no box
    np.testing.assert_allclose(g["points"][2], [0.2, 0.55 / 3], rtol=1e-6)  # scribble-only: its mean


def test_grounding_user_scribble_is_resampled_to_20_points():
    layout = mixed_layout()
    g = grounding_arrays(layout, seed=0)
    expected = derive.reorder_scribble(layout.instances[2].scribble, 20).reshape(-1)
    np.testing.assert_allclose(g["scribbles"][2], expected, rtol=1e-6)
    assert not g["polygons"][2].any() and not g["segs"][2].any()  # no mask -> zeros


def test_grounding_respects_x_column_y_row():
    layout = Layout("", 512, 512, [Instance("wide", mask=wide_top_right_mask())])
    g = grounding_arrays(layout, seed=0)
    np.testing.assert_allclose(g["boxes"][0], [300 / 512, 10 / 512, 500 / 512, 30 / 512])
    scrib = g["scribbles"][0].reshape(20, 2)
    poly = g["polygons"][0].reshape(256, 2)
    for pts in (scrib, poly, g["points"][:1]):
        assert np.all(pts[:, 0] > pts[:, 1])
    assert np.ptp(scrib[:, 0]) > np.ptp(scrib[:, 1]) and np.ptp(poly[:, 0]) > np.ptp(poly[:, 1])
    seg = g["segs"][0]  # indexed [row, col]
    assert seg[10:30, 300:500].all() and seg.sum() == 20 * 200


def test_grounding_segs_are_nearest_resized_from_non_square_frames():
    m = np.zeros((512, 768), bool)  # (H, W)
    m[0:256, 384:768] = True  # top-right quarter
    g = grounding_arrays(Layout("", 768, 512, [Instance("q", mask=m)]), seed=0, seg_size=64)
    seg = g["segs"][0]
    assert seg.shape == (64, 64) and set(np.unique(seg)) == {0.0, 1.0}
    assert seg[:32, 32:].all() and not seg[32:, :].any() and not seg[:, :32].any()


def test_grounding_is_deterministic_per_seed():
    layout = mixed_layout()
    a, b = grounding_arrays(layout, seed=7), grounding_arrays(layout, seed=7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = grounding_arrays(layout, seed=8)
    assert not np.array_equal(a["scribbles"][3], c["scribbles"][3])  # mask-derived scribble changes
    assert np.array_equal(a["scribbles"][4], c["scribbles"][4])  # a user scribble does not


def test_single_instance_grounding_matches_the_full_layout():
    layout = mixed_layout()
    full = grounding_arrays(layout, seed=3)
    for i in range(len(layout.instances)):
        one = grounding_for_instance(layout, i, seed=3)
        for key in full:
            assert np.array_equal(one[key][0], full[key][i]), (i, key)
            assert not one[key][1:].any()


def test_instance_derivation_does_not_depend_on_other_instances():
    layout = mixed_layout()
    fewer = Layout(layout.caption, 512, 512, layout.instances[:4])
    a, b = grounding_arrays(layout, seed=1), grounding_arrays(fewer, seed=1)
    assert np.array_equal(a["scribbles"][3], b["scribbles"][3])


def test_grounding_rejects_too_many_instances_and_negative_seeds():
    crowded = Layout("", 512, 512, [Instance(f"t{i}", point=(0.5, 0.5)) for i in range(31)])
    with pytest.raises(LayoutError, match="31 instances"):
        grounding_arrays(crowded, seed=0)
    with pytest.raises(ValueError):
        grounding_arrays(mixed_layout(), seed=-1)


# -----------------------------------------------------------------------------
# edge cases found by mutation testing (tests/MUTATION.md)


def mask_error(mask, width: int = 4, height: int = 4) -> str:
    """The LayoutError message for a width x height layout whose one instance has this 'mask'."""
    with pytest.raises(LayoutError) as err:
        Layout.from_json(scene([{"caption": "m", "mask": mask}], width, height))
    return str(err.value)


def one_mask(mask, width: int = 4, height: int = 4) -> np.ndarray:
    return Layout.from_json(scene([{"caption": "m", "mask": mask}], width, height)).instances[0].mask


def test_compressed_rle_strings_are_checked_character_by_character():
    # "`0" is one run of 16: group 16 (0x10, so a second group follows: 0x30 -> "`"), then group 0 ("0")
    assert np.array_equal(one_mask({"size": [4, 4], "counts": "`0"}), np.zeros((4, 4), bool))
    # the run stops after a group that still announces another one
    assert "ends in the middle of a run" in mask_error({"size": [4, 4], "counts": "`"})
    # "p" is code 64, one past the 64 codes ("0".."o") of the format; "/" is code -1
    assert "invalid character 'p'" in mask_error({"size": [4, 4], "counts": "`0p"})
    assert "invalid character '/'" in mask_error({"size": [4, 4], "counts": "/"})
    # no runs at all cover none of the 16 pixels
    assert "do not cover height*width = 16 pixels" in mask_error({"size": [4, 4], "counts": ""})
    # a run of 2**64 pixels (12 zero groups with "more", then 16 as above) parses but pycocotools refuses it
    assert "cannot decode RLE mask" in mask_error({"size": [2**64, 1], "counts": "P" * 12 + "`0"})


@pytest.mark.parametrize(
    "mask, reason",
    [
        ({"size": [4, 4], "counts": "`"}, "RLE counts string ends in the middle of a run"),
        ({"counts": "`0"}, "an RLE mask needs 'size' and 'counts'"),
        ({"size": [4, 4], "counts": 16}, "RLE 'counts' must be a string or a list of non-negative ints"),
        ([1, 2, 3, 4, 5, 6], "mask must be a COCO RLE dict, a list of polygons, or []"),
    ],
)
def test_bad_mask_messages_read_instance_then_reason(mask, reason):
    assert mask_error(mask) == f"instance 0 ('m'): bad 'mask': {reason}"


@pytest.mark.parametrize("size", [[4, 4, 4], [16], [4.0, 4], [0, 16], [4, -4], (4, 4), "4x4"])
def test_rle_size_must_be_a_list_of_two_positive_ints(size):
    assert "RLE 'size' must be [height, width]" in mask_error({"size": size, "counts": "`0"})


def test_uncompressed_rle_edge_cases():
    # COCO runs start with background: a mask whose first pixel is set starts with a run of 0
    assert one_mask({"size": [4, 4], "counts": [0, 16]}).all()
    # a one-row frame: columns 1 and 2 set
    assert one_mask({"size": [1, 4], "counts": [1, 2, 1]}, width=4, height=1).tolist() == [[False, True, True, False]]
    assert "uncompressed RLE counts sum to 7, not height*width = 16" in mask_error({"size": [4, 4], "counts": [3, 4]})
    for counts in ([-1, 17], [8.0, 8.0], 16):
        assert "RLE 'counts' must be a string or a list of non-negative ints" in mask_error(
            {"size": [4, 4], "counts": counts})


def test_polygon_masks_need_three_numeric_points_each():
    # triangle (0, 0), (4, 0), (0, 4): the pixels whose centre (c + 0.5, r + 0.5) lies inside, i.e. r + c <= 2
    rows, cols = np.mgrid[:4, :4]
    assert np.array_equal(one_mask([[0, 0, 4, 0, 0, 4]]), rows + cols <= 2)
    for polys, j in [([[0, 0, 3, 0]], 0), ([[0, 0, 3, 0, 3, 3, 1]], 0), ([[0, 0, 3, 0, 3, "3"]], 0),
                     ([[0, 0, 4, 0, 0, 4], [1, 1, 2, 2]], 1)]:
        assert f"polygon {j} must be a flat list of at least 3 (x, y) pixel pairs" in mask_error(polys)


def test_decode_mask_returns_bool_arrays():
    m = np.zeros((4, 4), bool)
    m[1:3, 2] = True
    for obj in (encode_mask(m), [[0, 0, 4, 0, 0, 4]]):
        out = decode_mask(obj, 4, 4)
        assert out.dtype == bool and out.shape == (4, 4)
    assert np.array_equal(decode_mask(encode_mask(m), 4, 4), m)


def test_instance_normalises_its_arrays_and_keeps_a_given_box():
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 5:8] = 255  # a 0/255 image, as read from a PNG
    inst = Instance("m", box=(0, 0, 1, 1), mask=m, scribble=np.array([[1, 0], [0, 1]], np.int32))
    assert inst.box == (0.0, 0.0, 1.0, 1.0)  # the given box, not the mask's tight box
    assert inst.mask.dtype == bool and np.array_equal(inst.mask, m > 0)
    assert inst.scribble.dtype == np.float64 and inst.scribble.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert Instance("m", mask=m).box == (5 / 8, 2 / 8, 1.0, 4 / 8)
    # the same from JSON: a bbox given with a mask wins
    wide = wide_top_right_mask()
    layout = Layout.from_json(scene([{"caption": "m", "bbox": [0, 0, 256, 128], "mask": encode_mask(wide)}]))
    assert layout.instances[0].box == (0.0, 0.0, 0.5, 0.25)


def test_to_json_rounds_pixels_to_six_decimals():
    # 512 / 3 = 170.666666..., written as 170.666667; integral values are written as ints
    layout = Layout("", 512, 512, [Instance("third", box=(1 / 3, 0.25, 2 / 3, 0.5), point=(1 / 3, 0.5))])
    anno = layout.to_json()["annos"][0]
    assert anno["bbox"] == [170.666667, 128, 170.666667, 128] and isinstance(anno["bbox"][1], int)
    assert anno["point"] == [170.666667, 256]


def test_coordinates_exactly_at_the_tolerance_are_accepted():
    lo, hi = -1e-6, 1 + 1e-6  # the documented tolerance: float noise up to 1e-6 of the canvas is accepted
    Layout("", 512, 512, [
        Instance("box", box=(lo, lo, hi, hi)),
        Instance("low point", point=(lo, lo)),
        Instance("high point", point=(hi, hi)),
        Instance("scribble", scribble=np.array([[lo, hi], [hi, lo]])),
    ]).validate()
    with pytest.raises(LayoutError, match="starts left"):
        Layout("", 512, 512, [Instance("box", box=(-2e-6, 0, 1, 1))]).validate()


@pytest.mark.parametrize(
    "layout, message",
    [
        (Layout(5, 8, 8, [Instance("a", point=(0.5, 0.5))]), "global caption must be a string, got int"),
        (Layout("", 8, 8, [Instance("  ", point=(0.5, 0.5))]), "instance 0: missing or empty caption"),
        (Layout("", 8, 8, [Instance(None, point=(0.5, 0.5))]), "instance 0: missing or empty caption"),
        (Layout("", 8, 8, [Instance("b", box=(0.1, 0.2, 0.3))]), "instance 0 ('b'): box must be 4 numbers (x0, y0, x1, y1)"),
        (Layout("", 8, 8, [Instance("p", point=(0.1, 0.2, 0.3))]), "instance 0 ('p'): point must be 2 numbers (x, y)"),
        (Layout("", 8, 8, [Instance("s", scribble=np.zeros((0, 2)))]),
         "instance 0 ('s'): scribble must have shape (k, 2) with k >= 1, got (0, 2)"),
        (Layout("", 8, 8, [Instance("s", scribble=np.full((3, 3), 0.5))]),
         "instance 0 ('s'): scribble must have shape (k, 2) with k >= 1, got (3, 3)"),
        (Layout("", 1, 0, [Instance("dot", point=(0, 0))]), "layout height must be a positive integer, got 0"),
    ],
)
def test_validate_names_the_problem_of_directly_built_layouts(layout, message):
    with pytest.raises(LayoutError, match=re.escape(message)):
        layout.validate()


def test_one_pixel_frames_integral_float_sizes_and_a_missing_global_caption():
    tiny = Layout.from_json({"width": 1, "height": 1.0, "annos": [{"caption": "dot", "point": [1, 0]}]})
    assert (tiny.caption, tiny.width, tiny.height) == ("", 1, 1) and type(tiny.height) is int
    assert tiny.instances[0].point == (1.0, 0.0)


def test_empty_scribble_means_no_scribble():
    layout = Layout.from_json(scene([{"caption": "a", "point": [128, 256], "scribble": [], "mask": []}]))
    inst = layout.instances[0]
    assert inst.scribble is None and inst.mask is None and inst.point == (0.25, 0.5)


def test_exactly_30_instances_fit_without_truncation():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layout = Layout.from_json(too_many(30))
    assert len(layout.instances) == 30


def test_sources_other_than_files_give_messages_without_a_prefix():
    data = scene([{"caption": "a red car", "bbox": [10, 20, 600, 40]}])
    for src in (data, json.dumps(data)):
        with pytest.raises(LayoutError) as err:
            Layout.from_json(src)
        assert str(err.value).startswith("instance 0 ('a red car'): box")
    with pytest.raises(LayoutError) as err:
        Layout.from_json("{not json")
    assert str(err.value).startswith("not valid JSON")
    # JSON text may start with blanks (it is still text, not a path)
    layout = Layout.from_json("\n  " + json.dumps(scene([{"caption": "a", "point": [128, 256]}])))
    assert layout.instances[0].point == (0.25, 0.5)
    with pytest.raises(LayoutError, match="expected a path, a JSON string or a dict, got int"):
        Layout.from_json(42)


def test_grounding_errors_name_the_bad_seed_or_index():
    layout = Layout("", 8, 8, [Instance("a", point=(0.5, 0.5)), Instance("b", point=(0.25, 0.25))])
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        grounding_arrays(layout, seed=-1, seg_size=8)
    for i in (2, -1):
        with pytest.raises(IndexError, match=f"instance index {i} out of range for a layout with 2 instances"):
            grounding_for_instance(layout, i, seed=0, seg_size=8)


def test_mask_points_of_a_tiny_mask_are_drawn_from_the_instance_generator():
    m = np.zeros((64, 64), bool)
    m[10:14, 20:24] = True  # 16 pixels: fewer than the 128 interior points, so they are drawn at random
    layout = Layout("", 64, 64, [Instance("tiny", mask=m)])
    a, b = (grounding_arrays(layout, seed=s, seg_size=64)["polygons"][0].reshape(256, 2) * 64 for s in (0, 1))
    # boundary points lie at most 2 px past the last pixel (the +1 px padding offset); interior ones on pixels
    assert (a[:, 0] >= 20).all() and (a[:, 0] <= 25).all() and (a[:, 1] >= 10).all() and (a[:, 1] <= 15).all()
    on_pixel = (a == np.round(a)).all(axis=1) & (a[:, 0] <= 23) & (a[:, 1] <= 13)
    assert on_pixel.sum() >= 128
    assert not np.array_equal(a, b)  # another seed draws other interior pixels
