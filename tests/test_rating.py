"""Tests for instdiff_lib.extension.rating: the rating sheet export and the ingestion of filled-in CSVs."""

import csv
import json

import pytest
from PIL import Image

from instdiff_lib.extension.rating import CSV_COLUMNS, RatingError, export_rating_sheet, ingest_ratings


@pytest.fixture
def sheet(tmp_path):
    files = []
    for k, colour in enumerate(["red", "green", "blue"]):
        p = tmp_path / "imgs" / f"{k}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(p)
        files.append(p)
    prompts = ["a dog, a cat", 'a "quoted" <b>prompt</b>', "a tractor\nin a field"]
    return export_rating_sheet(files, prompts, tmp_path / "sheet", shuffle_seed=1), prompts


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)
    return path


def test_export(sheet):
    paths, prompts = sheet
    text = paths["html"].read_text()
    assert text.count("data:image/png;base64,") == 3 and "<b>prompt</b>" not in text  # embedded, escaped
    assert "&lt;b&gt;prompt&lt;/b&gt;" in text and 'name="r2" value="5"' in text and "Save ratings as CSV" in text
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(CSV_COLUMNS) and [r[0] for r in rows[1:]] == ["0.png", "1.png", "2.png"]
    assert rows[3][1] == "a tractor\nin a field" and rows[1][2:] == ["", ""]
    man = json.loads(paths["manifest"].read_text())
    assert [e["image"] for e in man["images"]] == ["0.png", "1.png", "2.png"]
    assert sorted(man["display_order"]) == ["0.png", "1.png", "2.png"] and len(man["images"][0]["sha256"]) == 64
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        export_rating_sheet(["a", "b", "c"], ["x", "y"], paths["html"].parent)


def test_export_pil_images(tmp_path):
    paths = export_rating_sheet([Image.new("RGB", (4, 4))] * 2, ["p", "q"], tmp_path)
    man = json.loads(paths["manifest"].read_text())
    assert [e["image"] for e in man["images"]] == ["image_000", "image_001"]


def test_ingest(sheet, tmp_path):
    paths, prompts = sheet
    a = write_csv(tmp_path / "alice.csv", [["0.png", prompts[0], "alice", "2"], ["1.png", prompts[1], "alice", "3"],
                                           ["2.png", prompts[2], "alice", ""]])
    b = write_csv(tmp_path / "bob.csv", [["0.png", "", "bob", "1"], ["1.png", "", "bob", "5"],
                                         ["2.png", "", "", "4"]])  # no rater name on the last row -> file stem
    r = ingest_ratings([a, b], paths["manifest"])
    assert r["n_ratings"] == 5 and r["n_raters"] == 2 and r["n_blank"] == 1 and r["n_images_rated"] == 3
    assert r["metrics"]["realism_mean"] == pytest.approx(15 / 5)
    assert r["histogram"] == {"1": 1, "2": 1, "3": 1, "4": 1, "5": 1}
    assert r["per_rater"]["alice"]["mean"] == pytest.approx(2.5)
    assert r["per_rater"]["bob"]["mean"] == pytest.approx(10 / 3) and r["per_rater"]["bob"]["n"] == 3
    assert r["per_image"]["0.png"] == {"n": 2, "mean": 1.5}
    assert r["metrics"]["rater_mean_min"] == 2.5 and any("bob" in n for n in r["notes"])
    json.dumps(r)  # ready for write_results


def test_ingest_rejects_bad_rows(sheet, tmp_path):
    paths, prompts = sheet
    bad = write_csv(tmp_path / "bad.csv", [["0.png", "", "carol", "6"], ["9.png", "", "carol", "3"],
                                           ["1.png", "", "carol", "3.5"], ["2.png", "", "carol", "2"],
                                           ["2.png", "", "carol", "4"], ["0.png", "another prompt", "dan", "1"]])
    with pytest.raises(RatingError) as e:
        ingest_ratings(bad, paths["manifest"])
    msg = str(e.value)
    assert msg.startswith("5 problem(s)")
    for part in ("bad.csv:2: rating '6'", "unknown image '9.png'", "'3.5'", "rated '2.png' twice", "differs"):
        assert part in msg
    (tmp_path / "nohdr.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RatingError, match="missing column"):
        ingest_ratings(tmp_path / "nohdr.csv", paths["manifest"])
    blank = write_csv(tmp_path / "blank.csv", [["0.png", "", "eve", ""]])
    with pytest.raises(RatingError, match="no ratings found"):
        ingest_ratings(blank, paths["manifest"])
