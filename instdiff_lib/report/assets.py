"""Every external asset of the full profile: where it lives, a check that takes seconds, the command that fetches it.

    instdiff download --all                    # fetch what is missing (or link copies you already have, --from)
    instdiff report preflight --profile full   # every missing or broken asset at once; the chain runs it first

The documented locations, relative to the project root. ``MODEL``, ``COCO_ROOT``, ``YOLO`` and ``DETECTOR`` /
``DETECTOR_MODEL`` are read from the profile's params files (``jobs/params/full/*.yaml``), the rest is fixed here:

============  ================================================  ==========================================  =================
key           what                                              where                                       fetched with
============  ================================================  ==========================================  =================
checkpoint    the released InstanceDiffusion checkpoint         ``weights/instancediffusion_sd15.pth``      huggingface_hub
model         its converted folder (what the notebooks load)    ``MODEL`` = ``weights/instdiff-sd15``       ``instdiff convert``
coco          COCO val2017: images, annotations, 512x512 GT     ``COCO_ROOT`` = ``data/coco``               urllib + resize-512
yolo          YOLOv8m-seg (box/mask AP, mask IoU, PiM)          ``YOLO`` = ``weights/yolov8m-seg.pt``       ultralytics
clip          open_clip ViT-L-14 ``laion2b_s32b_b82k``          ``weights/hf`` (Hugging Face cache layout)  open_clip
inception     FID Inception-v3 (torch-fidelity's weights)       ``weights/torch/hub/checkpoints/<file>``    torch.hub
detector      Grounding DINO tiny (``30_extension``)            ``weights/hf`` (Hugging Face cache layout)  huggingface_hub
============  ================================================  ==========================================  =================

``weights/hf`` is a Hugging Face hub cache (``models--org--name/snapshots/<rev>/...``) and ``weights/torch`` a
``$TORCH_HOME``: exactly what the libraries' own downloads write there. The offline environment of the notebooks
(``HF_HOME=.cache/hf``) never sees a copy in your usual cache, so ``instdiff download --all`` looks in
``~/.cache/huggingface/hub`` and ``~/.cache/torch/hub/checkpoints`` (and every ``--from DIR``) first and links what
it finds into place instead of downloading it again.

Synthetic stand-ins written by the rehearsal (``instdiff rehearse``) carry a marker; outside a rehearsal they count as
missing (random weights must never produce a "full" result), and ``download`` replaces them.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from instdiff_lib.results import REHEARSAL_ENV, in_rehearsal, project_root  # noqa: F401 (REHEARSAL_ENV: re-export)

CHECKPOINT = "weights/instancediffusion_sd15.pth"
HF_CACHE = "weights/hf"
TORCH_HOME = "weights/torch"
CLIP_MODEL, CLIP_TAG = "ViT-L-14", "laion2b_s32b_b82k"
CLIP_REPO = "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
CLIP_FILE = "open_clip_model.safetensors"  # open_clip prefers this twin of open_clip_pytorch_model.bin
DETECTOR_REPOS = {"grounding-dino": "IDEA-Research/grounding-dino-tiny", "owlv2": "google/owlv2-base-patch16-ensemble"}
SYNTHETIC_MARK = ".synthetic.json"  # a file asset X has X.synthetic.json beside it; a folder asset holds one
# the assets each notebook of the full profile reads
NOTEBOOK_ASSETS = {"00_setup_check": ("model",), "01_demos": ("model",),
                   "10_location_formats": ("model", "coco", "yolo", "inception"),
                   "11_attribute_binding": ("model", "coco", "yolo", "clip"),
                   "20_ablations": ("model", "coco", "yolo"), "30_extension": ("model", "coco", "clip", "detector"),
                   "99_blogpost": ()}
USUAL_CACHES = ("~/.cache/huggingface/hub", "~/.cache/torch/hub/checkpoints")


class AssetsMissing(RuntimeError):
    """One or more assets are missing or broken; the message lists each with the command that fetches it."""


def rehearsal() -> bool:
    """Inside ``instdiff rehearse``: synthetic assets are accepted (and its results are labelled "rehearsal")."""
    return in_rehearsal()


def anchored(p: str | os.PathLike) -> Path:
    p = Path(p)
    return p if p.is_absolute() else project_root() / p


def hf_cache() -> Path:
    return anchored(HF_CACHE)


def inception_path() -> Path:
    from instdiff_lib.evaluation.metrics.fid import INCEPTION_FILE

    return anchored(TORCH_HOME) / "hub" / "checkpoints" / INCEPTION_FILE


def hf_repo_dir(repo: str, cache: Path | None = None) -> Path:
    """The folder of a hub repo inside a Hugging Face cache (``models--org--name``)."""
    return (cache or hf_cache()) / ("models--" + repo.replace("/", "--"))


def hf_cached_file(repo: str, filename: str, cache: Path | None = None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename, cache_dir=str(cache or hf_cache()))
    return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None


# ---- synthetic stand-ins (the rehearsal) ---------------------------------------------------------------------------
def _mark_path(path: Path) -> Path:
    return path / SYNTHETIC_MARK if path.is_dir() else path.with_name(path.name + SYNTHETIC_MARK)


def mark_synthetic(path: str | os.PathLike, **info: Any) -> None:
    """Record that ``path`` (a file or a folder) holds a synthetic stand-in written by the rehearsal."""
    path = Path(path)
    doc = {"synthetic": True, "written_by": "instdiff rehearse", **info}
    if path.is_file():
        doc["size"] = path.stat().st_size
    _mark_path(path).write_text(json.dumps(doc, indent=2))


def synthetic_info(path: str | os.PathLike) -> dict | None:
    """The marker of a synthetic stand-in at ``path`` (None for a real asset; a file replaced since is real)."""
    path = Path(path)
    mark = _mark_path(path)
    if not (path.exists() and mark.is_file()):
        return None
    doc = json.loads(mark.read_text())
    if path.is_file() and doc.get("size") != path.stat().st_size:
        return None
    return doc


def clear_synthetic(path: str | os.PathLike) -> None:
    path = Path(path)
    if synthetic_info(path) is None:
        return
    mark = _mark_path(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    mark.unlink(missing_ok=True)


# ---- the assets ------------------------------------------------------------------------------------------------------
@dataclass
class Asset:
    key: str
    what: str
    path: Path  # where it must be (a file, or a folder)
    fetch: str  # the command that fetches (or makes) it
    check: Callable[[], str | None]  # None when present and sound, else what is wrong
    details: dict = field(default_factory=dict)

    def problem(self) -> str | None:
        try:
            why = self.check()
        except Exception as e:  # noqa: BLE001 -- a check that cannot read the asset found it broken
            why = f"unreadable ({type(e).__name__}: {str(e)[:200]})"
        if why is None and not rehearsal():
            syn = self.synthetic()
            if syn:
                why = "a synthetic stand-in with random weights, written by the rehearsal (instdiff rehearse)"
        return why

    def synthetic(self) -> dict | None:
        if self.key == "model":  # a folder converted from a synthetic checkpoint
            man = self.path / "manifest.json"
            ck = synthetic_info(anchored(CHECKPOINT))
            if man.is_file() and ck:
                return ck if json.loads(man.read_text()).get("source", {}).get("sha256") == ck.get("sha256") else None
            return None
        if self.key in ("clip", "detector"):
            return synthetic_info(hf_repo_dir(self.details["repo"]))
        return synthetic_info(self.path)

    def row(self) -> str:
        return f"{self.key}: {self.what} at {_rel(self.path)}"


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(project_root()))
    except ValueError:
        return str(p)


def _check_zip(path: Path) -> str | None:
    if not path.exists():
        return "missing"
    if not zipfile.is_zipfile(path):
        return "not a torch zip archive (truncated or corrupt download?)"
    return None


def _check_checkpoint(path: Path) -> str | None:
    return _check_zip(path)


def _check_model(folder: Path) -> str | None:
    from instdiff_lib.weights.checkpoint import FILES, FORMAT

    man = folder / "manifest.json"
    if not man.is_file():
        return "missing" if not folder.exists() else "no manifest.json (not a converted folder)"
    doc = json.loads(man.read_text())
    if doc.get("format") != FORMAT:
        return f"manifest format {doc.get('format')!r}, expected {FORMAT}"
    for name in FILES.values():
        meta = doc.get("files", {}).get(name)
        p = folder / name
        if meta is None or not p.is_file():
            return f"{name} missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
    return None


def _check_coco(root: Path) -> str | None:
    ann = root / "annotations"
    missing = [p.name for p in (ann / "instances_val2017.json", ann / "captions_val2017.json", root / "val2017")
               if not p.exists()]
    if missing:
        return "missing" if len(missing) == 3 else f"{', '.join(missing)} missing"
    gt = ann / "instances_val2017_512.json"
    if not gt.is_file():
        return (f"annotations/{gt.name} missing (derive it: instdiff data resize-512 {_rel(ann / 'instances_val2017.json')}"
                f" {_rel(gt)})")
    images = json.loads(gt.read_text()).get("images", [])
    if not images:
        return f"{gt.name} lists no images"
    on_disk = set(os.listdir(root / "val2017"))
    absent = [im["file_name"] for im in images if im["file_name"] not in on_disk]
    if absent:
        return f"{len(absent)} of {len(images)} images missing from val2017/, e.g. {absent[:3]}"
    return None


def _check_clip() -> str | None:
    f = hf_cached_file(CLIP_REPO, CLIP_FILE) or hf_cached_file(CLIP_REPO, "open_clip_pytorch_model.bin")
    if f is None:
        return "missing"
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(f), "pt") as sf:
            shape = tuple(sf.get_slice("visual.conv1.weight").get_shape()) if "visual.conv1.weight" in sf.keys() else None
        if shape != (1024, 3, 14, 14):
            return f"{f.name} is not a ViT-L/14 open_clip checkpoint (visual.conv1.weight {shape})"
    return None


def _check_inception(path: Path) -> str | None:
    bad = _check_zip(path)
    if bad:
        return bad
    import torch

    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    w = sd.get("Mixed_7c.branch_pool.conv.weight")
    if w is None or tuple(w.shape) != (192, 2048, 1, 1) or "fc.weight" not in sd:
        return "not the torch-fidelity Inception-v3 state dict"
    return None


def _check_detector(repo: str) -> str | None:
    cfg = hf_cached_file(repo, "config.json")
    if cfg is None:
        return "missing"
    folder = cfg.parent
    if not any((folder / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
        return "no model weights (model.safetensors) beside config.json"
    if not any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        return "no preprocessor_config.json"
    return None


def profile_params(profile: str = "full", params_dir: str | os.PathLike | None = None,
                   notebooks: list[str] | None = None) -> dict[str, dict]:
    """The effective parameters of each notebook of a profile (its params files, or those of ``params_dir``: the
    notebooks that have a file there)."""
    from instdiff_lib.report.params import NOTEBOOKS, effective_params

    if notebooks is None and params_dir:
        notebooks = [n for n in NOTEBOOKS if (Path(params_dir) / f"{n}.yaml").is_file()]
    out = {}
    for name in notebooks or NOTEBOOKS:
        pfile = Path(params_dir) / f"{name}.yaml" if params_dir else None
        out[name] = effective_params(name, profile, pfile)
    return out


def full_assets(params: dict[str, dict]) -> list[Asset]:
    """The assets that the notebooks in ``params`` (name -> effective parameters) read, with their locations."""
    needed = {k for name in params for k in NOTEBOOK_ASSETS.get(name, ())}

    def values(key: str, default: str, asset: str) -> list[str]:  # the value of KEY in every notebook reading `asset`
        return sorted({str(p.get(key) or default) for name, p in params.items() if asset in NOTEBOOK_ASSETS[name]})

    assets: list[Asset] = []
    ckpt = anchored(CHECKPOINT)
    if "model" in needed:
        for m in values("MODEL", "weights/instdiff-sd15", "model"):
            folder = anchored(m)
            assets.append(Asset("model", "InstanceDiffusion converted for instdiff (fp16)", folder,
                                f"instdiff convert {CHECKPOINT} --out {_rel(folder)} --dtype fp16",
                                lambda folder=folder: _check_model(folder)))
        if any(a.problem() is not None for a in assets if a.key == "model"):  # the .pth is only needed to convert
            assets.insert(0, Asset("checkpoint", "InstanceDiffusion checkpoint (instancediffusion_sd15.pth, 13.6 GB)",
                                   ckpt, "instdiff download --only checkpoint", lambda: _check_checkpoint(ckpt)))
    if "coco" in needed:
        for r in values("COCO_ROOT", "data/coco", "coco"):
            root = anchored(r)
            assets.append(Asset("coco", "COCO val2017 (images, instances and captions, the 512x512 GT file)", root,
                                "instdiff download --only coco",
                                lambda root=root: _check_coco(root)))
    if "yolo" in needed:
        for y in values("YOLO", "weights/yolov8m-seg.pt", "yolo"):
            path = anchored(y)
            assets.append(Asset("yolo", "YOLOv8m-seg weights", path, "instdiff download --only yolo",
                                lambda path=path: _check_zip(path)))
    if "clip" in needed:
        assets.append(Asset("clip", f"open_clip {CLIP_MODEL} {CLIP_TAG} ({CLIP_REPO})", hf_repo_dir(CLIP_REPO),
                            "instdiff download --only clip", _check_clip, {"repo": CLIP_REPO}))
    if "inception" in needed and any(p.get("FID") for p in params.values()):
        path = inception_path()
        assets.append(Asset("inception", "FID Inception-v3 weights (torch-fidelity)", path,
                            "instdiff download --only inception", lambda: _check_inception(path)))
    if "detector" in needed:
        p30 = params.get("30_extension", {})
        backend = p30.get("DETECTOR", "grounding-dino")
        if backend in DETECTOR_REPOS and not p30.get("DETECTOR_MODEL"):
            repo = DETECTOR_REPOS[backend]
            assets.append(Asset("detector", f"{backend} ({repo}) for the placement check", hf_repo_dir(repo),
                                "instdiff download --only detector",
                                lambda repo=repo: _check_detector(repo), {"repo": repo}))
        elif p30.get("DETECTOR_MODEL"):
            folder = anchored(p30["DETECTOR_MODEL"])
            assets.append(Asset("detector", f"{backend} folder (DETECTOR_MODEL)", folder,
                                f"a {backend} folder saved with save_pretrained at {_rel(folder)}",
                                lambda folder=folder: None if (folder / "config.json").is_file() else "missing"))
    return assets


def check_assets(assets: list[Asset]) -> list[tuple[Asset, str]]:
    return [(a, why) for a in assets if (why := a.problem()) is not None]


def problems_message(problems: list[tuple[Asset, str]], n_assets: int) -> str:
    lines = [f"{len(problems)} of {n_assets} assets of the full profile are missing or broken:"]
    for a, why in problems:
        lines.append(f"  - {a.what}: {_rel(a.path)}: {why}\n      fetch: {a.fetch}")
    lines.append("Fetch everything at once with `instdiff download --all` (README, 'Run the full protocol').")
    return "\n".join(lines)


def preflight(profile: str = "full", params_dir: str | os.PathLike | None = None,
              notebooks: list[str] | None = None, verbose: bool = True) -> list[Asset]:
    """Check every asset the profile's notebooks read; raise :class:`AssetsMissing` listing all that are missing or
    broken, each with its fetch command. The smoke profile reads only committed files: nothing to check."""
    if profile == "smoke":
        return []
    assets = full_assets(profile_params(profile, params_dir, notebooks))
    problems = check_assets(assets)
    if problems:
        raise AssetsMissing(problems_message(problems, len(assets)))
    if verbose:
        for a in assets:
            print(f"ok  {a.row()}" + ("  [synthetic: rehearsal]" if a.synthetic() else ""))
    return assets


# ---- fetching ------------------------------------------------------------------------------------------------------
def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        clear_synthetic(dst)
        if dst.is_symlink():
            dst.unlink()
    if not dst.exists():
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    return dst


def _search_dirs(sources: list[str | os.PathLike]) -> list[Path]:
    dirs = [Path(s).expanduser() for s in sources] + [Path(c).expanduser() for c in USUAL_CACHES]
    return [d for d in dirs if d.is_dir()]


def find_existing(asset: Asset, sources: list[str | os.PathLike]) -> Path | None:
    """A copy of ``asset`` in one of ``sources`` or the usual caches (a file by name, a hub repo folder, a COCO root)."""
    for d in _search_dirs(sources):
        if asset.key in ("clip", "detector"):
            cand = [hf_repo_dir(asset.details["repo"], d), hf_repo_dir(asset.details["repo"], d / "hub")]
        elif asset.key == "coco":
            cand = [d] if (d / "annotations" / "instances_val2017.json").is_file() and (d / "val2017").is_dir() else []
        elif asset.key == "model":
            cand = []
        else:
            cand = [d / asset.path.name, d / "hub" / "checkpoints" / asset.path.name]
        for c in cand:
            if c.exists() and c.resolve() != asset.path.resolve() and not synthetic_info(c):
                return c
    return None


def _offline(url: str) -> str | None:
    from instdiff_lib.offline import offline_reason

    return offline_reason(url)


def _fail_if_offline(asset: Asset, url: str) -> None:
    why = _offline(url)
    if why:
        raise AssetsMissing(f"cannot download the {asset.key} asset now ({why}). On a machine with internet run "
                            f"`{asset.fetch}` and copy {_rel(asset.path)} here, or point at a copy with "
                            f"`instdiff download --only {asset.key} --from DIR`.")


def fetch(asset: Asset) -> str:
    """Download one asset into its documented location with the library that owns it; fails fast offline."""
    from instdiff_lib.evaluation.metrics.fid import INCEPTION_URL

    urls = {"checkpoint": "https://huggingface.co", "clip": "https://huggingface.co",
            "detector": "https://huggingface.co", "yolo": "https://github.com", "inception": INCEPTION_URL,
            "coco": "http://images.cocodataset.org"}
    if asset.key == "model":
        raise AssetsMissing(f"{_rel(asset.path)} is made, not downloaded: {asset.fetch}")
    if asset.key == "coco":
        from instdiff_lib.datasets.coco import COCO_PART_CONTENTS, download_coco, resize_instances

        ann = asset.path / "annotations"
        have = all((asset.path / rel).exists() for rel in sum(COCO_PART_CONTENTS.values(), []))
        if not (have and (synthetic_info(asset.path) is None or rehearsal())):  # only the 512 file to derive: no network
            _fail_if_offline(asset, urls["coco"])
            if not rehearsal():
                clear_synthetic(asset.path)
            download_coco(asset.path)
        resize_instances(ann / "instances_val2017.json", ann / "instances_val2017_512.json")
        return str(asset.path)
    _fail_if_offline(asset, urls[asset.key])
    if not rehearsal():  # a synthetic stand-in is replaced by the real thing
        clear_synthetic(asset.path if asset.key not in ("clip", "detector") else hf_repo_dir(asset.details["repo"]))
    if asset.key == "checkpoint":
        from instdiff_lib.weights.checkpoint import download_official

        return str(download_official(asset.path.parent))
    if asset.key == "yolo":
        from instdiff_lib.offline import setup_offline_env

        setup_offline_env()
        from ultralytics.utils.downloads import attempt_download_asset

        asset.path.parent.mkdir(parents=True, exist_ok=True)
        return attempt_download_asset(str(asset.path))
    if asset.key == "clip":
        from open_clip.pretrained import download_pretrained_from_hf

        return download_pretrained_from_hf(CLIP_REPO, cache_dir=str(hf_cache()))
    if asset.key == "inception":
        import torch

        asset.path.parent.mkdir(parents=True, exist_ok=True)
        prefix = asset.path.stem.rsplit("-", 1)[-1]  # torch.hub convention: the file name ends with its sha256 prefix
        torch.hub.download_url_to_file(INCEPTION_URL, str(asset.path), hash_prefix=prefix)
        return str(asset.path)
    if asset.key == "detector":
        from huggingface_hub import snapshot_download

        return snapshot_download(asset.details["repo"], cache_dir=str(hf_cache()))
    raise ValueError(f"unknown asset {asset.key!r}")


def download(keys: list[str] | None = None, sources: list[str | os.PathLike] = (), profile: str = "full",
             params_dir: str | os.PathLike | None = None) -> list[tuple[Asset, str]]:
    """``instdiff download --all`` / ``--only KEY``: for each asset of the profile that is missing or broken, link a
    copy found in ``sources`` (or the usual caches), else download it. Returns what failed, as (asset, reason)."""
    assets = full_assets(profile_params(profile, params_dir))
    if keys:
        unknown = sorted(set(keys) - {a.key for a in assets} - {"checkpoint"})
        if unknown:
            raise ValueError(f"unknown asset(s) {unknown}; this profile has {sorted({a.key for a in assets})}")
        if "checkpoint" in keys and not any(a.key == "checkpoint" for a in assets):
            ck = anchored(CHECKPOINT)
            assets.insert(0, Asset("checkpoint", "InstanceDiffusion checkpoint", ck, "instdiff download --only checkpoint",
                                   lambda: _check_checkpoint(ck)))
        assets = [a for a in assets if a.key in keys]
    failed = []
    for a in assets:
        why = a.problem()
        if why is None:
            print(f"present  {a.row()}" + ("  [synthetic: rehearsal]" if a.synthetic() else ""))
            continue
        if a.key == "model":
            print(f"to make  {a.row()}: {why}\n         run: {a.fetch}")
            continue
        found = find_existing(a, list(sources))
        try:
            if found is not None:
                if a.key == "coco":
                    for rel in ("val2017", "annotations/instances_val2017.json", "annotations/captions_val2017.json"):
                        _link(found / rel, a.path / rel)
                    from instdiff_lib.datasets.coco import resize_instances

                    ann = a.path / "annotations"
                    resize_instances(ann / "instances_val2017.json", ann / "instances_val2017_512.json")
                else:
                    _link(found, a.path)
                print(f"linked   {a.row()} -> {found}")
            else:
                print(f"fetching {a.row()} ({why})", flush=True)
                print(f"fetched  {fetch(a)}")
        except Exception as e:  # noqa: BLE001 -- report every asset, then fail
            failed.append((a, f"{type(e).__name__}: {str(e)[:500]}"))
            print(f"FAILED   {a.row()}: {failed[-1][1]}")
            continue
        if (after := a.problem()) is not None:
            failed.append((a, f"still not usable after fetching: {after}"))
    return failed
