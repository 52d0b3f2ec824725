"""The rehearsal: the full profile end to end on a CPU, at true size, with synthetic assets (``make rehearsal``).

    instdiff rehearse                 # assets (once), then every stage; a rerun reuses the assets and the images
    instdiff rehearse --assets-only   # only write the synthetic assets

**Assets.** Written once where the README tells a user to put the real ones (:mod:`instdiff_lib.report.assets`), each
marked synthetic (outside a rehearsal they count as missing, and ``instdiff download`` replaces them); nothing goes into
a hidden cache. An asset that is already there (a real one included) is used as it is, never overwritten:

* ``weights/instancediffusion_sd15.pth``: every entry of the released file (``ema``/``model`` UNets with all 1199
  tensors, 1,228,333,437 parameters, ``autoencoder``, ``text_encoder``, ``opt``, ``scheduler``, ``iters``,
  ``diffusion``, an OmegaConf ``config_dict``), random values (``model`` shares ``ema``'s tensors: one copy on disk);
* ``data/coco``: a COCO-format val set at real photo sizes (non-square; 0 to 34 instances, polygons and crowd RLE
  masks) with ``instances_val2017.json`` and ``captions_val2017.json``; the 512x512 file is derived by the user's command;
* ``weights/yolov8m-seg.pt``: YOLOv8m-seg built from its yaml (80 COCO classes), saved by ultralytics;
* ``weights/hf``: open_clip ViT-L-14 (``laion/CLIP-ViT-L-14-laion2B-s32B-b82K``) and Grounding DINO tiny
  (``IDEA-Research/grounding-dino-tiny``, with a WordPiece vocabulary that keeps BERT's special-token ids) in the
  Hugging Face cache layout; ``weights/torch/hub/checkpoints``: the FID Inception-v3 state dict.

**Stages.** What a user runs (README, "Run the full protocol"), each command its own process, timed. The params are the
full profile's (``jobs/params/full``) with the sizes of ``jobs/params/rehearsal.yaml`` (a few images, 2 sampler steps,
one value per ablation group) and the CPU it runs on. An OpenAI-compatible planner answers on loopback.

Everything it writes goes under ``outputs/rehearsal/`` (results, figures, executed notebooks, images, blog), with
``profile: "rehearsal"`` in every results file: never a paper table, never the committed ``results/``, ``figures/`` or
``blogpost.md`` (checked byte for byte at the end).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from instdiff_lib.report import assets as A
from instdiff_lib.results import REPORT_OUTPUTS, project_root

OUT = "outputs/rehearsal"
OVERLAY = "jobs/params/rehearsal.yaml"
NOTEBOOKS = ("00_setup_check", "10_location_formats", "11_attribute_binding", "20_ablations", "30_extension",
             "99_blogpost")
N_SHARDS = 2
# what the overlay may change: sizes, and where a CPU-only machine runs and writes
SIZE_KEYS = {"N_IMAGES", "SEEDS", "STEPS", "N_SCENES", "N_INSTANCES", "ABLATE", "FIGURE_IMAGES"}
MACHINE_KEYS = {"DEVICE", "DTYPE", "OUT_DIR", "OUT"}
FAKE_REVISION = hashlib.sha1(b"instdiff rehearsal").hexdigest()  # the snapshot name in the synthetic hub caches


def _say(msg: str) -> None:
    print(f"[rehearsal] {msg}", flush=True)


# ---- params ----------------------------------------------------------------------------------------------------
def rehearsal_params(params_dir: str | os.PathLike | None = None) -> Path:
    """Write the rehearsal's params files: each ``jobs/params/full/<nb>.yaml`` with the overlay's values replaced."""
    from instdiff_lib.report.params import load_params, notebook_parameters, notebook_path, params_path

    overlay = yaml.safe_load((project_root() / OVERLAY).read_text())
    out = Path(params_dir) if params_dir else project_root() / OUT / "params"
    out.mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        declared = notebook_parameters(notebook_path(name))
        params = load_params(name, "full")
        changes = {**overlay.get("all", {}), **overlay.get(name, {})}
        bad = sorted(set(changes) - SIZE_KEYS - MACHINE_KEYS)
        if bad:
            raise ValueError(f"{OVERLAY}: {bad} are neither sizes nor machine settings; the rehearsal changes only "
                             f"{sorted(SIZE_KEYS | MACHINE_KEYS)}")
        params.update({k: v for k, v in changes.items() if k in declared})
        text = (f"# {name}, rehearsal: {params_path(name, 'full').relative_to(project_root())} with the values of "
                f"{OVERLAY}\n" + yaml.safe_dump(params, sort_keys=False))
        (out / f"{name}.yaml").write_text(text)
    return out


# ---- synthetic assets ----------------------------------------------------------------------------------------
def _skip(path: Path, what: str) -> bool:
    if A.synthetic_info(path):
        _say(f"{what}: synthetic copy already at {A._rel(path)} (reused)")
        return True
    if path.exists():
        _say(f"{what}: a real one is at {A._rel(path)}: used as it is, not overwritten")
        return True
    return False


def write_checkpoint(path: Path | None = None) -> Path:
    """The official-format ``.pth`` at full size (random init of the sd15 preset)."""
    import torch

    from instdiff_lib.fileio import sha256_file
    from instdiff_lib.weights.checkpoint import build_components
    from instdiff_lib.weights.synthetic import official_config_content, official_dict, save_official

    path = path or A.anchored(A.CHECKPOINT)
    if _skip(path, "checkpoint"):
        return path
    t = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        comp = build_components("sd15", seed=0)
        for p in comp.unet.parameters():  # zero-initialised gates and ScaleU: give them values, as trained ones have
            if not p.any():
                p.normal_(0, 0.05)
        save_official(official_dict(comp, model_seed=None, iters=1), path, official_config_content(comp))
    del comp
    A.mark_synthetic(path, sha256=sha256_file(path), what="sd15 preset, random init (seed 0)")
    _say(f"checkpoint: {A._rel(path)} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    return path


# (width, height, number of instances, crowd) per image, ids 1.. in this order: the first two are the ones the
# rehearsal generates (2 and 34 instances: truncation to 30, a prompt over 77 tokens), then 0 instances, crowd ...
COCO_IMAGES = [(640, 480, 2, False), (480, 640, 34, True), (640, 427, 0, False), (500, 375, 5, True),
               (612, 612, 1, False), (640, 360, 9, False), (427, 640, 3, False), (640, 480, 12, True)]


def _ultralytics_offline() -> None:
    if "ultralytics" not in sys.modules:  # its settings are read at import: the offline environment first
        from instdiff_lib.offline import setup_offline_env

        setup_offline_env()


def _coco_categories() -> list[dict]:
    _ultralytics_offline()
    import ultralytics
    from ultralytics.data.converter import coco80_to_coco91_class

    names = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "datasets" / "coco.yaml").read_text())["names"]
    ids = coco80_to_coco91_class()
    return [{"id": int(ids[i]), "name": names[i], "supercategory": "thing"} for i in range(80)]


def _photo(rng: np.random.Generator, w: int, h: int, boxes: list) -> "Image.Image":
    """A photo-like picture: a smooth colour field with noise, each instance a filled ellipse of its own colour."""
    from PIL import Image, ImageDraw, ImageFilter

    low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(8))
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for x, y, bw, bh in boxes:
        d.ellipse([x, y, x + bw, y + bh], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def _ellipse_polygon(x, y, w, h, n=16) -> list[float]:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return [round(float(v), 2) for p in zip(x + w / 2 + w / 2 * np.cos(a), y + h / 2 + h / 2 * np.sin(a)) for v in p]


def write_coco(root: Path | None = None, seed: int = 0) -> Path:
    """A COCO-format val2017 (``val2017/*.jpg``, ``annotations/instances_val2017.json`` and ``captions_val2017.json``)."""
    from pycocotools import mask as mask_utils

    root = root or A.anchored("data/coco")
    if _skip(root, "COCO"):
        return root
    rng = np.random.default_rng(seed)
    cats = _coco_categories()
    images, anns, caps = [], [], []
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1000
    for k, (w, h, n, crowd) in enumerate(COCO_IMAGES, start=1):
        name = f"{k:012d}.jpg"
        boxes = []
        for _ in range(n):
            bw, bh = rng.uniform(0.08, 0.45) * w, rng.uniform(0.08, 0.45) * h
            boxes.append((float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw), float(bh)))
        _photo(rng, w, h, boxes).save(root / "val2017" / name, format="JPEG", quality=90)
        images.append({"id": k, "file_name": name, "width": w, "height": h, "license": 1,
                       "coco_url": f"http://images.cocodataset.org/val2017/{name}", "date_captured": "2013-11-14"})
        names = []
        for j, (x, y, bw, bh) in enumerate(boxes):
            cat = cats[int(rng.integers(0, 80))]
            names.append(cat["name"])
            ann_id += 1
            if crowd and j == n - 1:  # a crowd region: uncompressed RLE, as COCO stores them
                m = np.zeros((h, w), np.uint8, order="F")
                m[int(y):int(y + bh), int(x):int(x + bw)] = 1
                rle = mask_utils.encode(m)
                counts = _rle_counts(m)
                anns.append({"id": ann_id, "image_id": k, "category_id": cat["id"], "iscrowd": 1, "bbox": [x, y, bw, bh],
                             "area": float(mask_utils.area(rle)), "segmentation": {"size": [h, w], "counts": counts}})
            else:
                anns.append({"id": ann_id, "image_id": k, "category_id": cat["id"], "iscrowd": 0, "bbox": [x, y, bw, bh],
                             "area": float(np.pi * bw * bh / 4), "segmentation": [_ellipse_polygon(x, y, bw, bh)]})
        for c in range(5):  # COCO has five captions per image
            what = " and ".join(sorted(set(names))[:3]) or "an empty room"
            caps.append({"id": 10 * k + c, "image_id": k, "caption": f"A photo of {what}, take {c + 1}."})
    info = {"description": "instdiff rehearsal: synthetic COCO-format val set (random pictures)", "version": "1.0"}
    licenses = [{"id": 1, "name": "synthetic", "url": ""}]
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"info": info, "licenses": licenses, "images": images, "annotations": anns, "categories": cats}))
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(
        {"info": info, "licenses": licenses, "images": images, "annotations": caps}))
    A.mark_synthetic(root, what=f"{len(images)} random pictures at photo sizes, {len(anns)} annotations")
    _say(f"COCO: {len(images)} images, {len(anns)} annotations in {A._rel(root)}")
    return root


def _rle_counts(m: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a mask (column-major runs, starting with zeros)."""
    flat = m.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size])))
    return ([0] + runs.tolist()) if flat[0] else runs.tolist()


def write_yolo(path: Path | None = None) -> Path:
    """YOLOv8m-seg from its yaml (random weights, the 80 COCO class names), saved as ultralytics saves a .pt."""
    path = path or A.anchored("weights/yolov8m-seg.pt")
    if _skip(path, "YOLO"):
        return path
    _ultralytics_offline()
    from ultralytics import YOLO

    cats = _coco_categories()
    yolo = YOLO("yolov8m-seg.yaml")
    yolo.model.names = {i: c["name"] for i, c in enumerate(cats)}
    path.parent.mkdir(parents=True, exist_ok=True)
    yolo.save(str(path))
    A.mark_synthetic(path, what="yolov8m-seg.yaml, random init")
    _say(f"YOLO: {A._rel(path)}")
    return path


def _hub_snapshot(repo: str) -> Path:
    """A snapshot folder in the Hugging Face cache layout (``refs/main`` -> ``snapshots/<revision>``)."""
    repo_dir = A.hf_repo_dir(repo)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(FAKE_REVISION)
    snap = repo_dir / "snapshots" / FAKE_REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def write_clip() -> Path:
    """open_clip ViT-L-14 (random init) as ``open_clip_model.safetensors`` in the hub cache, where open_clip puts it."""
    repo_dir = A.hf_repo_dir(A.CLIP_REPO)
    if _skip(repo_dir, "CLIP"):
        return repo_dir
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model(A.CLIP_MODEL, pretrained=None)
    snap = _hub_snapshot(A.CLIP_REPO)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / A.CLIP_FILE))
    A.mark_synthetic(repo_dir, what=f"open_clip {A.CLIP_MODEL}, random init")
    _say(f"CLIP: {A._rel(snap / A.CLIP_FILE)}")
    return repo_dir


def write_inception(path: Path | None = None) -> Path:
    """torch-fidelity's Inception-v3 (random init) state dict, at the path its download writes."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    path = path or A.inception_path()
    if _skip(path, "Inception"):
        return path
    cls = fx.FeatureExtractorInceptionV3
    saved = cls.load_state_dict, fx.load_state_dict_from_url
    try:  # build the network without loading (or downloading) its weights
        cls.load_state_dict = lambda self, *a, **k: None
        fx.load_state_dict_from_url = lambda *a, **k: {}
        net = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict, fx.load_state_dict_from_url = saved
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    A.mark_synthetic(path, what="torch-fidelity FeatureExtractorInceptionV3, random init")
    _say(f"Inception: {A._rel(path)}")
    return path


def _wordpiece_vocab(size: int = 30522) -> list[str]:
    """A BERT-uncased-shaped vocabulary: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, '.'=1012, '?'=1029
    (Grounding DINO hard-codes those ids), single characters and their '##' forms, a few words, padding."""
    from instdiff_lib.extension.planner import COCO_CLASSES

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 999 - len(vocab))]
    vocab += [chr(c) for c in range(0x21, 0x7F) if not chr(c).isupper()]  # '!' = 999 ... '.' = 1012, '?' = 1029
    vocab += [f"##{chr(c)}" for c in range(0x21, 0x7F) if not chr(c).isupper()]
    words = sorted({w for name in COCO_CLASSES for w in name.lower().split()} | {"a", "the", "of", "and", "in", "on"})
    vocab += [w for w in words if w not in vocab]
    vocab += [f"[unused{i}]" for i in range(1000, 1000 + size - len(vocab))]
    assert vocab[1012] == "." and vocab[1029] == "?" and len(vocab) == size
    return vocab


def write_detector() -> Path:
    """Grounding DINO tiny (transformers' default config: Swin-T + BERT-base, random init) and its processor, in the
    hub cache where ``from_pretrained`` / ``snapshot_download`` put the real one."""
    repo = A.DETECTOR_REPOS["grounding-dino"]
    repo_dir = A.hf_repo_dir(repo)
    if _skip(repo_dir, "detector"):
        return repo_dir
    from transformers import (BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor)

    snap = _hub_snapshot(repo)
    (snap / "vocab.txt").write_text("\n".join(_wordpiece_vocab()) + "\n")
    tok = BertTokenizerFast(vocab_file=str(snap / "vocab.txt"), do_lower_case=True)
    image_processor = GroundingDinoImageProcessor()
    image_processor.processor_class = GroundingDinoProcessor.__name__
    image_processor.save_pretrained(snap)  # the hub repo's files: preprocessor_config.json, tokenizer files, ...
    tok.save_pretrained(snap)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(snap)
    A.mark_synthetic(repo_dir, what="GroundingDinoConfig() (Swin-T, BERT-base), random init")
    _say(f"detector: {A._rel(snap)}")
    return repo_dir


ASSET_WRITERS = {"checkpoint": write_checkpoint, "coco": write_coco, "yolo": write_yolo, "clip": write_clip,
                 "inception": write_inception, "detector": write_detector}


def write_assets() -> dict[str, float]:
    """Every synthetic asset (skipping those present); seconds per asset."""
    out = {}
    for key, fn in ASSET_WRITERS.items():
        t = time.perf_counter()
        fn()
        out[key] = round(time.perf_counter() - t, 1)
    return out


# ---- the stages ----------------------------------------------------------------------------------------------
PLAN = {"caption": "a dog, a cat and a couch in a living room",
        "instances": [{"category": "dog", "caption": "a brown dog", "box_xyxy": [30, 250, 230, 470]},
                      {"category": "cat", "caption": "a grey cat", "box_xyxy": [270, 280, 450, 460]},
                      {"category": "couch", "caption": "a green couch", "box_xyxy": [10, 120, 500, 330]}]}


def stages(params_dir: Path) -> list[tuple[str, list[str]]]:
    """(name, instdiff arguments) in the order a user runs them (README, "Run the full protocol")."""
    p = lambda nb: str((params_dir / f"{nb}.yaml").relative_to(project_root()))  # noqa: E731
    rel = str(params_dir.relative_to(project_root()))
    nb_out = f"{OUT}/report"
    out = [("download", ["download", "--all", "--params-dir", rel]),
           ("convert", ["convert", A.CHECKPOINT, "--out", "weights/instdiff-sd15", "--dtype", "fp16"]),
           ("preflight", ["report", "preflight", "--profile", "full", "--params-dir", rel]),
           ("00_setup_check", ["report", "notebook", "00_setup_check", "--profile", "full", "--params",
                               p("00_setup_check"), "--out-dir", nb_out])]
    out += [(f"generate {i}/{N_SHARDS}", ["report", "generate", "--profile", "full", "--shard", f"{i}/{N_SHARDS}",
                                            "--params-dir", rel]) for i in range(N_SHARDS)]
    out += [(nb, ["report", "notebook", nb, "--profile", "full", "--params", p(nb), "--out-dir", nb_out])
            for nb in NOTEBOOKS[1:]]
    return out


def _fingerprint() -> dict[str, str]:
    root = project_root()
    files = [p for name in REPORT_OUTPUTS for p in ([root / name] if (root / name).is_file()
                                                     else sorted((root / name).rglob("*")))]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def rehearse(assets_only: bool = False, skip: list[str] | None = None) -> dict[str, Any]:
    """Write the assets, then run every stage; raises at the first failing stage. Returns the timings."""
    from instdiff_lib.extension.llm_stub import Reply, ScriptedLLMServer

    root = project_root()
    t0 = time.perf_counter()
    before = _fingerprint()
    _say("synthetic assets (written once, where the README puts the real ones)")
    timings: dict[str, Any] = {"assets": write_assets(), "stages": {}}
    if assets_only:
        return timings
    params_dir = rehearsal_params()
    out = root / OUT
    env = {**os.environ, A.REHEARSAL_ENV: "1", "INSTDIFF_RESULTS_DIR": str(out / "results"),
           "INSTDIFF_FIGURES_DIR": str(out / "figures"), "HF_HUB_OFFLINE": "1", "INSTDIFF_LLM_API_KEY": "rehearsal",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with ScriptedLLMServer([Reply(json.dumps(PLAN))]) as llm:
        env["INSTDIFF_LLM_BASE_URL"] = llm.base_url
        for name, args in stages(params_dir):
            if skip and name in skip:
                continue
            _say(f"== {name}: instdiff {shlex.join(args)}")
            t = time.perf_counter()
            rc = subprocess.run([sys.executable, "-m", "instdiff_lib.cli", *args], cwd=root, env=env).returncode
            timings["stages"][name] = round(time.perf_counter() - t, 1)
            _say(f"== {name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {timings['stages'][name]:.0f} s")
            if rc != 0:
                _write_timings(out, timings, t0)
                raise RuntimeError(f"rehearsal stage {name!r} failed (exit {rc}): instdiff {shlex.join(args)}")
        timings["planner_requests"] = llm.n_requests
    after = _fingerprint()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        raise RuntimeError(f"the rehearsal changed committed report files: {changed}")
    _write_timings(out, timings, t0)
    return timings


def _write_timings(out: Path, timings: dict, t0: float) -> None:
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    try:
        timings["load_average"] = os.getloadavg()
    except OSError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    rows = [*(f"asset {k}" for k in timings["assets"]), *timings["stages"]]
    vals = [*timings["assets"].values(), *timings["stages"].values()]
    _say("timings (s):\n" + "\n".join(f"  {r:28s} {v:8.1f}" for r, v in zip(rows, vals))
         + f"\n  {'total':28s} {timings['total_s']:8.1f}   -> {A._rel(out / 'timings.json')}")


def add_rehearse_parser(sub) -> None:
    r = sub.add_parser("rehearse", help="the full profile end to end on CPU with synthetic assets of the real sizes "
                       "(make rehearsal); outputs in outputs/rehearsal/, labelled 'rehearsal'")
    r.add_argument("--assets-only", action="store_true", help="only write the synthetic assets")
    r.add_argument("--skip", nargs="+", default=None, metavar="STAGE", help="stages not to run (e.g. download)")
    r.set_defaults(func=lambda a: (rehearse(a.assets_only, a.skip), 0)[1])
