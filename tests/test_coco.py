"""Tests for instdiff_lib.datasets.coco: download (offline behaviour), 512² resizing and the §4.1 protocol items."""

import io
import json
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from instdiff_lib.datasets.coco import (
    COLORS,
    TEXTURES_COCO,
    DataError,
    download_coco,
    is_resized,
    protocol_items,
    resize_instances,
    resize_mask_nearest,
)
from instdiff_lib.layouts.layout import decode_mask, encode_mask, grounding_arrays
from instdiff_lib.datasets.shapes import make_shapes_dataset

# -----------------------------------------------------------------------------
# synthetic COCO files


def rect_mask(h, w, rows, cols):
    m = np.zeros((h, w), bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


def original_instances():
    """A 640 x 480 image with a polygon, a compressed RLE and a crowd (uncompressed) RLE annotation,
    plus a 320 x 320 image with one polygon."""
    rle = encode_mask(rect_mask(480, 640, (100, 200), (320, 480)))  # rows 100..199, cols 320..479
    crowd = {"size": [480, 640], "counts": [0] + [240] * 1280}  # column-major: every column's top 240 rows
    return {
        "info": {"description": "synthetic"},
        "licenses": [],
        "images": [
            {"id": 5, "file_name": "a.jpg", "width": 640, "height": 480},
            {"id": 2, "file_name": "b.jpg", "width": 320, "height": 320},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 19, "name": "horse"}],
        "annotations": [
            {"id": 11, "image_id": 5, "category_id": 1, "iscrowd": 0, "area": 9000.0,
             "bbox": [100, 60, 100, 90], "segmentation": [[100, 60, 200, 60, 200, 150, 100, 150]]},
            {"id": 12, "image_id": 5, "category_id": 19, "iscrowd": 0, "area": 16000,
             "bbox": [320, 100, 160, 100], "segmentation": rle, "extra": "kept"},
            {"id": 13, "image_id": 5, "category_id": 1, "iscrowd": 1, "area": 153600,
             "bbox": [0, 0, 640, 240], "segmentation": crowd},
            {"id": 14, "image_id": 2, "category_id": 19, "iscrowd": 0, "area": 100.0,
             "bbox": [10, 20, 10, 10], "segmentation": [[10, 20, 20, 20, 20, 30, 10, 30]]},
        ],
    }


@pytest.fixture()
def resized(tmp_path):
    src, dst = tmp_path / "instances.json", tmp_path / "instances_512.json"
    src.write_text(json.dumps(original_instances()))
    resize_instances(src, dst, size=512)
    return json.loads(dst.read_text()), dst


# -----------------------------------------------------------------------------
# resize_instances


def test_resize_scales_images_boxes_and_polygons(resized):
    data, _ = resized
    assert [(i["id"], i["width"], i["height"]) for i in data["images"]] == [(5, 512, 512), (2, 512, 512)]
    anns = {a["id"]: a for a in data["annotations"]}
    assert [a["id"] for a in data["annotations"]] == [11, 12, 13, 14]  # order kept
    # 640 x 480 -> 512 x 512: sx = 0.8, sy = 16 / 15
    assert anns[11]["bbox"] == pytest.approx([80, 64, 80, 96])
    assert anns[11]["segmentation"] == [pytest.approx([80, 64, 160, 64, 160, 160, 80, 160])]
    assert anns[12]["bbox"] == pytest.approx([256, 320 / 3, 128, 320 / 3])
    assert anns[13]["bbox"] == pytest.approx([0, 0, 512, 256])
    # 320 x 320 -> 512 x 512: s = 1.6
    assert anns[14]["bbox"] == pytest.approx([16, 32, 16, 16])
    assert anns[14]["segmentation"] == [pytest.approx([16, 32, 32, 32, 32, 48, 16, 48])]
    assert anns[12]["extra"] == "kept" and anns[13]["iscrowd"] == 1 and data["info"] == {"description": "synthetic"}


def test_resize_masks_and_recomputed_areas(resized):
    data, _ = resized
    anns = {a["id"]: a for a in data["annotations"]}
    # polygon rectangle [80, 160) x [64, 160): 80 * 96 pixels
    assert anns[11]["area"] == 80 * 96
    # RLE rows 100..199 -> output rows i with floor((i + .5) * 480 / 512) in [100, 199]: i = 107..212 (106 rows);
    # cols 320..479 -> floor((j + .5) * 1.25) in [320, 479]: j = 256..383 (128 cols)
    rle = anns[12]["segmentation"]
    assert isinstance(rle["counts"], str) and rle["size"] == [512, 512]
    np.testing.assert_array_equal(decode_mask(rle, 512, 512), rect_mask(512, 512, (107, 213), (256, 384)))
    assert anns[12]["area"] == 106 * 128
    # crowd: top 240 of 480 rows -> floor((i + .5) * 0.9375) < 240: i = 0..255
    crowd = anns[13]["segmentation"]
    np.testing.assert_array_equal(decode_mask(crowd, 512, 512), rect_mask(512, 512, (0, 256), (0, 512)))
    assert anns[13]["area"] == 256 * 512
    assert anns[14]["area"] == 16 * 16


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools 2.0.11 vs numpy 2
def test_resized_file_loads_in_pycocotools_and_area_equals_ann_to_mask(resized):
    _, path = resized
    gt = COCO(str(path))
    for ann in gt.loadAnns(gt.getAnnIds()):
        m = gt.annToMask(ann)
        assert m.shape == (512, 512) and m.sum() == ann["area"]


def test_nearest_resize_matches_pil_nearest():
    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(480, 640, 512, 512), (427, 640, 512, 512), (37, 53, 100, 20)]:
        m = rng.random((h, w)) < 0.3
        pil = np.array(Image.fromarray(m.astype(np.uint8) * 255).resize((ow, oh), Image.Resampling.NEAREST)) > 0
        np.testing.assert_array_equal(resize_mask_nearest(m, oh, ow), pil)


def test_is_resized(resized, tmp_path):
    data, path = resized
    assert is_resized(path) and is_resized(data, 512)
    assert not is_resized(original_instances()) and not is_resized(data, 256)
    bad = json.loads(json.dumps(data))
    bad["annotations"][1]["segmentation"]["size"] = [480, 640]
    assert not is_resized(bad)


# -----------------------------------------------------------------------------
# protocol_items


def protocol_files():
    """Instances + captions exercising every rule of spec §4.1."""
    poly = [[64, 48, 192, 48, 192, 144, 64, 144]]
    crowd = {"size": [480, 640], "counts": [0] + [240] * 1280}
    rle = encode_mask(rect_mask(480, 640, (10, 20), (30, 50)))
    images = [  # file order is not id order
        {"id": 30, "file_name": "030.jpg", "width": 512, "height": 512},
        {"id": 10, "file_name": "010.jpg", "width": 640, "height": 480},
        {"id": 40, "file_name": "040.jpg", "width": 512, "height": 512},
        {"id": 20, "file_name": "020.jpg", "width": 512, "height": 512},
    ]
    anns = [
        # image 10: ids 104, 18, 15 in file order (neither id nor area order), the last one a crowd RLE
        {"id": 104, "image_id": 10, "category_id": 1, "iscrowd": 0, "bbox": [64, 48, 128, 96], "segmentation": poly},
        {"id": 300, "image_id": 30, "category_id": 2, "iscrowd": 0, "bbox": [100, 200, 0, 50],
         "segmentation": [[100, 200, 100, 200, 100, 250]]},  # zero-width box, degenerate polygon
        {"id": 18, "image_id": 10, "category_id": 2, "iscrowd": 0, "bbox": [30, 10, 20, 10], "segmentation": rle},
        {"id": 301, "image_id": 30, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 512, 512],
         "segmentation": [[0, 0, 512, 0, 512, 512, 0, 512]]},
        {"id": 15, "image_id": 10, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 640, 240], "segmentation": crowd},
    ]
    # image 20: 31 annotations -> 30 conditioned, 31 named in the prompt
    anns += [
        {"id": 200 + k, "image_id": 20, "category_id": 1 + k % 2, "iscrowd": 0, "bbox": [k * 10, 5, 8, 8],
         "segmentation": [[k * 10, 5, k * 10 + 8, 5, k * 10 + 8, 13, k * 10, 13]]}
        for k in range(31)
    ]
    instances = {"images": images, "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "horse"}],
                 "annotations": anns}
    captions = {
        "images": images,
        "annotations": [  # for image 10 the first caption in FILE order is the one with the larger id
            {"id": 900, "image_id": 10, "caption": "A man riding a horse on a beach."},
            {"id": 5, "image_id": 10, "caption": "Not this one."},
            {"id": 7, "image_id": 20, "caption": "Many people."},
            {"id": 8, "image_id": 30, "caption": "A field."},
            {"id": 9, "image_id": 40, "caption": "An empty room."},
        ],
    }
    return instances, captions


def test_protocol_image_order_annotation_order_crowd_and_prompt():
    instances, captions = protocol_files()
    items = protocol_items(instances, captions)
    assert [it.image_id for it in items] == [10, 20, 30, 40]
    it = items[0]
    assert (it.file_name, it.width, it.height) == ("010.jpg", 640, 480)
    assert it.ann_ids == [104, 18, 15]  # file order, crowd kept
    assert it.phrases == ["person", "horse", "person"] and it.attributes is None
    assert it.prompt == "A man riding a horse on a beach.person, horse, person"  # no separator
    assert it.boxes[0] == pytest.approx((0.1, 0.1, 0.3, 0.3))  # [64, 48, 64 + 128, 48 + 96] / (640, 480)
    assert it.n_annotations == 3 and it.n_fixed_boxes == 0


def test_protocol_masks_are_decoded_in_the_image_frame():
    instances, captions = protocol_files()
    layout = protocol_items(instances, captions)[0].layout
    assert (layout.width, layout.height) == (640, 480)
    m_poly, m_rle, m_crowd = (inst.mask for inst in layout.instances)
    assert m_poly.shape == (480, 640) and m_poly[100, 100] and not m_poly[10, 10]
    np.testing.assert_array_equal(m_rle, rect_mask(480, 640, (10, 20), (30, 50)))
    np.testing.assert_array_equal(m_crowd, rect_mask(480, 640, (0, 240), (0, 640)))
    assert [inst.caption for inst in layout.instances] == ["person", "horse", "person"]
    assert [inst.category for inst in layout.instances] == ["person", "horse", "person"]
    g = grounding_arrays(layout, seed=0, seg_size=64)
    assert g["masks"].tolist()[:4] == [1, 1, 1, 0]
    assert g["boxes"][0] == pytest.approx([0.1, 0.1, 0.3, 0.3])


def test_protocol_caps_at_30_instances_but_names_all_in_the_prompt():
    instances, captions = protocol_files()
    it = protocol_items(instances, captions)[1]
    assert it.n_annotations == 31 and len(it.ann_ids) == 30 and len(it.layout.instances) == 30
    assert it.ann_ids == list(range(200, 230))
    assert it.prompt == "Many people." + ", ".join(["person", "horse"] * 15 + ["person"])
    assert len(protocol_items(instances, captions, max_instances=5)[1].layout.instances) == 5


@pytest.mark.parametrize("attribute, table", [("color", COLORS), ("texture", TEXTURES_COCO)])
def test_protocol_attributes_follow_ann_id_mod_8(attribute, table):
    instances, captions = protocol_files()
    it = protocol_items(instances, captions, attribute=attribute)[0]
    expected = [table[104 % 8], table[18 % 8], table[15 % 8]]  # 0, 2, 7
    assert it.attributes == expected
    assert it.phrases == [f"{expected[0]} person", f"{expected[1]} horse", f"{expected[2]} person"]
    assert it.prompt == "A man riding a horse on a beach." + ", ".join(it.phrases)
    if attribute == "color":
        assert it.phrases == ["black person", "red horse", "purple person"]
    else:
        assert it.phrases == ["rubber person", "metallic horse", "glass person"]


def test_protocol_degenerate_box_is_kept_fixed_and_counted():
    instances, captions = protocol_files()
    it = protocol_items(instances, captions)[2]
    assert it.ann_ids == [300, 301] and it.n_fixed_boxes == 1
    x0, y0, x1, y1 = it.boxes[0]
    assert (x0 * 512, y0 * 512, x1 * 512, y1 * 512) == pytest.approx((100, 200, 101, 250))  # 1 px wide
    layout = it.layout  # validates
    assert layout.instances[0].mask.sum() == 0  # a zero-area polygon: empty mask, the box still conditions
    assert layout.instances[1].box == pytest.approx((0, 0, 1, 1))


def test_protocol_image_without_annotations_and_without_captions_file():
    instances, captions = protocol_files()
    empty = protocol_items(instances, captions)[3]
    assert empty.prompt == "An empty room." and empty.layout.instances == [] and empty.n_annotations == 0
    no_caps = protocol_items(instances, None)
    assert no_caps[0].prompt == "person, horse, person" and no_caps[3].prompt == ""
    assert [it.image_id for it in protocol_items(instances, captions, image_ids=[30, 10])] == [30, 10]


def test_protocol_errors_are_explicit():
    instances, captions = protocol_files()
    captions["annotations"] = [c for c in captions["annotations"] if c["image_id"] != 20]
    with pytest.raises(DataError, match="image 20"):
        protocol_items(instances, captions)
    instances, captions = protocol_files()
    instances["annotations"][2]["segmentation"]["size"] = [512, 512]  # a resized RLE in an original file
    with pytest.raises(DataError, match="annotation 18"):
        protocol_items(instances, captions)[0].layout
    with pytest.raises(ValueError):
        protocol_items(instances, captions, attribute="size")


def test_protocol_reads_files_and_the_shapes_dataset(tmp_path):
    split = make_shapes_dataset(tmp_path, n_images=20, seed=5)
    items = protocol_items(split.instances_json, split.captions_json, attribute="color")
    caps = {c["image_id"]: c["caption"] for c in json.loads(split.captions_json.read_text())["annotations"]}
    assert [it.image_id for it in items] == list(range(1, 21))
    for it in items:
        layout = it.layout
        assert it.n_fixed_boxes == 0 and len(layout.instances) == it.n_annotations >= 1
        assert it.prompt == caps[it.image_id] + ", ".join(it.phrases)
        assert all(inst.mask.sum() > 0 for inst in layout.instances)


# -----------------------------------------------------------------------------
# download


def annotations_zip(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("annotations/instances_val2017.json", '{"images": []}')
        zf.writestr("annotations/captions_val2017.json", '{"annotations": []}')
        zf.writestr("annotations/person_keypoints_val2017.json", "{}")
    return path


def test_download_fails_fast_with_a_useful_message_when_offline(tmp_path):
    url = "http://does-not-exist.invalid/annotations_trainval2017.zip"
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        download_coco(tmp_path, parts=("annotations",), urls={"annotations": url}, progress=False)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert url in msg and "offline" in msg and str(tmp_path / "annotations_trainval2017.zip") in msg
    assert not list(tmp_path.iterdir())  # no half-written file left behind


def test_download_http_error_is_a_data_error(tmp_path, monkeypatch):
    def fake(request, timeout):  # e.g. a transparent proxy answering 404
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    with pytest.raises(DataError, match="HTTP 404"):
        download_coco(tmp_path, parts=("val2017",), progress=False)


def test_download_unzips_renames_and_skips_what_is_there(tmp_path):
    src = annotations_zip(tmp_path / "src" / "annotations_trainval2017.zip")
    root = tmp_path / "coco"
    out = download_coco(root, parts=("annotations",), urls={"annotations": src.as_uri()}, progress=False)
    assert out == {"annotations": root / "annotations"}
    assert json.loads((root / "annotations" / "instances_val2017.json").read_text()) == {"images": []}
    assert sorted(p.name for p in root.iterdir()) == ["annotations"]  # zip, .part and temp folder gone
    # present -> skipped, even with an unreachable URL
    download_coco(root, parts=("annotations",), urls={"annotations": "http://does-not-exist.invalid/a.zip"})


def test_download_merges_without_overwriting_and_uses_a_zip_put_there_by_hand(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2017.json").write_text("mine")
    annotations_zip(root / "annotations_trainval2017.zip")  # placed by hand: no download needed
    download_coco(root, parts=("annotations",), urls={"annotations": "http://does-not-exist.invalid/"
                                                                      "annotations_trainval2017.zip"})
    assert (root / "annotations" / "captions_val2017.json").read_text() == "mine"
    assert (root / "annotations" / "instances_val2017.json").exists()
    assert not (root / "annotations_trainval2017.zip").exists()


def test_download_resumes_a_partial_file_with_a_range_request(tmp_path, monkeypatch):
    payload = annotations_zip(tmp_path / "full.zip").read_bytes()
    root = tmp_path / "coco"
    root.mkdir()
    half = len(payload) // 2
    (root / "annotations_trainval2017.zip.part").write_bytes(payload[:half])
    seen = {}

    class Partial(io.BytesIO):
        status = 206
        headers = {"Content-Length": str(len(payload) - half)}

    def fake(request, timeout):
        seen["range"] = request.get_header("Range")
        return Partial(payload[half:])

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    download_coco(root, parts=("annotations",), progress=False)
    assert seen["range"] == f"bytes={half}-"
    assert (root / "annotations" / "captions_val2017.json").read_text() == '{"annotations": []}'

