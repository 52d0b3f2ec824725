"""Results files with provenance: the only source of numbers for the report.

``write_results(path, metrics, params=..., n_evaluated=..., profile="smoke"|"full")`` writes JSON like::

    {"metrics": {...}, "params": {...}, "n_evaluated": 5000, "n_skipped": 0, "profile": "full",
     "provenance": {"git_sha": "...", "git_dirty": false, "versions": {...}, "device": "...", ...},
     "wall_time_s": 1234.5}

Smoke results are labelled as such and never enter a paper table (the blog renderer checks ``profile``); so are the
full-profile results of the rehearsal (``$INSTDIFF_REHEARSAL`` set: ``profile`` becomes ``"rehearsal"``).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from instdiff_lib.fileio import atomic_write_text

PROFILES = ("smoke", "full")
REHEARSAL = "rehearsal"  # the label of full-profile results written by `instdiff rehearse` (synthetic assets)
REHEARSAL_ENV = "INSTDIFF_REHEARSAL"  # set by `instdiff rehearse` for every stage it runs


def in_rehearsal() -> bool:
    return os.environ.get(REHEARSAL_ENV, "") not in ("", "0")
TRACKED_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "safetensors", "numpy", "pycocotools",
                    "ultralytics", "open_clip_torch", "torchmetrics", "scikit-image", "papermill")


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


# What a report run itself rewrites: changes there do not make the code that produced a result "dirty" (otherwise
# every notebook after the first, and any rerun whose numbers move, would be stamped dirty by its siblings' output).
REPORT_OUTPUTS = ("results", "figures", "blogpost.md")


def git_state(root: Path | None = None) -> dict[str, Any]:
    """HEAD's SHA and whether tracked files other than the report's own outputs (``REPORT_OUTPUTS``) differ from it."""
    root = root or project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        exclude = [f":(exclude){p}" for p in REPORT_OUTPUTS]
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *exclude],
                                    cwd=root, capture_output=True, text=True, check=True).stdout.strip())
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": None, "git_dirty": None}


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def device_description() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
        return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    except ImportError:  # pragma: no cover
        return f"cpu: {platform.machine()}"


def provenance() -> dict[str, Any]:
    return {**git_state(), "versions": package_versions(), "python": platform.python_version(),
            "device": device_description(), "host": platform.node(),
            "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def write_results(path: str | Path, metrics: dict[str, Any], *, params: dict[str, Any], n_evaluated: int,
                  n_skipped: int = 0, profile: str, wall_time_s: float | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if profile == "full" and in_rehearsal():
        profile = REHEARSAL  # synthetic assets, random weights: labelled so, never a "full" (paper-table) result
    doc = {"metrics": metrics, "params": params, "n_evaluated": n_evaluated, "n_skipped": n_skipped,
           "profile": profile, "wall_time_s": wall_time_s, "provenance": provenance(), **(extra or {})}
    return atomic_write_text(path, json.dumps(doc, indent=2, default=_jsonable))


def read_results(path: str | Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    for key in ("metrics", "params", "n_evaluated", "profile", "provenance"):
        if key not in doc:
            raise ValueError(f"{path}: not a results file (missing {key!r})")
    return doc


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
