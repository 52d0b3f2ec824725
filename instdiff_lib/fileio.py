"""Safe file writes and hashing, shared by every writer in the project.

Each ``atomic_*`` writes to ``<name>.tmp`` beside the target and renames it: a killed process leaves either
the old file or the new one under the final name, never a half-written one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_image(img, path: str | os.PathLike, **save_kwargs) -> Path:
    """A PIL image, format from the suffix (``.jpg`` -> JPEG)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"), **save_kwargs)
    os.replace(tmp, path)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
