"""Guards: manifest/folder agreement, copies of real images among 'generated' ones, real-image AP numbers."""

import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instdiff_lib.evaluation.metrics.guards import (
    GuardError,
    assert_generated,
    check_manifest,
    real_image_copies,
    sanity_flag_real_like,
)


def photo_like(seed, w=80, h=60):
    """A smooth random RGB image with some texture (JPEG-friendly, unlike white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / (5 + 3 * c) + rng.uniform(0, 6)) * np.cos(yy / (7 + c)) for c in range(3)],
                   axis=-1)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def gen_folder(tmp_path):
    d = tmp_path / "gen"
    d.mkdir()
    rows = []
    for i in (1, 2, 3):
        p = d / f"{i:012d}.jpg"
        photo_like(i, 64, 64).save(p, quality=75)
        rows.append({"image_id": i, "file": p.name, "seed": i, "sha256": sha(p)})
    (d / "manifest-000-of-001.jsonl").write_text("")  # not an image: ignored
    return d, rows


# ---- manifest ---------------------------------------------------------------------------------------------


def test_manifest_ok_returns_files(gen_folder):
    d, rows = gen_folder
    files = check_manifest(d, rows)
    assert files == [(1, d / "000000000001.jpg"), (2, d / "000000000002.jpg"), (3, d / "000000000003.jpg")]


def test_manifest_missing_file(gen_folder):
    d, rows = gen_folder
    (d / "000000000002.jpg").unlink()
    with pytest.raises(GuardError, match=r"missing file \(1\): 000000000002.jpg"):
        check_manifest(d, rows)


def test_manifest_extra_file(gen_folder):
    d, rows = gen_folder
    photo_like(9).save(d / "000000000009.png")
    (d / "sub").mkdir()
    photo_like(10).save(d / "sub" / "x.jpg")
    with pytest.raises(GuardError, match="image file not in the manifest") as e:
        check_manifest(d, rows)
    assert "000000000009.png" in str(e.value) and "sub/x.jpg" in str(e.value)


def test_manifest_sha_mismatch_and_symlink(gen_folder, tmp_path):
    d, rows = gen_folder
    photo_like(42, 64, 64).save(d / "000000000003.jpg", quality=75)  # replaced after the manifest was written
    with pytest.raises(GuardError, match=r"sha256 mismatch \(1\): 000000000003.jpg"):
        check_manifest(d, rows)
    assert len(check_manifest(d, rows, verify_sha256=False)) == 3
    real = tmp_path / "real.jpg"
    photo_like(7, 64, 64).save(real)
    (d / "000000000001.jpg").unlink()
    os.symlink(real, d / "000000000001.jpg")  # the failure mode of the seed reproduction
    with pytest.raises(GuardError, match="symlink"):
        check_manifest(d, rows, verify_sha256=False)


def test_manifest_duplicates(gen_folder):
    d, rows = gen_folder
    with pytest.raises(GuardError, match="duplicate image_id"):
        check_manifest(d, rows + [dict(rows[0])])


# ---- copies of real images ----------------------------------------------------------------------------


def test_real_image_copies_are_flagged(tmp_path):
    real_dir, gen_dir = tmp_path / "real", tmp_path / "gen"
    real_dir.mkdir()
    gen_dir.mkdir()
    for i in range(4):
        photo_like(100 + i).save(real_dir / f"r{i}.jpg", quality=90)
    r0, r1, r2, r3 = (real_dir / f"r{i}.jpg" for i in range(4))

    shutil.copyfile(r0, gen_dir / "byte_copy.jpg")  # byte copy
    Image.open(r1).convert("RGB").save(gen_dir / "reencoded.png")  # PNG of the decoded JPEG
    Image.open(r2).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC).save(gen_dir / "resized.png")
    buf = io.BytesIO()  # resized and JPEG-recompressed: only the near-duplicate check can see it
    Image.open(r3).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=75)
    (gen_dir / "resized_recompressed.jpg").write_bytes(buf.getvalue())
    photo_like(999, 64, 64).save(gen_dir / "genuine.png")  # a different image
    gens = sorted(gen_dir.iterdir())

    hits = real_image_copies(gens, real_dir)
    got = {h[0].name: (h[1].name, h.kind) for h in hits}
    assert got == {"byte_copy.jpg": ("r0.jpg", "bytes"), "reencoded.png": ("r1.jpg", "pixels"),
                   "resized.png": ("r2.jpg", "resized:bicubic")}
    for g, r in hits:  # plain (gen, real) pairs
        assert g.parent == gen_dir and r.parent == real_dir

    near = {h[0].name: (h[1].name, h.kind) for h in real_image_copies(gens, [r0, r1, r2, r3], near=True)}
    assert near["resized_recompressed.jpg"] == ("r3.jpg", "near") and "genuine.png" not in near

    with pytest.raises(GuardError, match="3 of 5 'generated' images are copies") as e:
        assert_generated(gens, real_dir)
    assert "byte_copy.jpg" in str(e.value) and "reencoded.png" in str(e.value)
    assert assert_generated([gen_dir / "genuine.png"], real_dir, near=True) == 1


# ---- numbers ----------------------------------------------------------------------------------------------


def test_sanity_flag_real_like():
    assert "REAL COCO" in sanity_flag_real_like({"AP": 0.499, "AP50": 0.668}, "box")
    assert "REAL COCO" in sanity_flag_real_like({"AP": 50.2}, "bbox")
    assert "mask AP 40.8" in sanity_flag_real_like({"AP": 0.408}, "segm")
    assert sanity_flag_real_like({"AP_box": 0.388, "AP_mask": 0.409}, "mask") is not None
    assert sanity_flag_real_like({"AP": 0.388, "AP50": 0.554}, "box") is None  # the paper's generated row
    assert sanity_flag_real_like({"AP": 0.271}, "mask") is None
    assert sanity_flag_real_like({"AP": 0.499}, "real") is None  # the real-image control itself
    assert sanity_flag_real_like({"AP": float("nan")}, "box") is None


# ---- the protocol's guard: near copies refused, real images decoded once -------------------------------------------


def test_scoring_refuses_a_resized_resaved_real_photo(tmp_path):
    """A real photo resized to the 512-like GT frame and re-saved as JPEG is no byte, pixel or exact-resize copy;
    the scoring guard (near duplicates on, the protocol default) still refuses it."""
    import json

    from instdiff_lib.evaluation.scoring import score_setting

    real = tmp_path / "val2017"
    real.mkdir()
    for i in (1, 2):
        photo_like(i, 96, 72).save(real / f"{i:012d}.jpg", quality=90)
    gen = tmp_path / "gen"
    gen.mkdir()
    rows = []
    for i in (1, 2):
        p = gen / f"{i:012d}.jpg"
        src = real / f"{i:012d}.jpg" if i == 1 else None
        img = Image.open(src).resize((64, 64), Image.BILINEAR) if src else photo_like(99, 64, 64)
        img.save(p, quality=75)
        rows.append({"image_id": i, "file": p.name, "seed": 0, "sha256": sha(p), "setting": "box"})
    (gen / "manifest-000-of-001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 64}
                                         for i in (1, 2)], "annotations": [],
                              "categories": [{"id": 1, "name": "thing"}]}))
    with pytest.raises(GuardError, match=r"000000000001.jpg .*\(near\)"):
        score_setting("box", instances_json=gt, images_dir=gen, real_image_dir=real, yolo="yolov8n-seg.yaml",
                      progress=False)


def test_real_images_are_decoded_once(tmp_path, monkeypatch):
    from instdiff_lib.evaluation.metrics import guards

    real = tmp_path / "real"
    real.mkdir()
    for i in range(4):
        photo_like(10 + i, 96, 72).save(real / f"r{i}.jpg", quality=90)
    gens = []
    for i in range(2):
        gens.append(tmp_path / f"g{i}.png")
        photo_like(50 + i, 64, 64).save(gens[-1])
    decoded = []
    original = guards._describe
    monkeypatch.setattr(guards, "_describe", lambda p, *a, **k: decoded.append(Path(p)) or original(p, *a, **k))
    assert assert_generated(gens, real, near=True) == 2
    first = [p for p in decoded if p.parent == real]
    assert len(first) == 4
    decoded.clear()
    guards._RealIndex._memory.clear()  # a new process: the index on disk is enough
    assert assert_generated(gens, real, near=True) == 2
    assert [p for p in decoded if p.parent == real] == []  # no real image decoded again
