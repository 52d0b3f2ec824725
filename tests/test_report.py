"""The report: notebook lint, parameters/params files, the papermill runner, the blog renderer, seed statistics."""

from __future__ import annotations

import ast
import json
import math
import re

import nbformat
import numpy as np
import pytest

from instdiff_lib.evaluation.experiments import Variant, ablation_variants, aggregate, ci95, RunRecord, variant_folder
from instdiff_lib.report.runner import (NOTEBOOKS, STANDALONE_NOTEBOOKS, load_params, notebook_parameters, notebook_path,
                                        params_path)
from instdiff_lib.results import PROFILES, project_root, write_results

ABSOLUTE = re.compile(r"""["'](/(home|work|root|tmp|Users|mnt|data)\b|[A-Za-z]:\\)""")


def test_every_notebook_is_known():
    """A notebook the runner does not know would escape the lint below."""
    on_disk = sorted(p.stem for p in (project_root() / "notebooks").glob("*.ipynb"))
    assert on_disk == sorted(NOTEBOOKS + STANDALONE_NOTEBOOKS)
    assert not set(NOTEBOOKS) & set(STANDALONE_NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS + STANDALONE_NOTEBOOKS)
def test_notebook_lint(name):
    """One literal parameters cell (SMOKE first), thin code cells (no def/class/installs/absolute paths), no outputs."""
    nb = nbformat.read(notebook_path(name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} parameters cells"
    body = ast.parse(tagged[0].source).body
    assert body and isinstance(body[0], ast.Assign) and body[0].targets[0].id == "SMOKE", "SMOKE must come first"
    for node in body:
        assert isinstance(node, ast.Assign), f"{name}: parameters cell holds {type(node).__name__}"
        ast.literal_eval(node.value)  # literals only
    assert code.index(tagged[0]) == 0, "the parameters cell is the first code cell"
    for c in code:
        assert not c.get("outputs"), f"{name}: stored with outputs"
        assert c.get("execution_count") is None, f"{name}: stored with execution counts"
        src = c.source
        tree = ast.parse(src)
        assert not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
                       for n in ast.walk(tree)), f"{name}: logic belongs in instdiff_lib, not the notebook"
        assert not re.search(r"^\s*[!%]", src, re.M), f"{name}: shell/magic lines (installs?) in a notebook"
        assert "pip install" not in src
        assert not ABSOLUTE.search(src), f"{name}: absolute path in {src[:80]!r}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert all(m.split(".")[0] in ("instdiff_lib", "IPython") for m in mods), f"{name}: imports {mods}"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", NOTEBOOKS + STANDALONE_NOTEBOOKS)
def test_params_files_load(name, profile):
    params = load_params(name, profile)
    assert params["SMOKE"] == (profile == "smoke")
    assert set(params) <= set(notebook_parameters(notebook_path(name)))


def test_params_rejects_unknown_and_contradictions(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("SMOKE: true\nN_IMAGE: 3\n")  # typo of N_IMAGES
    with pytest.raises(ValueError, match="N_IMAGE"):
        load_params("10_location_formats", "smoke", bad)
    bad.write_text("SMOKE: true\n")
    with pytest.raises(ValueError, match="contradicts"):
        load_params("10_location_formats", "full", bad)
    with pytest.raises(ValueError, match="unknown notebook"):
        notebook_path("42_nothing")
    assert params_path("01_demos", "full").exists()


def test_ci95_is_student_t():
    from scipy import stats

    v = [0.5, 0.6, 0.7]
    s = ci95(v)
    sd = np.std(v, ddof=1)
    assert s["mean"] == pytest.approx(0.6)
    assert s["sd"] == pytest.approx(sd)
    assert s["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    one = ci95([0.4, float("nan")])
    assert one["n_seeds"] == 1 and math.isnan(one["ci95"]) and one["mean"] == 0.4


def test_aggregate_and_ablation_variants():
    base = Variant("base", "mask", steps=5)
    pairs = ablation_variants(base, {"mis": [0.0, 0.36], "alpha": [0.0]})
    assert [v.name for _, v in pairs] == ["mis=0.0", "mis=0.36", "alpha=0.0"]
    assert pairs[1][1].key() == base.key()  # the base value: same folder, images reused
    assert pairs[0][1].key() != base.key()
    assert Variant("m", "mask", steps=5, drop="mask").key() == base.key()  # the setting's own preset
    # another setting's preset makes that setting's images: one folder, scored as each variant's own setting
    box_only = Variant("drop=box", "mask", steps=5, drop="box")
    assert box_only.images_setting == "box" and box_only.key() == Variant("box", "box", steps=5).key() != base.key()
    assert variant_folder("o", box_only, 1) == variant_folder("o", Variant("b", "box", steps=5), 1)
    assert Variant("a", "mask", drop="all").images_setting == "scribble"
    assert Variant("c", "color", drop="box").images_setting == "color"  # no plain setting has its attribute
    recs = [RunRecord(base, s, "f", {"box_AP50": v}, 10, 10, 0, 1.0) for s, v in enumerate([0.2, 0.4])]
    rows = aggregate(recs)
    assert rows["base"]["metrics"]["box_AP50"]["mean"] == pytest.approx(0.3)
    assert rows["base"]["n_evaluated"] == 20 and rows["base"]["seeds"] == [0, 1]
    with pytest.raises(ValueError):
        Variant("x", "real")


def _row(values: dict[str, list[float]], n: int) -> dict:
    return {"metrics": {k: ci95(v) for k, v in values.items()}, "n_evaluated": n * len(next(iter(values.values()))),
            "n_images_per_seed": n, "seeds": list(range(len(next(iter(values.values()))))), "variant": {},
            "gen_seconds": 10.0, "n_generated": n}


def test_blog_tables_come_from_results(tmp_path, monkeypatch):
    """Smoke numbers only in the Shapes table; a full-profile file fills 'ours' and Δ = ours − paper."""
    from instdiff_lib.report import reported
    from instdiff_lib.report.blog import render_blog

    res = tmp_path / "results"
    monkeypatch.setenv("INSTDIFF_RESULTS_DIR", str(res))
    smoke = {"world": "Shapes (mini scale)", "rows": {"box": _row({"box_AP50": [0.61, 0.63, 0.65]}, 16)},
             "real": {"metrics": {"box_AP50": 0.97}, "n_images": 16}}
    write_results(res / "10_location_formats.json", smoke, params={"SMOKE": True}, n_evaluated=48, profile="smoke",
                  extra={"notebook": "10_location_formats"})
    gap = {"true": 0.1, "shuffled": 0.102, "null": 0.13, "gap_null": 0.03, "gap_shuffled": 0.002, "n_images": 256}
    write_results(res / "00_setup_check.json", {"image_seconds": 1.0}, params={"SMOKE": True}, n_evaluated=1,
                  profile="smoke", extra={"setup": {"parity": None, "grounding_gap": gap, "model": "mini-x"},
                                          "notebook": "00_setup_check"})
    out, info = render_blog(tmp_path / "blog.md", res)
    text = out.read_text()
    assert "mini-x: diffusion loss on 256 Shapes train images" in text
    assert "no layout 0.1300 (+30.00%)" in text and "layout 0.1020 (+2.00%)" in text
    assert "not run at full scale" in text
    assert "63.0 ±" in text  # mean of the smoke values, in the Shapes table
    paper_box = text.split("**boxes**")[1].split("**masks**")[0]
    assert "63.0" not in paper_box  # ...and never in the paper table
    assert "results/10_location_formats.json" in info["sources"]

    full = {"rows": {"box": _row({"box_AP50": [0.5123]}, 5000)}}
    write_results(res / "10_location_formats.json", full, params={"SMOKE": False}, n_evaluated=5000, profile="full",
                  extra={"notebook": "10_location_formats"})
    text = render_blog(tmp_path / "blog.md", res)[0].read_text()
    paper_box = text.split("**boxes**")[1].split("**masks**")[0]
    ap50_line = next(l for l in paper_box.splitlines() if l.startswith("| AP50 |"))
    expected_delta = 51.23 - reported.PAPER_NUMBERS[("boxes", "InstanceDiffusion")]["AP50"]
    assert "51.2" in ap50_line and f"{expected_delta:+.1f}" in ap50_line and "5000" in ap50_line
    assert str(reported.SEED_NUMBERS["boxes"]["AP50"]) in ap50_line


def test_compute_table_tells_scoring_only_reruns(tmp_path, monkeypatch):
    """A notebook that scored images an earlier run generated shows 0 generated, what it scored, and the note."""
    from instdiff_lib.report.blog import render_blog

    res = tmp_path / "results"
    monkeypatch.setenv("INSTDIFF_RESULTS_DIR", str(res))
    fresh = {"rows": {"box": _row({"box_AP50": [0.1, 0.2]}, 8)}}
    rerun = {"rows": {"base": {**_row({"box_AP50": [0.3]}, 8), "n_generated": 0, "gen_seconds": 0.0}}}
    for name, m in (("10_location_formats", fresh), ("21_rescored", rerun)):
        write_results(res / f"{name}.json", m, params={"SMOKE": True}, n_evaluated=16, profile="smoke",
                      extra={"notebook": name})
    text = render_blog(tmp_path / "blog.md", res)[0].read_text().split("## Measured compute")[1].split("## ")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith(("| 10_", "| 21_"))}
    assert rows["10_location_formats"][-3:] == ["0.80", "8", "16"]  # 8 generated in 10 s, 2 seeds x 8 scored
    assert rows["21_rescored"][-3:] == ["–", "–", "8"]
    assert "21_rescored scored images that an earlier run had generated" in text
    assert "10_location_formats scored" not in text


@pytest.mark.slow
def test_blog_notebook_runs_with_papermill(tmp_path, monkeypatch):
    """99_blogpost executes headless (a real kernel), writes its results file with provenance and the blog."""
    from instdiff_lib.report.runner import run_notebook

    monkeypatch.setenv("INSTDIFF_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("INSTDIFF_FIGURES_DIR", str(tmp_path / "figures"))
    blog = tmp_path / "blog.md"
    params = tmp_path / "p.yaml"
    params.write_text(f"SMOKE: true\nOUT: {json.dumps(str(blog))}\n")
    executed = run_notebook("99_blogpost", "smoke", params, out_dir=tmp_path / "exec")
    assert executed.exists() and executed.with_suffix(".html").exists()
    doc = json.loads((tmp_path / "results" / "99_blogpost.json").read_text())
    assert doc["profile"] == "smoke" and doc["provenance"]["git_sha"]
    assert blog.read_text().startswith("<!-- generated")


def test_failed_notebook_names_the_executed_copy(tmp_path, monkeypatch):
    from instdiff_lib.report.runner import NotebookFailed, run_notebook

    monkeypatch.setenv("INSTDIFF_RESULTS_DIR", str(tmp_path / "results"))
    params = tmp_path / "p.yaml"
    params.write_text("SMOKE: true\nOUT: /nonexistent-dir/blog.md\n")
    with pytest.raises(NotebookFailed, match="99_blogpost.ipynb"):
        run_notebook("99_blogpost", "smoke", params, out_dir=tmp_path / "exec", html=False, progress=False)
    assert (tmp_path / "exec" / "99_blogpost.ipynb").exists()


def test_report_never_imports_notebooks_or_jobs():
    lib = project_root() / "instdiff_lib"
    for py in lib.rglob("*.py"):
        src = py.read_text()
        assert not re.search(r"^\s*(from|import)\s+(notebooks|jobs)\b", src, re.M), py


def test_training_record_names_the_committed_models_departures_and_the_blog_prints_them(tmp_path):
    """The recipe table comes from the model folder's own files: change a field there and the row follows."""
    import shutil
    from types import SimpleNamespace

    from instdiff_lib.report.blog import training_paragraph
    from instdiff_lib.report.sections import training_record
    from instdiff_lib.weights.embedded import default_model

    run = SimpleNamespace(steps={})
    table = training_record(run, SimpleNamespace(name="shapes", model=default_model()))
    rec = run.steps["training"]
    assert table.loc["fuser attention", "this model"].startswith("instance-masked")
    assert table.loc["prediction", "this model"] == "v_prediction"
    assert rec["reproduce"].startswith("instdiff train shapes") and f"--steps {rec['steps']}" in rec["reproduce"]
    text = training_paragraph(rec)
    assert rec["reproduce"] in text and "| fuser attention | full self-attention" in text

    folder = tmp_path / "m"
    shutil.copytree(default_model(), folder)
    cfg = json.loads((folder / "model_config.json").read_text())
    cfg["fuser_attention"] = "full"
    (folder / "model_config.json").write_text(json.dumps(cfg))
    training_record(run, SimpleNamespace(name="shapes", model=str(folder)))
    assert run.steps["training"]["recipe"][1]["this model"] == "full (as released)"
    assert training_record(run, SimpleNamespace(name="coco", model="x")).startswith("the released checkpoint")


def test_ablation_table_gets_the_floor_and_ceiling_of_its_base_setting(tmp_path):
    """The ablation table is followed by the shuffled floor and real-image row of its base setting (from 10), and by
    nothing when 10 has no floor for that setting."""
    from instdiff_lib.report.blog import ablation_scale

    def stat(mean):
        return {"mean": mean, "ci95": 0.01}

    loc = {"profile": "smoke", "metrics": {"rows": {"mask": {"n_images_per_seed": 16}},
                                           "shuffled": {"mask": {"metrics": {"box_AP50": stat(0.016)}}},
                                           "real": {"metrics": {"box_AP50": 0.808}}}}
    abl = {"profile": "smoke", "metrics": {"base": {"setting": "mask"}}}
    line = ablation_scale(abl, loc)[0]
    assert "setting `mask`, 16 images per seed" in line and "box_AP50: floor 1.6 ± 1.0, real images 80.8" in line
    assert ablation_scale({"profile": "smoke", "metrics": {"base": {"setting": "box"}}}, loc) == []
    assert ablation_scale(abl, dict(loc, profile="full")) == []
    # 20's own floor and ceiling (scored on its base images) win over 10's
    own = {"profile": "smoke", "metrics": {"base": {"setting": "mask"},
                                           "shuffled": {"base": {"metrics": {"box_AP50": stat(0.05)},
                                                                 "n_images_per_seed": 4}},
                                           "real": {"metrics": {"box_AP50": 0.75}, "n_images": 4}}}
    line = ablation_scale(own, loc)[0]
    assert "`results/20_ablations.json`" in line and "4 images per seed" in line
    assert "box_AP50: floor 5.0 ± 1.0, real images 75.0" in line
    assert ablation_scale(own, None) == ablation_scale(own, loc)
