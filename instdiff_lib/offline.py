"""Offline environment for ultralytics and the Hugging Face stack (no network but package registries).

Call :func:`setup_offline_env` *before* ``import ultralytics`` (ultralytics reads ``YOLO_OFFLINE`` and
``YOLO_CONFIG_DIR`` at import time). This module itself imports neither ultralytics nor matplotlib.

What it does (shared/spec/offline_setup.md §2, §8), each env var only if it is not set already:

* ``YOLO_OFFLINE=1`` (skips the import-time DNS probe), ``YOLO_AUTOINSTALL=0`` (no ``pip install`` at run time),
  ``YOLO_CONFIG_DIR=<root>/.cache/ultralytics`` (settings file inside the project, not ``~/.config``);
* ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HOME=<root>/.cache/hf``;
* copies matplotlib's bundled ``DejaVuSans.ttf`` to ``$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf`` and
  ``Arial.Unicode.ttf`` (otherwise every PIL plot and training run sends a HEAD request to GitHub for the font);
* optionally (``configure_ultralytics=True``, the default, when ultralytics is installed) imports
  ``ultralytics.utils`` *after* the variables are set and updates its settings: ``sync=False`` (no telemetry) and
  ``datasets_dir`` / ``runs_dir`` / ``weights_dir`` inside the config dir. Pointing ``datasets_dir`` at an empty
  project folder means a stray ``data=coco.yaml`` can never silently find (or download) the real COCO photos, which
  is how an earlier reproduction ended up scoring real images (shared/spec/prior_reproductions.md §0, §1.7);
* keeps the CPU thread count: ``import ultralytics`` sets ``OMP_NUM_THREADS=1`` when it is unset, which made torch in
  this process and every process started from it (papermill kernels, the rehearsal's stages) run on one core. When
  the variable was unset before that import it is removed again, so torch keeps its own default (a value the user set
  is left as it is).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import threading
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["setup_offline_env", "project_root", "hub_offline", "reachable", "offline_reason"]

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")  # the two fonts ultralytics would fetch from GitHub


def project_root() -> Path:
    """The repo root (``$INSTDIFF_PROJECT_ROOT`` if set; else the checkout holding this file; else the cwd)."""
    if env := os.environ.get("INSTDIFF_PROJECT_ROOT"):
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").exists() else Path.cwd().resolve()


def _matplotlib_font() -> Path | None:
    """matplotlib's DejaVuSans.ttf, located without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if p.is_file():
            return p
    return None


def setup_offline_env(project_root: str | os.PathLike | None = None, *, configure_ultralytics: bool = True) -> dict:
    """Set the offline environment (see the module docstring). Idempotent; returns what it set / found.

    Returns a dict: ``env`` (the variables it set in this call), ``config_dir``, ``fonts`` (paths present),
    ``ultralytics_settings`` (the settings it applied, or None), ``late`` (True when ultralytics had already
    been imported before this call, so its import-time checks ran without ``YOLO_OFFLINE``; a warning is issued).
    """
    root = Path(project_root).expanduser().resolve() if project_root is not None else _default_root()
    late = "ultralytics" in sys.modules
    if late:
        warnings.warn("setup_offline_env() called after ultralytics was imported: YOLO_OFFLINE/YOLO_CONFIG_DIR "
                      "were read without it; call it before the first `import ultralytics`.", stacklevel=2)

    defaults = {
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "0",
        "YOLO_CONFIG_DIR": str(root / ".cache" / "ultralytics"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(root / ".cache" / "hf"),
    }
    set_now = {}
    for k, v in defaults.items():
        if k not in os.environ:
            os.environ[k] = v
            set_now[k] = v

    config_dir = Path(os.environ["YOLO_CONFIG_DIR"]).expanduser()
    ul_dir = config_dir / "Ultralytics"  # ultralytics appends this sub-directory to YOLO_CONFIG_DIR
    ul_dir.mkdir(parents=True, exist_ok=True)
    font = _matplotlib_font()
    fonts = []
    for name in FONT_NAMES:
        dst = ul_dir / name
        if not dst.exists() and font is not None:
            shutil.copyfile(font, dst)
        if dst.exists():
            fonts.append(str(dst))
    if len(fonts) < len(FONT_NAMES):
        warnings.warn(f"could not place {FONT_NAMES} in {ul_dir} (matplotlib not installed?): ultralytics plotting "
                      "will try to download them", stacklevel=2)

    applied = None
    if configure_ultralytics and importlib.util.find_spec("ultralytics") is not None:
        threads = None
        if "OMP_NUM_THREADS" not in os.environ and not late:
            import torch  # noqa: PLC0415  (ultralytics imports it anyway; its default thread count, fixed now)

            threads = torch.get_num_threads()
        from ultralytics.utils import SETTINGS  # noqa: PLC0415  (import only after the env is set)

        if threads is not None:  # ultralytics' import set OMP_NUM_THREADS=1: undo (see the module docstring)
            os.environ.pop("OMP_NUM_THREADS", None)
            torch.set_num_threads(threads)

        want = {
            "sync": False,
            "datasets_dir": str(ul_dir / "datasets"),
            "runs_dir": str(ul_dir / "runs"),
            "weights_dir": str(ul_dir / "weights"),
        }
        if any(SETTINGS.get(k) != v for k, v in want.items()):
            SETTINGS.update(want)
        applied = want

    return {"env": set_now, "config_dir": str(config_dir), "fonts": fonts, "ultralytics_settings": applied,
            "late": late}


def _default_root() -> Path:
    return project_root()


# ---- is a download possible right now? (shared by the CLIP, FID and grounding-model loaders) -----------
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself only reads it at import time) or as huggingface_hub saw it."""
    try:
        from huggingface_hub import is_offline_mode
        imported_offline = bool(is_offline_mode())
    except ImportError:
        imported_offline = False
    return imported_offline or _env_true("HF_HUB_OFFLINE")


def reachable(url: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` s (DNS included, bounded by a thread).

    With a proxy configured the probe cannot tell, so it answers True and leaves the decision to the real client.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])


def offline_reason(url: str, timeout: float = 2.0) -> str | None:
    """Why ``url`` cannot be downloaded now (``HF_HUB_OFFLINE`` set, or its host not answering), or None."""
    if hub_offline():
        return f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '1')!r}"
    if not reachable(url, timeout):
        return f"{urlparse(url).hostname} did not answer within {timeout:g} s"
    return None
