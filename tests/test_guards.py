"""Guards: manifest/folder agreement, copies of real images among 'generated' ones, real-image AP numbers."""

import hashlib
import io
import os
import shutil

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
