"""Guards against scoring the wrong images (shared/spec/prior_reproductions.md §0, §1.7).

An earlier reproduction reported YOLOv8m-seg's published real-image COCO numbers as its "generated image"
scores: a dangling symlink made the detector read the real val2017 photos. These checks make that loud:

* :func:`check_manifest` -- the folder holds exactly the files its generation manifest lists (no missing, no
  extra image, no symlink, matching sha256), and returns the ``(image_id, path)`` list to score;
* :func:`real_image_copies` / :func:`assert_generated` -- no "generated" file is a real image: byte-identical,
  pixel-identical after decoding (a PNG re-encode of a JPEG), pixel-identical to the real image resized to the
  generated size, or (``near=True``) a near-duplicate at thumbnail scale (a resized and re-compressed copy);
* :func:`sanity_flag_real_like` -- AP values that sit on the published real-image numbers.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from instdiff_lib.fileio import sha256_file

__all__ = [
    "GuardError",
    "IMAGE_EXTS",
    "check_manifest",
    "CopyMatch",
    "real_image_copies",
    "assert_generated",
    "sanity_flag_real_like",
    "REAL_IMAGE_NUMBERS",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_MAX_LISTED = 10


class GuardError(RuntimeError):
    """The images about to be scored are not (only) the generated ones."""


def _listed(items: list, n: int = _MAX_LISTED) -> str:
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(x) for x in items[:n]) + more


# ----------------------------------------------------------------------------------------------------------
# manifest


def _row_file(row: Mapping) -> str:
    for key in ("file", "file_name", "path"):
        if key in row:
            return str(row[key])
    raise GuardError(f"manifest row has no 'file' / 'file_name' / 'path': {dict(row)}")


def check_manifest(folder: str | os.PathLike, manifest_rows: Iterable[Mapping], *,
                   image_exts: Sequence[str] = IMAGE_EXTS, verify_sha256: bool = True) -> list[tuple]:
    """Refuse a folder whose image files do not match its manifest; return [(image_id, path)] in manifest order.

    Rows are dicts with ``image_id``, ``file`` (or ``file_name`` / ``path``, relative to ``folder``) and
    optionally ``sha256`` (as written by ``instdiff_lib.evaluation.generation``). Raises :class:`GuardError` listing the first
    offenders of every kind: duplicate ids or files in the manifest, listed files that are missing, paths that
    leave the folder or are symlinks, image files under the folder (recursively) that the manifest does not
    list, and sha256 mismatches (when the row has ``sha256`` and ``verify_sha256``).
    """
    root = Path(folder)
    if not root.is_dir():
        raise GuardError(f"{root} is not a directory")
    root_real = root.resolve()
    rows = list(manifest_rows)
    problems: dict[str, list] = {}

    def add(kind, item):
        problems.setdefault(kind, []).append(item)

    seen_ids, seen_files, out, listed = set(), set(), [], set()
    for row in rows:
        rel = _row_file(row)
        if "image_id" not in row:
            add("row without image_id", rel)
        image_id = row.get("image_id")
        if image_id in seen_ids and image_id is not None:
            add("duplicate image_id in manifest", image_id)
        seen_ids.add(image_id)
        path = root / rel
        key = os.path.normpath(rel)
        if key in seen_files:
            add("duplicate file in manifest", rel)
        seen_files.add(key)
        listed.add(os.path.normcase(os.path.abspath(path)))
        if path.is_symlink():
            add("symlink (refused: the file must be in the folder itself)", rel)
            continue
        if not path.is_file():
            add("missing file", rel)
            continue
        if root_real not in path.resolve().parents:
            add("path outside the folder", rel)
            continue
        if verify_sha256 and row.get("sha256") and sha256_file(path) != row["sha256"]:
            add("sha256 mismatch", rel)
        out.append((image_id, path))

    exts = {e.lower() for e in image_exts}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in exts and (p.is_file() or p.is_symlink()):
            if os.path.normcase(os.path.abspath(p)) not in listed:
                add("image file not in the manifest", p.relative_to(root).as_posix())

    if problems:
        lines = [f"{root}: files do not match the manifest ({len(rows)} rows)"]
        lines += [f"  {kind} ({len(items)}): {_listed(items)}" for kind, items in problems.items()]
        raise GuardError("\n".join(lines))
    return out


# ----------------------------------------------------------------------------------------------------------
# copies of real images


class CopyMatch(tuple):
    """A (generated path, real path) pair, with ``kind``: "bytes", "pixels", "resized:<resample>" or "near"."""

    def __new__(cls, gen, real, kind: str):
        obj = super().__new__(cls, (gen, real))
        obj.kind = kind
        return obj

    @property
    def gen(self):
        return self[0]

    @property
    def real(self):
        return self[1]

    def __repr__(self):
        return f"CopyMatch({self[0]!s} == {self[1]!s}, kind={self.kind!r})"


_THUMB = 32  # thumbnail side for the near-duplicate check


def _pixel_key(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _describe(path: Path, want_thumb: bool, keep_image: bool = False) -> tuple:
    """(byte sha256, decoded-RGB hash, (w, h), thumbnail, PIL RGB image if keep_image) of one file, read once."""
    from PIL import Image

    data = path.read_bytes()
    byte_key = hashlib.sha256(data).hexdigest()
    try:
        import io

        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except Exception:  # noqa: BLE001 -- not an image: only the byte hash applies
        return byte_key, None, None, None, None
    arr = np.asarray(rgb)
    thumb = None
    if want_thumb:
        thumb = np.asarray(rgb.resize((_THUMB, _THUMB), Image.Resampling.BOX), dtype=np.float32).reshape(-1)
    return byte_key, _pixel_key(arr), rgb.size, thumb, (rgb if keep_image else None)


def _expand(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        d = Path(paths)
        if not d.is_dir():
            raise GuardError(f"{d} is not a directory")
        return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    return [Path(p) for p in paths]


_RESAMPLES = ("bicubic", "bilinear", "lanczos", "nearest", "box")


def real_image_copies(generated: Sequence[str | os.PathLike], real: Sequence[str | os.PathLike] | str | os.PathLike,
                      *, resized: bool = True, resamples: Sequence[str] = ("bicubic", "bilinear", "lanczos"),
                      near: bool = False, near_tol: float = 6.0) -> list[CopyMatch]:
    """Generated files that are copies of real images: [(gen, real)] (:class:`CopyMatch`, with ``.kind``).

    Each file is read and decoded once. Kinds, first hit wins per generated file:
    ``bytes`` (same sha256), ``pixels`` (same decoded RGB pixels: a lossless re-encode, e.g. a PNG of a JPEG),
    ``resized:<r>`` (pixel-identical to the real image resized with PIL ``<r>`` to the generated size; done only
    for sizes where a real image differs from the generated one, ``resized=False`` turns it off), and with
    ``near=True`` ``near`` (mean absolute RGB difference of 32x32 box-filtered thumbnails <= ``near_tol`` grey
    levels: catches resized and re-compressed copies; a genuinely generated image is tens of levels away).
    ``real`` is a list of paths or a directory (searched recursively for image files). What is needed of each real
    image is computed once and kept (:class:`_RealIndex`): later calls decode no real image they have seen.
    """
    gens = [Path(p) for p in generated]
    reals = _expand(real)
    if not gens or not reals:
        return []
    for r in resamples:
        if r not in _RESAMPLES:
            raise ValueError(f"unknown resample {r!r}; choose from {_RESAMPLES}")

    gen_info = {g: _describe(g, near) for g in gens}
    by_bytes, by_pixels = {}, {}
    for g, (bk, pk, _, _, _) in gen_info.items():
        by_bytes.setdefault(bk, []).append(g)
        if pk is not None:
            by_pixels.setdefault(pk, []).append(g)
    gen_sizes = {info[2] for info in gen_info.values() if info[2] is not None}

    found: dict[Path, CopyMatch] = {}
    real_thumbs, real_paths = [], []
    index = _RealIndex.open(reals)
    for r in reals:
        d = index.get(r, gen_sizes if resized else (), resamples)
        for g in by_bytes.get(d["bytes"], []):
            found.setdefault(g, CopyMatch(g, r, "bytes"))
        if d["pixels"] is None:
            continue
        for g in by_pixels.get(d["pixels"], []):
            found.setdefault(g, CopyMatch(g, r, "pixels"))
        if resized:
            for gs in gen_sizes:
                if gs == d["size"]:
                    continue
                for name in resamples:
                    for g in by_pixels.get(d["resized"][f"{gs[0]}x{gs[1]}:{name}"], []):
                        found.setdefault(g, CopyMatch(g, r, f"resized:{name}"))
        if near:
            real_thumbs.append(d["thumb"])
            real_paths.append(r)
    index.save()

    if near and real_thumbs:
        todo = [g for g in gens if g not in found and gen_info[g][3] is not None]
        if todo:
            R = np.stack(real_thumbs)  # (n_real, 3072)
            for g in todo:
                d = np.abs(R - gen_info[g][3][None, :]).mean(axis=1)
                j = int(np.argmin(d))
                if d[j] <= near_tol:
                    found[g] = CopyMatch(g, real_paths[j], "near")
    return [found[g] for g in gens if g in found]


class _RealIndex:
    """What the guard needs of each real image (byte and pixel hashes, size, thumbnail, hashes of its resized copies),
    computed once and kept in ``.cache/real_index/`` (one file per real folder, entries keyed by path, size and
    mtime): a scoring call then decodes no real image that an earlier call has seen (5,000 for COCO)."""

    _memory: dict[str, dict] = {}

    def __init__(self, path: Path | None, entries: dict):
        self.path, self.entries, self.dirty = path, entries, False

    @classmethod
    def open(cls, reals: Sequence[Path]) -> "_RealIndex":
        if not reals:
            return cls(None, {})
        from instdiff_lib.results import project_root

        folder = os.path.commonpath([str(Path(r).resolve().parent) for r in reals])
        path = project_root() / ".cache" / "real_index" / f"{hashlib.sha256(folder.encode()).hexdigest()[:16]}.pkl"
        if str(path) not in cls._memory:
            entries = {}
            if path.is_file():
                import pickle

                try:
                    entries = pickle.loads(path.read_bytes())
                except Exception:  # noqa: BLE001 -- a broken cache is rebuilt
                    entries = {}
            cls._memory[str(path)] = entries
        return cls(path, cls._memory[str(path)])

    def get(self, real: Path, gen_sizes, resamples: Sequence[str]) -> dict:
        """The entry of one real image, with the hashes of its copies resized to every size in ``gen_sizes``."""
        from PIL import Image

        st = real.stat()
        key = f"{real.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        d = self.entries.get(key)
        wanted = [(gs, name, f"{gs[0]}x{gs[1]}:{name}") for gs in gen_sizes for name in resamples]
        if d is not None and d["pixels"] is not None and all(gs == d["size"] or k in d["resized"] for gs, _, k in wanted):
            return d
        bk, pk, size, thumb, rgb = _describe(real, True, keep_image=True)
        d = {"bytes": bk, "pixels": pk, "size": size, "thumb": thumb, "resized": dict(d["resized"]) if d else {}}
        for gs, name, k in wanted:
            if rgb is not None and gs != size and k not in d["resized"]:
                d["resized"][k] = _pixel_key(np.asarray(rgb.resize(gs, getattr(Image.Resampling, name.upper()))))
        self.entries[key] = d
        self.dirty = True
        return d

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        import pickle

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(self.entries))
        os.replace(tmp, self.path)
        self.dirty = False


def assert_generated(generated, real, **kwargs) -> int:
    """Raise :class:`GuardError` naming the generated files that are copies of real images
    (:func:`real_image_copies`); return the number of generated files checked."""
    gens = list(generated)
    hits = real_image_copies(gens, real, **kwargs)
    if hits:
        listed = [f"{h[0]} == {h[1]} ({h.kind})" for h in hits]
        raise GuardError(f"{len(hits)} of {len(gens)} 'generated' images are copies of real images: "
                         f"{_listed(listed)}")
    return len(gens)


# ----------------------------------------------------------------------------------------------------------
# numbers


# Published YOLOv8m-seg numbers on REAL COCO val2017 (ultralytics model card: box 49.9 / mask 40.8 mAP) and the
# paper's "upper bound (real images)" row (box 50.2 / 66.7, mask 40.8 / 63.5), in percent.
REAL_IMAGE_NUMBERS = {"box": {"AP": (49.9, 50.2), "AP50": (66.7, 66.8)}, "mask": {"AP": (40.8, 40.8),
                                                                                   "AP50": (63.5, 63.5)}}
_SETTING_KIND = {"box": "box", "bbox": "box", "mask": "mask", "segm": "mask"}


def _pct(v: float) -> float:
    return 100.0 * v if abs(v) <= 1.0 else float(v)


def sanity_flag_real_like(values: Mapping[str, float], setting: str, *, tol: float = 0.5) -> str | None:
    """A warning when AP sits on the published real-image numbers (YOLOv8m-seg on real COCO), else None.

    values: ``{"AP": ..., "AP50": ...}`` (fractions or percent) for ``setting`` "box"/"bbox" or "mask"/"segm";
    or keys ``AP_box`` / ``AP_mask`` (and ``AP50_box`` ...) for both at once, with any setting. ``setting``
    "real" (the real-image control) is never flagged. Flags when AP is within ``tol`` points of the real-image
    range; an AP50 within ``tol`` of the real-image AP50 is mentioned too.
    """
    if setting == "real":
        return None
    checks = []  # (kind, metric, value)
    for kind in ("box", "mask"):
        for metric in ("AP", "AP50"):
            key = f"{metric}_{kind}"
            if key in values:
                checks.append((kind, metric, values[key]))
    kind = _SETTING_KIND.get(setting)
    if kind is not None:
        for metric in ("AP", "AP50"):
            if metric in values:
                checks.append((kind, metric, values[metric]))
    hits = []
    for kind, metric, v in checks:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        lo, hi = REAL_IMAGE_NUMBERS[kind][metric]
        p = _pct(float(v))
        if lo - tol <= p <= hi + tol:
            hits.append((kind, metric, p, lo, hi))
    if not any(metric == "AP" for _, metric, *_ in hits):
        return None
    desc = "; ".join(f"{kind} {metric} {p:.1f} ~ real-image {lo:g}" + (f"-{hi:g}" if hi != lo else "")
                     for kind, metric, p, lo, hi in hits)
    return (f"WARNING ({setting}): {desc}. These are the published YOLOv8m-seg numbers on REAL COCO photos: check "
            "that the detector scored the generated images (check_manifest, assert_generated).")
