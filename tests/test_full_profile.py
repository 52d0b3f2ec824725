"""The full profile's first real run: assets and their preflight, the rehearsal's params and synthetic data, and the
fixes found by trying it as a new user would (YOLO path, max_batch, ablations in the array, instance-count bins,
JPEG everywhere, documented commands). CPU, seconds each, except the generation-array test (smoke world, ~1 min)."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from instdiff_lib.report import assets as A
from instdiff_lib.report.runner import NOTEBOOKS, effective_params, load_params, notebook_parameters, notebook_path
from instdiff_lib.results import project_root

ROOT = project_root()
GENERATING = ("00_setup_check", "01_demos", "10_location_formats", "11_attribute_binding", "20_ablations",
              "30_extension")


# ---- item 10: every documented `instdiff` command parses ----------------------------------------------------------
def _documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every `instdiff ...` line of the README's code blocks, the Makefile and the params files'
    comments (placeholders such as '...' or '<...>' skipped)."""
    out = []
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            m = re.match(r"^(?:\.venv/bin/|\$\(BIN\)/)?instdiff\s+(.*)$", line)
            if m:
                out.append(("README.md", m.group(1)))
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^\t\$\(BIN\)/instdiff\s+(.*)$", line)
        if m:
            out.append(("Makefile", m.group(1)))
    for p in sorted((ROOT / "jobs" / "params").rglob("*.yaml")):
        for comment in re.findall(r"#(.*)$", p.read_text(), re.M):
            for m in re.finditer(r"instdiff ((?:[a-z][\w-]*)(?: [^,;()]*?)?)(?=$|[,;()]| then )", comment):
                out.append((str(p.relative_to(ROOT)), m.group(1).strip()))
    return [(w, c) for w, c in out if "..." not in c and "<" not in c and "$" not in c]


def test_documented_commands_parse():
    from instdiff_lib.cli import build_parser

    commands = _documented_commands()
    assert len(commands) >= 10 and any(w.startswith("jobs/params") for w, _ in commands)
    parser = build_parser()
    for where, cmd in commands:
        try:
            parser.parse_args(shlex.split(cmd))
        except SystemExit:
            pytest.fail(f"{where}: `instdiff {cmd}` does not parse")


def test_eval_generate_needs_a_model(capsys):
    from instdiff_lib.cli import build_parser

    with pytest.raises(SystemExit):  # no silent random `tiny` preset
        build_parser().parse_args(["eval", "generate", "--setting", "box", "--instances", "x.json", "--out", "o"])
    assert "--model" in capsys.readouterr().err


# ---- item 2: paths in the params are anchored at the project root -----------------------------------------------
def _coco_tree(root: Path) -> Path:
    ann = root / "annotations"
    ann.mkdir(parents=True)
    (root / "val2017").mkdir()
    for name in ("instances_val2017.json", "captions_val2017.json", "instances_val2017_512.json"):
        (ann / name).write_text("{}")
    return root


def test_yolo_and_detector_paths_are_anchored_at_the_project_root(tmp_path, monkeypatch):
    from instdiff_lib.report.context import NotebookRun
    from instdiff_lib.report.sections import world_of

    params = {**effective_params("10_location_formats", "full"), "COCO_ROOT": str(_coco_tree(tmp_path / "coco")),
              "YOLO": "weights/yolov8m-seg.pt", "MAX_BATCH": 6}
    monkeypatch.chdir(ROOT / "notebooks")  # where papermill and JupyterLab run the notebooks
    world = world_of(NotebookRun("10_location_formats", params))
    assert Path(world.yolo) == ROOT / "weights" / "yolov8m-seg.pt"
    assert world.max_batch == 6
    assert world.clip_spec["cache_dir"] == str(A.hf_cache()) and world.fid_weights == A.inception_path()


# ---- item 4: max_batch from every entry point, else from free GPU memory ------------------------------------------
def test_max_batch_for():
    from instdiff_lib.sampling.pipeline import max_batch_for

    assert max_batch_for(10 * 2**30, 2**30, 62) == 8  # 80% of 10 GiB at 1 GiB per sample
    assert max_batch_for(100 * 2**30, 2**30, 62) is None  # all fit: one call
    assert max_batch_for(2**20, 2**30, 62) == 1


@pytest.fixture(scope="module")
def tiny_pipe():
    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline
    from instdiff_lib.weights.checkpoint import build_components

    return InstanceDiffusionPipeline(build_components("tiny"))


def test_max_batch_is_chosen_from_free_gpu_memory(tiny_pipe, monkeypatch):
    pipe = tiny_pipe
    assert pipe.resolve_max_batch(62) is None  # CPU: one batch
    monkeypatch.setattr(pipe, "device", torch.device("cuda"))
    monkeypatch.setattr(pipe, "_cuda_memory", lambda: (5 * 2**30, 2**30))
    assert pipe.resolve_max_batch(62) == 4
    assert pipe.resolve_max_batch(62, max_batch=7) == 7  # an explicit value wins
    monkeypatch.setattr(pipe, "max_batch", 3)
    assert pipe.resolve_max_batch(62) == 3


def test_max_batch_reaches_every_entry_point(tiny_pipe, tmp_path, monkeypatch):
    from instdiff_lib.cli import build_parser
    from instdiff_lib.datasets.coco import protocol_items
    from instdiff_lib.datasets.shapes import make_shapes_dataset
    from instdiff_lib.evaluation.generation import generate_eval

    parser = build_parser()
    assert parser.parse_args(["generate", "l.json", "--out", "o", "--max-batch", "3"]).max_batch == 3
    assert parser.parse_args(["eval", "generate", "--setting", "box", "--instances", "i.json", "--out", "o",
                              "--model", "m", "--max-batch", "5"]).max_batch == 5
    for name in GENERATING:  # the params files (every profile) reach the World through MAX_BATCH
        assert "MAX_BATCH" in notebook_parameters(notebook_path(name))
        for profile in ("smoke", "full"):
            p = tmp_path / f"{name}-{profile}.yaml"
            p.write_text(yaml.safe_dump({**load_params(name, profile), "MAX_BATCH": 4}))
            assert load_params(name, profile, p)["MAX_BATCH"] == 4

    split = make_shapes_dataset(tmp_path / "shapes", 1, seed=0, size=64)
    items = protocol_items(split.instances_json, split.captions_json)
    seen = []
    original = tiny_pipe.sampler.sample_many
    monkeypatch.setattr(tiny_pipe.sampler, "sample_many",
                        lambda *a, **k: seen.append(k["max_batch"]) or original(*a, **k))
    generate_eval(items, tmp_path / "gen", tiny_pipe, "box", steps=2, mis=0.5, max_batch=2, progress=False)
    assert seen == [2]


# ---- item 5: the ablations come from the generation array; the notebook only scores --------------------------------
@pytest.mark.slow
def test_generation_array_generates_the_ablations(tmp_path):
    from instdiff_lib.evaluation.experiments import generate_variant
    from instdiff_lib.report.context import NotebookRun
    from instdiff_lib.report.runner import GENERATION_NOTEBOOKS, generate_shard, generation_runs
    from instdiff_lib.report.sections import out_root, world_of

    assert "20_ablations" in GENERATION_NOTEBOOKS
    small = {"N_IMAGES": 1, "SEEDS": [0], "STEPS": 2, "N_VAL": 6, "OUT_DIR": str(tmp_path / "eval"),
             "ABLATE": {"mis": [0.36, 0.5], "alpha": [1.0, 0.0]}}
    pdir = tmp_path / "params"
    pdir.mkdir()
    for name in GENERATION_NOTEBOOKS:
        declared = notebook_parameters(notebook_path(name))
        (pdir / f"{name}.yaml").write_text(yaml.safe_dump(
            {**load_params(name, "smoke"), **{k: v for k, v in small.items() if k in declared}}))
    counts = [generate_shard("smoke", (i, 2), progress=False, params_dir=pdir) for i in range(2)]
    assert sum(c["generated"] for c in counts) > 0
    run = NotebookRun("20_ablations", effective_params("20_ablations", "smoke", pdir / "20_ablations.yaml"))
    runs = generation_runs(run)
    assert {v.name for v, _ in runs} == {"base", "mis=0.5", "alpha=0.0"}  # the base value of each group: base's images
    world = world_of(run)
    for variant, seed in runs:  # what the notebook does first: every image is there already
        s = generate_variant(world, variant, seed, out_root(run), 1)
        assert s.n_generated == 0 and s.n_skipped_existing == 1, variant.name


# ---- item 6: every image falls in one instance-count bin ----------------------------------------------------------
class _Item:
    def __init__(self, image_id, n):
        self.image_id, self.boxes = image_id, [(0.1, 0.1, 0.2, 0.2)] * n


class _World:
    def __init__(self, counts):
        self._items = [_Item(i, n) for i, n in counts.items()]

    def items(self, attribute=None, limit=None):
        return self._items[:limit] if limit else self._items


def test_instance_count_bins_cover_every_image():
    from instdiff_lib.evaluation.experiments import RunRecord, Variant, by_instance_count

    counts = {1: 0, 2: 2, 3: 4, 4: 7, 5: 12, 6: 30, 7: 1}  # 0 and more than 8 instances are common in COCO
    world = _World(counts)
    per_image = {str(i): 0.1 * i for i, n in counts.items() if n}  # no mask IoU without an instance
    recs = [RunRecord(Variant("base", "mask"), s, "f", {}, len(counts), 0, 0, 0.0, per_image, list(counts))
            for s in (0, 1)]
    bins = by_instance_count(recs, world)
    assert list(bins) == ["0", "1-2", "3-4", "5-8", "9+"]
    assert sum(b["n_images"] for b in bins.values()) == 2 * len(counts)  # every image of every seed, once
    assert bins["0"]["n_images"] == 2 and bins["0"]["n_without_iou"] == 2 and np.isnan(bins["0"]["mean"])
    assert bins["9+"]["n_images"] == 4 and bins["9+"]["mean"] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="outside every bin"):
        by_instance_count(recs, world, bins=((1, 8),))


# ---- item 7: one image format everywhere (the official JPEG, quality 75) -----------------------------------------
def test_protocol_images_are_jpeg_quality_75(tmp_path):
    from instdiff_lib.cli import build_parser
    from instdiff_lib.evaluation.experiments import Variant, generate_variant
    from instdiff_lib.evaluation.generation import IMAGE_FORMAT, JPEG_QUALITY, read_manifest
    from instdiff_lib.evaluation.world import shapes_world

    assert (IMAGE_FORMAT, JPEG_QUALITY) == ("jpg", 75)  # official eval_local.py: <file_name>.jpg, PIL's default
    args = build_parser().parse_args(["eval", "generate", "--setting", "box", "--instances", "i", "--out", "o",
                                      "--model", "m"])
    assert (args.format, args.quality) == (IMAGE_FORMAT, JPEG_QUALITY)
    world = shapes_world(n_val=2, data_root=tmp_path / "shapes")
    s = generate_variant(world, Variant("box", "box", steps=1, mis=0.0), 0, tmp_path / "eval", 1)
    (row,) = read_manifest(s.out_dir)
    path = s.out_dir / row["file"]
    ref = io.BytesIO()
    with Image.open(path) as im:
        assert path.suffix == ".jpg" and im.format == "JPEG"
        im.convert("RGB").save(ref, format="JPEG", quality=75)
        tables = im.quantization
    assert Image.open(ref).quantization == tables  # quality 75's tables


# ---- item 3: assets, preflight, download -------------------------------------------------------------------------
@pytest.fixture
def asset_home(tmp_path, monkeypatch):
    """The fixed asset locations moved under tmp_path, and params files pointing MODEL/COCO/YOLO there too."""
    monkeypatch.setattr(A, "CHECKPOINT", str(tmp_path / "w" / "instancediffusion_sd15.pth"))
    monkeypatch.setattr(A, "HF_CACHE", str(tmp_path / "w" / "hf"))
    monkeypatch.setattr(A, "TORCH_HOME", str(tmp_path / "w" / "torch"))
    monkeypatch.delenv(A.REHEARSAL_ENV, raising=False)
    pdir = tmp_path / "params"
    pdir.mkdir()
    for name in NOTEBOOKS:
        p = load_params(name, "full")
        for key, rel in (("MODEL", "w/instdiff-sd15"), ("COCO_ROOT", "coco"), ("YOLO", "w/yolov8m-seg.pt")):
            if key in p:
                p[key] = str(tmp_path / rel)
        (pdir / f"{name}.yaml").write_text(yaml.safe_dump(p))
    return tmp_path, pdir


def test_preflight_lists_every_missing_asset_with_its_fetch_command(asset_home):
    home, pdir = asset_home
    t = time.perf_counter()
    with pytest.raises(A.AssetsMissing) as err:
        A.preflight("full", pdir)
    assert time.perf_counter() - t < 60
    msg = str(err.value)
    assert msg.startswith("7 of 7 assets")
    for key in ("checkpoint", "coco", "yolo", "clip", "inception", "detector"):
        assert f"instdiff download --only {key}" in msg, key
    assert "instdiff convert" in msg and str(home / "coco") in msg
    assert A.preflight("smoke") == []  # the smoke profile reads committed files only


def test_synthetic_assets_count_as_missing_outside_a_rehearsal(asset_home, monkeypatch):
    home, pdir = asset_home
    yolo = home / "w" / "yolov8m-seg.pt"
    yolo.parent.mkdir(parents=True)
    with zipfile.ZipFile(yolo, "w") as z:
        z.writestr("archive/data.pkl", b"x")
    (asset,) = [a for a in A.full_assets(A.profile_params("full", pdir)) if a.key == "yolo"]
    assert asset.problem() is None
    A.mark_synthetic(yolo)
    assert "synthetic" in asset.problem()
    monkeypatch.setenv(A.REHEARSAL_ENV, "1")
    assert asset.problem() is None
    monkeypatch.delenv(A.REHEARSAL_ENV)
    yolo.write_bytes(yolo.read_bytes() + b"\0")  # replaced by another file: no longer the synthetic one
    assert A.synthetic_info(yolo) is None


def test_download_links_existing_copies_and_fails_fast_offline(asset_home, monkeypatch, capsys):
    import huggingface_hub.constants as hf_constants

    home, pdir = asset_home
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    have = home / "my-copies"
    (have / "hub" / "checkpoints").mkdir(parents=True)
    with zipfile.ZipFile(have / "yolov8m-seg.pt", "w") as z:
        z.writestr("archive/data.pkl", b"x")
    torch.save({"Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 1, 1), "fc.weight": torch.zeros(1)},
               have / "hub" / "checkpoints" / A.inception_path().name)
    t = time.perf_counter()
    failed = A.download(["yolo", "inception", "clip"], sources=[have], params_dir=pdir)
    assert time.perf_counter() - t < 30
    out = capsys.readouterr().out
    assert (home / "w" / "yolov8m-seg.pt").is_symlink() and "linked" in out
    assert A.inception_path().resolve() == (have / "hub" / "checkpoints" / A.inception_path().name).resolve()
    assert [a.key for a, _ in failed] == ["clip"] and "HF_HUB_OFFLINE" in failed[0][1]


@pytest.mark.slow
def test_make_report_full_without_assets_fails_fast_naming_each_asset():
    """`make report PROFILE=full` (= `instdiff report all --profile full`) on a checkout without the assets."""
    assets = A.full_assets(A.profile_params("full"))
    if any(a.problem() is None for a in assets):  # synthetic ones (a rehearsal's) count as missing here
        pytest.skip("this checkout has some of the full profile's assets")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(A.REHEARSAL_ENV, None)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "instdiff_lib.cli", "report", "all", "--profile", "full"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t
    assert r.returncode == 2 and elapsed < 120, (elapsed, r.stderr[-2000:])
    for what in ("InstanceDiffusion checkpoint", "COCO", "YOLO", "open_clip ViT-L-14", "Inception", "grounding-dino"):
        assert what in r.stderr, what
    assert r.stderr.count("fetch: ") == 7 and "Traceback" not in r.stderr


# ---- the rehearsal --------------------------------------------------------------------------------------------------
def test_rehearsal_params_change_only_sizes_and_the_machine(tmp_path):
    from instdiff_lib.report import rehearsal as R

    out = R.rehearsal_params(tmp_path)
    for name in R.NOTEBOOKS:
        full, reh = load_params(name, "full"), yaml.safe_load((out / f"{name}.yaml").read_text())
        load_params(name, "full", out / f"{name}.yaml")  # a valid params file of the notebook
        changed = {k for k in set(full) | set(reh) if full.get(k) != reh.get(k)}
        assert changed <= R.SIZE_KEYS | R.MACHINE_KEYS, (name, changed)
        for key in ("MODEL", "COCO_ROOT", "YOLO", "DETECTOR", "DETECTOR_MODEL", "PLANNER", "FID", "SETTINGS"):
            assert full.get(key) == reh.get(key), (name, key)  # the assets where the real ones go, the protocol as is
    assert yaml.safe_load((out / "10_location_formats.yaml").read_text())["N_IMAGES"] >= 2  # FID needs two


def test_rehearsal_results_never_count_as_full(tmp_path, monkeypatch):
    from instdiff_lib.report.blog import render_blog
    from instdiff_lib.results import write_results

    monkeypatch.setenv(A.REHEARSAL_ENV, "1")
    rows = {"box": {"metrics": {"box_AP50": {"mean": 0.5, "ci95": float("nan")}}, "n_evaluated": 2,
                    "n_images_per_seed": 2, "seeds": [0], "variant": {}}}
    write_results(tmp_path / "10_location_formats.json", {"rows": rows, "world": "COCO"}, params={}, n_evaluated=2,
                  profile="full", extra={"notebook": "10_location_formats"})
    assert json.loads((tmp_path / "10_location_formats.json").read_text())["profile"] == "rehearsal"
    text = render_blog(tmp_path / "blog.md", tmp_path)[0].read_text()
    paper_box = text.split("**boxes**")[1].split("**masks**")[0]
    assert "50.0" not in paper_box and "not run at full scale" in paper_box
    assert "Rehearsal: synthetic assets" in text


def test_synthetic_coco_has_photo_sizes_crowds_and_any_instance_count(tmp_path):
    from instdiff_lib.datasets.coco import protocol_items, resize_instances
    from instdiff_lib.report import rehearsal as R

    root = R.write_coco(tmp_path / "coco")
    ann = root / "annotations"
    data = json.loads((ann / "instances_val2017.json").read_text())
    assert any(im["width"] != im["height"] for im in data["images"])
    assert any(a["iscrowd"] and isinstance(a["segmentation"]["counts"], list) for a in data["annotations"])
    resize_instances(ann / "instances_val2017.json", ann / "instances_val2017_512.json")
    items = protocol_items(ann / "instances_val2017_512.json", ann / "captions_val2017.json")
    assert min(it.n_annotations for it in items) == 0 and max(it.n_annotations for it in items) > 30
    assert max(len(it.boxes) for it in items) == 30  # the protocol's 30 slots
    assert A._check_coco(root) is None and A.synthetic_info(root)


def test_grounding_dino_vocabulary_keeps_berts_special_ids():
    from instdiff_lib.report.rehearsal import _wordpiece_vocab

    v = _wordpiece_vocab()
    assert len(v) == 30522 and [v[i] for i in (0, 100, 101, 102, 103, 1012, 1029)] == \
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"]
