"""Human realism rating of generated images: export a rating sheet, ingest the filled-in ratings.

The seed rated 100 LLM-planned images 1-5 by hand (mean 2.38; prior_reproductions.md §1.11 a). To repeat that study:

1. :func:`export_rating_sheet` writes, into one folder,
   * ``rating_sheet.html``: a self-contained page (images embedded as data URIs) with a grid of the images, their
     prompts, a 1-5 choice per image, a rater-name field and a button that saves the filled-in CSV;
   * ``ratings_template.csv``: ``image,prompt,rater,rating`` with one row per image and the last two columns empty,
     for raters who prefer a spreadsheet;
   * ``rating_manifest.json``: the image ids, their source files and SHA-256 of their bytes, the criteria, the scale.
2. Each rater returns a CSV (one row per image they rated).
3. :func:`ingest_ratings` validates the CSVs against the manifest (integers 1-5, known images, no duplicate
   (rater, image) pairs, one prompt per image as exported) and returns a JSON-ready dict: overall mean/std/median,
   per-rater means, per-image means, the 1-5 histogram, and how many rows were left blank. Any invalid row raises
   :class:`RatingError` listing every problem (nothing is dropped silently).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import mimetypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SCALE", "CRITERIA", "CSV_COLUMNS", "RatingError", "export_rating_sheet", "read_manifest",
           "ingest_ratings"]

SCALE = (1, 2, 3, 4, 5)
CSV_COLUMNS = ("image", "prompt", "rater", "rating")
# the seed's criteria (§1.11 a)
CRITERIA = ("Do the instances fit the scene?", "Is the image well generated (no distorted people/animals, cut-off "
            "objects)?", "Are object sizes, arrangement and perspective realistic?")
SCALE_TEXT = "1 = very unrealistic, 2 = unrealistic, 3 = mixed, 4 = mostly realistic, 5 = realistic"


class RatingError(ValueError):
    """Invalid rating files; the message lists every problem (file, line, what is wrong)."""


def _image_bytes(src: Any) -> tuple[bytes, str, str | None]:
    """(bytes, mime type, source path or None) of a path or a PIL image (PIL -> PNG)."""
    from PIL import Image

    if isinstance(src, Image.Image):
        buf = io.BytesIO()
        src.save(buf, format="PNG")
        return buf.getvalue(), "image/png", None
    path = Path(src)
    data = path.read_bytes()
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return data, mime, str(path)


def export_rating_sheet(images: Sequence[Any], prompts: Sequence[str], out_dir: str | os.PathLike, *,
                        image_ids: Sequence[str] | None = None, title: str = "Realism rating",
                        shuffle_seed: int | None = None, criteria: Sequence[str] = CRITERIA) -> dict[str, Path]:
    """Write rating_sheet.html, ratings_template.csv and rating_manifest.json into ``out_dir``; return their paths.

    images: paths or PIL images; prompts: the text shown with each image; image_ids: the ids raters' CSVs use
    (default: the file names, or ``image_000`` ... for PIL images; must be unique). ``shuffle_seed``: show the images
    in a seeded random order (the CSV and manifest keep the given order), so the order cannot bias the ratings.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not images:
        raise ValueError("no images to rate")
    if image_ids is None:
        names = [Path(s).name if not hasattr(s, "save") else None for s in images]
        image_ids = [n if n else f"image_{k:03d}" for k, n in enumerate(names)]
        if len(set(image_ids)) != len(image_ids):  # same file names in different folders
            image_ids = [f"image_{k:03d}" for k in range(len(images))]
    image_ids = [str(i) for i in image_ids]
    if len(image_ids) != len(images) or len(set(image_ids)) != len(image_ids):
        raise ValueError("image_ids must be unique, one per image")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    entries = []
    for iid, src, prompt in zip(image_ids, images, prompts):
        data, mime, path = _image_bytes(src)
        entries.append({"image": iid, "prompt": str(prompt), "source": path,
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "_uri": f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"})
    order = list(range(len(entries)))
    if shuffle_seed is not None:
        order = [int(i) for i in np.random.default_rng(shuffle_seed).permutation(len(entries))]

    manifest = {"title": title, "scale": list(SCALE), "scale_text": SCALE_TEXT, "criteria": list(criteria),
                "csv_columns": list(CSV_COLUMNS), "display_order": [entries[i]["image"] for i in order],
                "shuffle_seed": shuffle_seed,
                "images": [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]}
    paths = {"manifest": out / "rating_manifest.json", "csv": out / "ratings_template.csv",
             "html": out / "rating_sheet.html"}
    paths["manifest"].write_text(json.dumps(manifest, indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for e in entries:
            w.writerow([e["image"], e["prompt"], "", ""])
    paths["html"].write_text(_html(title, [entries[i] for i in order], criteria))
    return paths


def _html(title: str, entries: list[dict], criteria: Sequence[str]) -> str:
    esc = html.escape
    cells = []
    for k, e in enumerate(entries):
        radios = "".join(
            f'<label><input type="radio" name="r{k}" value="{v}">{v}</label>' for v in SCALE)
        cells.append(
            f'<figure class="cell" data-image="{esc(e["image"], quote=True)}" '
            f'data-prompt="{esc(e["prompt"], quote=True)}">'
            f'<img src="{e["_uri"]}" alt="{esc(e["image"], quote=True)}">'
            f'<figcaption><div class="id">{esc(e["image"])}</div><div class="prompt">{esc(e["prompt"])}</div>'
            f'<div class="rate">{radios}</div></figcaption></figure>')
    crit = "".join(f"<li>{esc(c)}</li>" for c in criteria)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body{{font-family:sans-serif;margin:1em}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:1em}}
.cell{{margin:0;border:1px solid #ccc;padding:.5em}} .cell img{{width:100%;height:auto;display:block}}
.id{{font-size:.8em;color:#666}} .prompt{{margin:.3em 0}} .rate label{{margin-right:.6em}}
.bar{{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc}}
</style></head><body>
<h1>{esc(title)}</h1>
<p>Rate how realistic each image is, {esc(SCALE_TEXT)}. Consider:</p><ul>{crit}</ul>
<div class="bar">Rater name: <input id="rater" size="20"> <button onclick="save()">Save ratings as CSV</button>
<span id="status"></span></div>
<div class="grid">
{chr(10).join(cells)}
</div>
<script>
function q(v){{v=String(v);return /[",\\n\\r]/.test(v)?'"'+v.replace(/"/g,'""')+'"':v;}}
function save(){{
  var rater=document.getElementById('rater').value.trim();
  if(!rater){{alert('Please enter your name first.');return;}}
  var rows=[{json.dumps(list(CSV_COLUMNS))}.join(',')], n=0;
  document.querySelectorAll('.cell').forEach(function(c,k){{
    var r=c.querySelector('input[name=r'+k+']:checked');
    if(r){{n++;}}
    rows.push([c.dataset.image,c.dataset.prompt,rater,r?r.value:''].map(q).join(','));
  }});
  var a=document.createElement('a');
  a.href=URL.createObjectURL(new Blob([rows.join('\\n')+'\\n'],{{type:'text/csv'}}));
  a.download='ratings_'+rater.replace(/[^A-Za-z0-9_-]+/g,'_')+'.csv';a.click();
  document.getElementById('status').textContent=n+' of {len(entries)} images rated';
}}
</script></body></html>
"""


def read_manifest(manifest: str | os.PathLike | dict) -> dict:
    if isinstance(manifest, dict):
        return manifest
    return json.loads(Path(manifest).read_text())


def _histogram(values: Sequence[int]) -> dict[str, int]:
    return {str(v): int(sum(1 for x in values if x == v)) for v in SCALE}


def _stats(values: Sequence[int]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        return {"n": 0, "mean": None, "std": None, "median": None}
    return {"n": int(len(a)), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "median": float(np.median(a))}


def ingest_ratings(csv_paths: str | os.PathLike | Sequence[str | os.PathLike],
                   manifest: str | os.PathLike | dict) -> dict[str, Any]:
    """Validate filled-in rating CSVs against the manifest and summarise them (see the module doc).

    Rows with an empty rating are "not rated" (counted, not an error). A row whose ``rater`` is empty takes the CSV
    file's stem as rater (noted). Errors (unknown image, rating not an integer 1-5, duplicate (rater, image), a prompt
    that differs from the exported one, a missing column) are collected and raised together as RatingError.
    """
    paths = [csv_paths] if isinstance(csv_paths, (str, os.PathLike)) else list(csv_paths)
    if not paths:
        raise RatingError("no rating files given")
    man = read_manifest(manifest)
    prompts = {e["image"]: e["prompt"] for e in man["images"]}
    errors: list[str] = []
    notes: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    rows: list[tuple[str, str, int]] = []  # (rater, image, rating)
    n_blank = 0
    for p in paths:
        p = Path(p)
        try:
            text = p.read_text(encoding="utf-8-sig")  # spreadsheets often add a BOM
        except OSError as e:
            errors.append(f"{p}: cannot read ({e.strerror})")
            continue
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in ("image", "rater", "rating") if c not in (reader.fieldnames or [])]
        if missing:
            errors.append(f"{p}: missing column(s) {missing}; expected header {','.join(CSV_COLUMNS)}")
            continue
        defaulted = False
        for line, row in enumerate(reader, start=2):
            where = f"{p.name}:{line}"
            image = (row.get("image") or "").strip()
            rating = (row.get("rating") or "").strip()
            rater = (row.get("rater") or "").strip()
            if not image and not rating and not rater:
                continue  # an empty line
            if image not in prompts:
                errors.append(f"{where}: unknown image {image!r} (not in the manifest)")
                continue
            prompt = row.get("prompt")
            if prompt is not None and prompt.strip() and prompt.strip() != prompts[image].strip():
                errors.append(f"{where}: prompt for {image!r} differs from the exported one")
            if not rating:
                n_blank += 1
                continue
            if rating not in {str(v) for v in SCALE}:
                errors.append(f"{where}: rating {rating!r} for {image!r} is not an integer from 1 to 5")
                continue
            if not rater:
                rater, defaulted = p.stem, True
            key = (rater, image)
            if key in seen:
                errors.append(f"{where}: rater {rater!r} rated {image!r} twice (first at {seen[key]})")
                continue
            seen[key] = where
            rows.append((rater, image, int(rating)))
        if defaulted:
            notes.append(f"{p.name}: rows without a rater name were attributed to rater {p.stem!r}")
    if errors:
        shown = "\n  ".join(errors[:30])
        more = f"\n  ... and {len(errors) - 30} more" if len(errors) > 30 else ""
        raise RatingError(f"{len(errors)} problem(s) in the rating files:\n  {shown}{more}")
    if not rows:
        raise RatingError(f"no ratings found in {len(paths)} file(s) ({n_blank} rows left blank)")

    values = [r for _, _, r in rows]
    raters = sorted({r for r, _, _ in rows})
    per_rater = {r: {**_stats([v for rr, _, v in rows if rr == r]),
                     "histogram": _histogram([v for rr, _, v in rows if rr == r])} for r in raters}
    per_image = {}
    for e in man["images"]:
        vals = [v for _, i, v in rows if i == e["image"]]
        if vals:
            per_image[e["image"]] = {"n": len(vals), "mean": float(np.mean(vals))}
    overall = _stats(values)
    rater_means = [s["mean"] for s in per_rater.values()]
    return {
        "metrics": {"realism_mean": overall["mean"], "realism_std": overall["std"],
                    "realism_median": overall["median"],
                    "realism_mean_of_image_means": float(np.mean([s["mean"] for s in per_image.values()])),
                    "rater_mean_min": float(min(rater_means)), "rater_mean_max": float(max(rater_means))},
        "n_ratings": len(values), "n_raters": len(raters), "n_images": len(prompts),
        "n_images_rated": len(per_image), "n_blank": n_blank,
        "histogram": _histogram(values), "per_rater": per_rater, "per_image": per_image,
        "scale": list(SCALE), "files": [str(p) for p in paths], "notes": notes,
    }
