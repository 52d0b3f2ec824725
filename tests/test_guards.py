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


# ---- mutation-testing additions: exact messages, every problem kind, thresholds, the real-image index ----------


def test_manifest_reports_every_kind_exactly(tmp_path):
    d = tmp_path / "gen"
    d.mkdir()
    for name in ("a.png", "b.png", "c.PNG", "d.png"):
        photo_like(len(name) + ord(name[0]), 16, 16).save(d / name, format="PNG")
    photo_like(5, 16, 16).save(tmp_path / "out.png")
    os.symlink(d / "a.png", d / "link.png")
    os.symlink(tmp_path / "nowhere.jpg", d / "dangle.jpg")  # dangling and unlisted: still an image entry
    (d / "notes.txt").write_text("not an image")
    (d / "dir.png").mkdir()  # a folder named like an image is not a file
    rows = [{"image_id": 1, "file_name": "a.png"},
            {"image_id": 2, "path": "b.png"},
            {"file": "a.png"},
            {"image_id": 2, "file": "missing.png"},
            {"image_id": 3, "file": "../out.png"},
            {"image_id": 4, "file": "link.png"},
            {"image_id": 6, "file": "d.png", "sha256": "0" * 64}]
    with pytest.raises(GuardError) as e:
        check_manifest(d, rows)
    assert str(e.value) == "\n".join([
        f"{d}: files do not match the manifest (7 rows)",
        "  row without image_id (1): a.png",
        "  duplicate file in manifest (1): a.png",
        "  duplicate image_id in manifest (1): 2",
        "  missing file (1): missing.png",
        "  path outside the folder (1): ../out.png",
        "  symlink (refused: the file must be in the folder itself) (1): link.png",
        "  sha256 mismatch (1): d.png",
        "  image file not in the manifest (2): c.PNG, dangle.jpg",
    ])


def test_manifest_file_keys_and_normalised_duplicates(tmp_path):
    d = tmp_path / "gen"
    d.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        photo_like(ord(name[0]), 16, 16).save(d / name)
    rows = [{"image_id": 7, "file_name": "a.png"}, {"image_id": 8, "path": "b.png"},
            {"image_id": 9, "file": "c.png", "sha256": sha(d / "c.png")}]
    assert check_manifest(d, rows) == [(7, d / "a.png"), (8, d / "b.png"), (9, d / "c.png")]
    with pytest.raises(GuardError) as e:
        check_manifest(d, rows + [{"image_id": 10, "file": "./a.png"}])
    assert str(e.value).splitlines()[1:] == ["  duplicate file in manifest (1): ./a.png"]
    with pytest.raises(GuardError) as e:
        check_manifest(d, [{"image_id": 1, "name": "a.png"}])
    assert str(e.value) == "manifest row has no 'file' / 'file_name' / 'path': {'image_id': 1, 'name': 'a.png'}"
    with pytest.raises(GuardError) as e:
        check_manifest(tmp_path / "nope", [])
    assert str(e.value) == f"{tmp_path / 'nope'} is not a directory"


def test_manifest_lists_ten_offenders_then_counts(tmp_path):
    rows = [{"image_id": i, "file": f"m{i:02d}.png"} for i in range(12)]
    with pytest.raises(GuardError) as e:
        check_manifest(tmp_path, rows)
    listed = ", ".join(f"m{i:02d}.png" for i in range(10))
    assert str(e.value).splitlines()[1] == f"  missing file (12): {listed} ... (+2 more)"
    with pytest.raises(GuardError) as e:
        check_manifest(tmp_path, rows[:10])
    assert str(e.value).splitlines()[1] == f"  missing file (10): {listed}"


def grey(path, value, size=(32, 32)):
    Image.new("RGB", size, (value, value, value)).save(path, format="PNG")
    return path


def test_near_duplicate_threshold_and_nearest_real(tmp_path):
    real = [grey(tmp_path / "r100.png", 100), grey(tmp_path / "r150.png", 150)]
    g106, g107, g104 = (grey(tmp_path / f"g{v}.png", v) for v in (106, 107, 104))
    # thumbnails of flat images differ by exactly |a - b| grey levels: 6 <= 6.0 is a near copy, 7 is not
    hits = real_image_copies([g106, g107, g104], real, near=True)
    assert [(h.gen.name, h.real.name, h.kind) for h in hits] == [("g106.png", "r100.png", "near"),
                                                                   ("g104.png", "r100.png", "near")]
    assert real_image_copies([g106, g107, g104], real) == []  # near is off by default
    assert [h.gen.name for h in real_image_copies([g106, g107], real, near=True, near_tol=7.0)] == ["g106.png",
                                                                                                   "g107.png"]
    assert real_image_copies([g106], real, near=True, near_tol=5.9) == []


def test_resize_kinds_and_options(tmp_path):
    src = tmp_path / "real.png"
    photo_like(3, 80, 60).save(src)
    rgb = Image.open(src).convert("RGB")
    gens = {}
    for name in ("bicubic", "bilinear", "lanczos", "nearest", "box"):
        gens[name] = tmp_path / f"g_{name}.png"
        rgb.resize((40, 40), getattr(Image.Resampling, name.upper())).save(gens[name])
    small = tmp_path / "g_small.png"  # a second generated size
    rgb.resize((20, 30), Image.Resampling.BILINEAR).save(small)
    allg = list(gens.values()) + [small]
    got = {h.gen.name: h.kind for h in real_image_copies(allg, [src])}
    assert got == {"g_bicubic.png": "resized:bicubic", "g_bilinear.png": "resized:bilinear",
                   "g_lanczos.png": "resized:lanczos", "g_small.png": "resized:bilinear"}
    got = {h.gen.name: h.kind for h in real_image_copies(allg, [src], resamples=("nearest", "box"))}
    assert got == {"g_nearest.png": "resized:nearest", "g_box.png": "resized:box"}
    assert real_image_copies(allg, [src], resized=False) == []
    with pytest.raises(ValueError) as e:
        real_image_copies(allg, [src], resamples=("hamming",))
    assert str(e.value) == ("unknown resample 'hamming'; choose from "
                            "('bicubic', 'bilinear', 'lanczos', 'nearest', 'box')")


def test_real_folder_expansion_and_edge_cases(tmp_path):
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    photo_like(1, 24, 24).save(real / "sub" / "UP.JPG", format="JPEG")
    (real / "notes.txt").write_text("same text")
    (real / "broken.png").write_bytes(b"not really a png")
    gen = tmp_path / "gen"
    gen.mkdir()
    shutil.copyfile(real / "sub" / "UP.JPG", gen / "copy.jpg")
    shutil.copyfile(real / "notes.txt", gen / "notes.png")  # a .txt real file is not part of the real set
    shutil.copyfile(real / "broken.png", gen / "broken.png")  # undecodable: still a byte copy
    (gen / "other.png").write_bytes(b"another undecodable file")
    photo_like(2, 24, 24).save(gen / "genuine.png")
    gens = [gen / n for n in ("copy.jpg", "notes.png", "broken.png", "other.png", "genuine.png")]
    hits = real_image_copies(gens, real, near=True)
    assert [(h.gen, h.real, h.kind) for h in hits] == [(gen / "copy.jpg", real / "sub" / "UP.JPG", "bytes"),
                                                      (gen / "broken.png", real / "broken.png", "bytes")]
    assert hits[0] == (gen / "copy.jpg", real / "sub" / "UP.JPG")
    assert repr(hits[0]) == f"CopyMatch({gen / 'copy.jpg'} == {real / 'sub' / 'UP.JPG'}, kind='bytes')"
    assert real_image_copies([], real) == [] and real_image_copies(gens, []) == []
    assert real_image_copies([gen / "genuine.png"], [real / "broken.png"], near=True) == []  # no real thumbnail
    with pytest.raises(GuardError) as e:
        real_image_copies(gens, tmp_path / "missing")
    assert str(e.value) == f"{tmp_path / 'missing'} is not a directory"
    with pytest.raises(GuardError) as e:
        assert_generated(iter(gens[:2]), real)
    assert str(e.value) == (f"1 of 2 'generated' images are copies of real images: "
                            f"{gen / 'copy.jpg'} == {real / 'sub' / 'UP.JPG'} (bytes)")


def test_real_index_is_refreshed_and_kept(tmp_path, monkeypatch):
    import pickle

    import instdiff_lib.results
    from instdiff_lib.evaluation.metrics import guards

    monkeypatch.setattr(instdiff_lib.results, "project_root", lambda: tmp_path)
    monkeypatch.setattr(guards._RealIndex, "_memory", {})
    real = tmp_path / "real"
    real.mkdir()
    r = real / "r.png"
    photo_like(4, 48, 36).save(r)
    folder = str(real.resolve())
    cache = tmp_path / ".cache" / "real_index" / f"{hashlib.sha256(folder.encode()).hexdigest()[:16]}.pkl"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"broken pickle")  # a broken cache is rebuilt, not fatal
    g1 = tmp_path / "g1.png"
    Image.open(r).convert("RGB").resize((24, 24), Image.Resampling.BICUBIC).save(g1)
    assert real_image_copies([g1], real, resized=False) == []
    (entry,) = pickle.loads(cache.read_bytes()).values()
    assert entry["resized"] == {}  # resized copies are only computed when asked for
    assert [h.kind for h in real_image_copies([g1], real)] == ["resized:bicubic"]
    entries = pickle.loads(cache.read_bytes())
    (key, entry), = entries.items()
    st = r.stat()
    assert key == f"{r.resolve()}|{st.st_size}|{st.st_mtime_ns}" and entry["size"] == (48, 36)
    assert set(entry["resized"]) == {"24x24:bicubic", "24x24:bilinear", "24x24:lanczos"}
    assert list(cache.parent.iterdir()) == [cache]  # the temporary file was renamed
    # a new generated size: the cached entry is extended (not reused as is)
    g2 = tmp_path / "g2.png"
    Image.open(r).convert("RGB").resize((12, 16), Image.Resampling.LANCZOS).save(g2)
    guards._RealIndex._memory.clear()
    assert [h.kind for h in real_image_copies([g2], real)] == ["resized:lanczos"]
    (entry,) = pickle.loads(cache.read_bytes()).values()
    assert set(entry["resized"]) == {f"{s}:{n}" for s in ("24x24", "12x16") for n in ("bicubic", "bilinear", "lanczos")}
    # the real file changes: its new content is what is compared
    photo_like(5, 40, 40).save(r)
    g3 = tmp_path / "g3.png"
    shutil.copyfile(r, g3)
    assert [h.kind for h in real_image_copies([g3], real)] == ["bytes"]


def test_sanity_flag_messages_and_bounds():
    tail = (". These are the published YOLOv8m-seg numbers on REAL COCO photos: check that the detector scored the "
            "generated images (check_manifest, assert_generated).")
    assert sanity_flag_real_like({"AP": 0.499, "AP50": 0.668}, "box") == (
        "WARNING (box): box AP 49.9 ~ real-image 49.9-50.2; box AP50 66.8 ~ real-image 66.7-66.8" + tail)
    assert sanity_flag_real_like({"AP_mask": 0.408, "AP50_mask": 63.5, "AP_box": 0.30}, "other") == (
        "WARNING (other): mask AP 40.8 ~ real-image 40.8; mask AP50 63.5 ~ real-image 63.5" + tail)
    assert sanity_flag_real_like({"AP_box": 50.0, "AP50_box": 0.5}, "mask") == (
        "WARNING (mask): box AP 50.0 ~ real-image 49.9-50.2" + tail)
    assert sanity_flag_real_like({"AP_box": None, "AP50_box": float("nan"), "AP": 0.499}, "box") == (
        "WARNING (box): box AP 49.9 ~ real-image 49.9-50.2" + tail)  # missing values skipped, later ones checked
    assert sanity_flag_real_like({"AP_box": 0.499}, "real") is None  # the control is never flagged
    assert sanity_flag_real_like({"AP": 0.30, "AP50": 0.667}, "box") is None  # only AP50 on the real number
    # AP within tol=0.5 points of [49.9, 50.2] (box) inclusive
    assert sanity_flag_real_like({"AP": 49.4}, "box") is not None
    assert sanity_flag_real_like({"AP": 50.7}, "box") is not None
    assert sanity_flag_real_like({"AP": 49.3}, "box") is None
    assert sanity_flag_real_like({"AP": 50.8}, "box") is None
    assert sanity_flag_real_like({"AP": 48.9}, "box", tol=1.0) is not None
    assert sanity_flag_real_like({"AP": 0.408}, "mask") is not None and sanity_flag_real_like({"AP": 39.2}, "segm") is None


def test_fraction_or_percent():
    from instdiff_lib.evaluation.metrics.guards import _pct

    assert _pct(1.0) == 100.0 and _pct(0.5) == 50.0 and _pct(1.5) == 1.5 and _pct(49.9) == 49.9


def test_same_pixel_bytes_in_another_shape_is_no_copy(tmp_path):
    arr = np.arange(2 * 8 * 3, dtype=np.uint8).reshape(2, 8, 3) * 5
    Image.fromarray(arr).save(tmp_path / "real.png")  # 8 x 2
    Image.fromarray(arr.reshape(4, 4, 3)).save(tmp_path / "gen.png")  # 4 x 4, the same bytes row by row
    assert real_image_copies([tmp_path / "gen.png"], [tmp_path / "real.png"], resized=False) == []
    assert real_image_copies([tmp_path / "gen.png"], [tmp_path / "real.png"]) == []


def test_alpha_or_grey_resave_of_a_real_image_is_a_pixel_copy(tmp_path):
    g = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (16, 1))  # 24 x 16 grey ramp
    Image.fromarray(np.stack([g] * 3, axis=-1)).save(tmp_path / "real.png")
    Image.fromarray(g).save(tmp_path / "grey.png")  # mode L
    Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)])).save(tmp_path / "alpha.png")  # mode RGBA
    hits = real_image_copies([tmp_path / "grey.png", tmp_path / "alpha.png"], [tmp_path / "real.png"])
    assert [(h.gen.name, h.kind) for h in hits] == [("grey.png", "pixels"), ("alpha.png", "pixels")]


def test_near_thumbnails_are_box_averages(tmp_path):
    # real: 64 x 64, columns 0,0,200,200 repeating; its 2x box average is 32 x 32 with columns 0,200 alternating,
    # which is exactly the generated image: distance 0 (a bilinear or bicubic thumbnail would be tens of levels off)
    cols = np.array([0, 0, 200, 200] * 16, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(cols, (64, 1))] * 3, axis=-1)).save(tmp_path / "real.png")
    half = np.array([0, 200] * 16, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(half, (32, 1))] * 3, axis=-1)).save(tmp_path / "gen.png")
    hits = real_image_copies([tmp_path / "gen.png"], [tmp_path / "real.png"], near=True, near_tol=1.0)
    assert [(h.real.name, h.kind) for h in hits] == [("real.png", "near")]


def test_resized_copies_of_two_real_sizes(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    photo_like(21, 40, 30).save(a)
    photo_like(22, 30, 40).save(b)
    ga, gb = tmp_path / "ga.png", tmp_path / "gb.png"
    Image.open(a).convert("RGB").resize((30, 40), Image.Resampling.BILINEAR).save(ga)  # a at b's size
    Image.open(b).convert("RGB").resize((40, 30), Image.Resampling.BILINEAR).save(gb)  # b at a's size
    hits = real_image_copies([ga, gb], [a, b])
    assert [(h.gen.name, h.real.name, h.kind) for h in hits] == [("ga.png", "a.png", "resized:bilinear"),
                                                                 ("gb.png", "b.png", "resized:bilinear")]


def test_nothing_to_compare_decodes_nothing(tmp_path, monkeypatch):
    from instdiff_lib.evaluation.metrics import guards

    r, g = tmp_path / "r.png", tmp_path / "g.png"
    photo_like(31, 16, 16).save(r)
    shutil.copyfile(r, g)
    decoded = []
    monkeypatch.setattr(guards, "_describe", lambda p, *a, **k: decoded.append(p))
    assert real_image_copies([], [r]) == [] and real_image_copies([g], []) == []
    assert decoded == []


def test_real_index_folder_is_created(tmp_path, monkeypatch):
    import pickle

    import instdiff_lib.results
    from instdiff_lib.evaluation.metrics import guards

    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setattr(instdiff_lib.results, "project_root", lambda: root)
    monkeypatch.setattr(guards._RealIndex, "_memory", {})
    r = tmp_path / "r.png"
    photo_like(41, 16, 16).save(r)
    assert real_image_copies([r], [r])[0].kind == "bytes"
    (cache,) = (root / ".cache" / "real_index").iterdir()
    (entry,) = pickle.loads(cache.read_bytes()).values()
    assert cache.suffix == ".pkl" and entry["size"] == (16, 16)
    assert entry["resized"] == {}  # no resized copy at the real image's own size
    other = tmp_path / "other"  # another real folder: its own index file, holding only its own images
    other.mkdir()
    photo_like(42, 16, 16).save(other / "s.png")
    assert real_image_copies([r], other) == []
    assert len(list((root / ".cache" / "real_index").iterdir())) == 2
    assert len(pickle.loads(cache.read_bytes())) == 1
    # within a process the index is kept in memory: the file gone, the real image is still not decoded again
    cache.unlink()
    decoded = []
    original = guards._describe
    monkeypatch.setattr(guards, "_describe", lambda p, *a, **k: decoded.append(Path(p)) or original(p, *a, **k))
    g = tmp_path / "g.png"
    shutil.copyfile(r, g)
    assert [(h.real, h.kind) for h in real_image_copies([g], [r])] == [(r, "bytes")]
    assert decoded == [g]
    assert not cache.exists()  # nothing new was computed: the index is not rewritten


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
