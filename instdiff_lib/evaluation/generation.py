"""Generation for the evaluation protocol, at scale: sharded, resumable, atomic, reproducible.

``generate_eval(items, out_dir, pipe, setting, shard=(i, n))`` writes one image per item and appends a row
to ``manifest-{i:03d}-of-{n:03d}.jsonl`` per finished image::

    {"image_id": 139, "file": "000000000139.jpg", "seed": 1234, "config_hash": "...", "sha256": "...", ...}

* Each image's seed comes from (base seed, image id) alone, so the union of N shards equals one run.
* Files are written under a temporary name and renamed; the manifest row is appended after the rename.
  A kill leaves at most one image without a row, which a rerun regenerates (identically with ``layout_batch=1``; up
  to float rounding when the images are sampled in groups).
* A rerun skips images whose file exists with the manifest's sha256 and the same configuration; a folder
  holding another configuration is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from instdiff_lib.fileio import atomic_write_bytes, sha256_file
from instdiff_lib.sampling.generate import skip_mode_set

# Evaluation settings: which modalities are fed (official test_*.yaml) and which attribute is added.
SETTINGS: dict[str, dict] = {
    "box": {"drop": "box", "attribute": None},  # boxes (+ box-centre points)
    "mask": {"drop": "mask", "attribute": None},  # official test_mask.yaml (README: box AND mask AP)
    "point": {"drop": "point", "attribute": None},  # points only
    "scribble": {"drop": "all", "attribute": None},  # official test_scribble.yaml drops nothing (sic)
    "color": {"drop": "mask", "attribute": "color"},
    "texture": {"drop": "mask", "attribute": "texture"},
    "real": {"drop": None, "attribute": None},  # the real-image control: no generation, scored by the same code
}
EVAL_NEGATIVE_PROMPT = ("cartoon style, painting style, longbody, lowres, bad anatomy, bad hands, missing fingers, "
                        "extra digit, fewer digits, cropped, worst quality, low quality")  # official eval_local.py
EVAL_DEFAULTS = {"steps": 50, "guidance": 7.5, "alpha": 1.0, "mis": 0.36}  # README evaluation commands
# how every evaluation image is stored, as the official eval_local.py does (<file_name>.jpg, PIL's default quality):
# the notebooks, the generation array and `instdiff eval generate` alike (FID depends on it)
IMAGE_FORMAT, JPEG_QUALITY = "jpg", 75


class ManifestError(RuntimeError):
    pass


@dataclass
class GenerationSummary:
    out_dir: Path
    shard: tuple[int, int]
    n_items: int
    n_generated: int
    n_skipped_existing: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.n_generated / self.seconds if self.seconds > 0 else 0.0


def image_seed(base_seed: int, image_id: int) -> int:
    """A seed that depends only on (base seed, image id): independent of shards and order."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def shard_items(items: list, shard: tuple[int, int]) -> list:
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be I/N with 0 <= I < N, got {i}/{n}")
    return items[i::n]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/8), got {text!r}") from None
    shard_items([], (i, n))
    return i, n


def manifest_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    return out_dir / f"manifest-{shard[0]:03d}-of-{shard[1]:03d}.jsonl"


def read_manifest(out_dir: str | Path) -> list[dict]:
    """All rows of all shard manifests in a folder (the union of shards), one per image id."""
    out_dir = Path(out_dir)
    rows: dict[int, dict] = {}
    for path in sorted(out_dir.glob("manifest-*.jsonl")):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    continue  # a torn last line from a kill: that image is regenerated
                raise ManifestError(f"{path}:{n} is not valid JSON") from None
            rows[row["image_id"]] = row
    return sorted(rows.values(), key=lambda r: r["image_id"])


def generate_eval(items: list, out_dir: str | Path, pipe, setting: str, *, shard: tuple[int, int] = (0, 1),
                  base_seed: int = 0, image_format: str = IMAGE_FORMAT, quality: int = JPEG_QUALITY,
                  steps: int | None = None,
                  guidance: float | None = None, alpha: float | None = None, mis: float | None = None,
                  negative_prompt: str = EVAL_NEGATIVE_PROMPT, progress: bool = True, drop: str | None = None,
                  skip_mode: str | None = None, max_batch: int | None = None,
                  layout_batch: int = 1) -> GenerationSummary:
    """Generate this shard's images. ``items`` have ``image_id``, ``file_name`` and ``layout`` (see coco.py).

    ``drop`` overrides the setting's modality preset and ``skip_mode`` the model's (``scaleu``/``freeu``/``none``)
    for ablations; both are part of the folder's configuration (a resumed run must match it). ``max_batch`` caps the
    UNet batch (default: the pipeline's, see ``InstanceDiffusionPipeline``); it does not change the images.
    ``layout_batch`` images are sampled together (:meth:`InstanceDiffusionPipeline.generate`: on a CPU, fuller UNet
    batches); each equals its image sampled alone up to float rounding, so it is not part of the configuration either
    (a kill loses at most one group; a rerun regenerates it)."""
    if layout_batch < 1:
        raise ValueError(f"layout_batch must be >= 1, got {layout_batch}")
    if setting not in SETTINGS or setting == "real":
        raise ValueError(f"setting must be one of {[s for s in SETTINGS if s != 'real']}, got {setting!r}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be jpg or png, got {image_format!r}")
    p = {**EVAL_DEFAULTS, **{k: v for k, v in dict(steps=steps, guidance=guidance, alpha=alpha, mis=mis).items()
                             if v is not None}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drop = drop or SETTINGS[setting]["drop"]
    unet = pipe.c.unet
    skip_mode = skip_mode or unet.skip_mode
    config = {"setting": setting, "drop": drop, "skip_mode": skip_mode, **p, "negative_prompt": negative_prompt,
              "base_seed": base_seed, "model": pipe.c.label, "model_config": pipe.cfg.name,
              "image_size": pipe.cfg.image_size, "format": image_format, "quality": quality,
              "dtype": str(pipe.dtype)}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    config_file = out_dir / "generation_config.json"
    if config_file.exists():
        old = json.loads(config_file.read_text())
        if old.get("config_hash") != config_hash:
            diff = {k: (old["config"].get(k), v) for k, v in config.items() if old["config"].get(k) != v}
            raise ManifestError(f"{out_dir} already holds images of another configuration (differences: {diff}); "
                                "use a new folder")
    else:
        atomic_write_bytes(config_file, json.dumps({"config_hash": config_hash, "config": config}, indent=2).encode())

    done = {r["image_id"]: r for r in read_manifest(out_dir) if r.get("config_hash") == config_hash}
    mine = shard_items(items, shard)
    mpath = manifest_path(out_dir, shard)
    t0, n_gen = time.perf_counter(), 0
    todo = []
    for item in mine:
        row = done.get(item.image_id)
        target = out_dir / f"{Path(item.file_name).stem}.{image_format}"
        if not (row and target.exists() and sha256_file(target) == row["sha256"]):
            todo.append(item)
    n_skip = len(mine) - len(todo)
    bar = tqdm(total=len(todo), desc=f"{setting} shard {shard[0]}/{shard[1]}", disable=not progress)
    with skip_mode_set(unet, skip_mode), open(mpath, "a") as manifest:
        for start in range(0, len(todo), layout_batch):
            group = todo[start:start + layout_batch]
            seeds = [image_seed(base_seed, item.image_id) for item in group]
            results = pipe.generate([item.layout for item in group], seeds, num_images=1,
                                    negative_prompt=negative_prompt, drop=drop, truncate_prompt=True, progress=False,
                                    max_batch=max_batch, **p)
            for item, seed, result in zip(group, seeds, results):
                fname = f"{Path(item.file_name).stem}.{image_format}"
                buf = io.BytesIO()
                if image_format == "jpg":
                    result.images[0].save(buf, format="JPEG", quality=quality)
                else:
                    result.images[0].save(buf, format="PNG")
                data = buf.getvalue()
                atomic_write_bytes(out_dir / fname, data)
                row = {"image_id": item.image_id, "file": fname, "seed": seed, "config_hash": config_hash,
                       "sha256": hashlib.sha256(data).hexdigest(), "setting": setting,
                       "n_instances": len(item.layout.instances)}
                manifest.write(json.dumps(row) + "\n")
                manifest.flush()
                os.fsync(manifest.fileno())
                n_gen += 1
            bar.update(len(group))
            bar.set_postfix(img_per_s=f"{n_gen / (time.perf_counter() - t0):.2f}")
    bar.close()
    secs = time.perf_counter() - t0
    summary = GenerationSummary(out_dir, shard, len(mine), n_gen, n_skip, secs)
    print(f"{setting} shard {shard[0]}/{shard[1]}: {n_gen} generated, {n_skip} already there, "
          f"{summary.images_per_s:.3f} images/s")
    return summary

