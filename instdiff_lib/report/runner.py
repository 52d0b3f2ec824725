"""Running the report's notebooks headless (papermill) and rendering them (nbconvert).

    instdiff report notebook 10_location_formats --profile smoke      # one notebook, params from jobs/params
    instdiff report all --profile smoke                                # every notebook in order, then the blog
    instdiff report generate --profile full --shard 3/16               # the generation array (SLURM) of 10, 11, 20
    instdiff report preflight --profile full                           # every asset checked first (report/assets.py)

Parameters come from ``jobs/params/<profile>/<notebook>.yaml`` (the same files the SLURM jobs use), overriding
the literals of the notebook's ``parameters`` cell. Executed notebooks go to
``outputs/report/<profile>/<notebook>.ipynb`` and ``.html``; the notebooks write ``results/<notebook>.json``
and ``figures/<notebook>__<name>.png`` themselves. Notebooks run with ``notebooks/`` as working directory,
exactly as JupyterLab runs them (library paths are anchored at the project root, not the cwd).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from instdiff_lib.report.params import (GENERATION_NOTEBOOKS, NOTEBOOKS, STANDALONE_NOTEBOOKS,  # noqa: F401 (re-exports)
                                        effective_params, load_params, notebook_parameters, notebook_path, params_path)
from instdiff_lib.results import PROFILES, project_root


class NotebookFailed(RuntimeError):
    """A notebook raised; the executed copy (with the traceback) is kept."""


def run_notebook(name: str, profile: str = "smoke", params_file: str | os.PathLike | None = None,
                 overrides: dict[str, Any] | None = None, out_dir: str | os.PathLike | None = None,
                 html: bool = True, progress: bool = True) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill; returns the executed copy. Raises :class:`NotebookFailed`."""
    import papermill as pm

    from instdiff_lib.offline import setup_offline_env

    setup_offline_env()  # inherited by the kernel: offline ultralytics / HF settings
    params = load_params(name, profile, params_file, overrides)
    out = Path(out_dir) if out_dir else project_root() / "outputs" / "report" / profile
    out.mkdir(parents=True, exist_ok=True)
    executed = out / f"{name}.ipynb"
    t0 = time.perf_counter()
    print(f"[report] {name} ({profile}) with {params}", flush=True)
    try:
        pm.execute_notebook(str(notebook_path(name)), str(executed), parameters=params, kernel_name="python3",
                            cwd=str(notebook_path(name).parent), progress_bar=progress, log_output=False)
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(f"{name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} (executed copy with the "
                             f"traceback: {executed})") from None
    finally:
        if html and executed.exists():
            to_html(executed)
    print(f"[report] {name} done in {time.perf_counter() - t0:.1f} s -> {executed}", flush=True)
    return executed


def to_html(executed: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    target = executed.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target


def run_all(profile: str = "smoke", only: list[str] | None = None, html: bool = True) -> list[Path]:
    """Every notebook in report order (or ``only`` those); stops at the first failure. The full profile checks
    every asset first (:func:`~instdiff_lib.report.assets.preflight`), so a missing one fails now, not hours in."""
    from instdiff_lib.report.assets import preflight

    names = [n for n in NOTEBOOKS if not only or n in only]
    preflight(profile, notebooks=names)
    return [run_notebook(n, profile, html=html) for n in names]


def generation_runs(run) -> list:
    """The (variant, seed) runs whose images a generation notebook scores: its settings (10, 11), or the base
    configuration and every ablation variant (20), each image folder once (a variant that only renames the base,
    e.g. its own value in an ablation group, shares the base's images). The generation array uses this list."""
    from instdiff_lib.report.sections import ablation_plan, variants

    runs = ablation_plan(run).variants if run.name == "20_ablations" else variants(run)
    unique = {v.key(): v for v in reversed(runs)}  # the first variant of each folder (the base before its renames)
    return [(v, seed) for v in runs if unique[v.key()] is v for seed in run.params["SEEDS"]]


def generate_shard(profile: str, shard: tuple[int, int], progress: bool = True,
                   params_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """Generate shard ``shard`` of the images of the generation notebooks (10, 11 and the ablations of 20) into the
    very folders the notebooks read (they then find them done and only score). For SLURM array jobs; resumable."""
    from instdiff_lib.evaluation.experiments import generate_variant
    from instdiff_lib.report.context import NotebookRun
    from instdiff_lib.report.sections import out_root, world_of

    counts = {"generated": 0, "reused": 0}
    world = None
    for name in GENERATION_NOTEBOOKS:
        params = effective_params(name, profile, params_path(name, profile, params_dir))
        run = NotebookRun(name, params)
        w = world_of(run)
        world = world if world is not None and _same_world(world, w) else w  # one model load for all three
        for variant, seed in generation_runs(run):
            s = generate_variant(world, variant, seed, out_root(run), run.params["N_IMAGES"], shard=shard,
                                 progress=progress)
            counts["generated"] += s.n_generated
            counts["reused"] += s.n_skipped_existing
    return counts


def _same_world(a, b) -> bool:
    keys = ("name", "model", "instances_json", "device", "dtype", "max_batch")
    return all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


def add_report_parser(sub) -> None:
    """``instdiff report notebook|all|generate|blog`` (registered by ``cli.py``)."""
    from instdiff_lib.evaluation.generation import parse_shard

    r = sub.add_parser("report", help="run the report's notebooks (papermill), its generation shards, its blog")
    rs = r.add_subparsers(dest="report_command", required=True)
    nb = rs.add_parser("notebook", help="run one notebook with papermill (params: jobs/params/<profile>/<name>.yaml)")
    nb.add_argument("name", choices=NOTEBOOKS + STANDALONE_NOTEBOOKS)
    nb.add_argument("--profile", choices=PROFILES, default="smoke")
    nb.add_argument("--params", default=None, help="params YAML (default: the profile's)")
    nb.add_argument("--no-html", action="store_true")
    nb.add_argument("--out-dir", default=None, help="executed copies (default outputs/report/PROFILE)")
    nb.set_defaults(func=lambda a: _ok(run_notebook(a.name, a.profile, a.params, html=not a.no_html,
                                                    out_dir=a.out_dir)))
    al = rs.add_parser("all", help="every notebook in order, then the blog (the report's main job)")
    al.add_argument("--profile", choices=PROFILES, default="smoke")
    al.add_argument("--only", nargs="+", choices=NOTEBOOKS, default=None)
    al.add_argument("--no-html", action="store_true")
    al.set_defaults(func=lambda a: _ok(run_all(a.profile, a.only, html=not a.no_html)))
    g = rs.add_parser("generate", help="generate one shard of the evaluation images of notebooks 10 and 11")
    g.add_argument("--profile", choices=PROFILES, default="smoke")
    g.add_argument("--shard", type=parse_shard, default=(0, 1), help="I/N, 0-based (SLURM_ARRAY_TASK_ID/N)")
    g.add_argument("--params-dir", default=None, help="params files of the notebooks (default jobs/params/PROFILE)")
    g.set_defaults(func=lambda a: _ok(print(generate_shard(a.profile, a.shard, params_dir=a.params_dir))))
    pf = rs.add_parser("preflight", help="check every asset of the profile; list all missing ones with their fetch "
                       "commands (exit 2)")
    pf.add_argument("--profile", choices=PROFILES, default="full")
    pf.add_argument("--params-dir", default=None, help="params files of the notebooks (default jobs/params/PROFILE)")
    pf.add_argument("--only", nargs="+", choices=NOTEBOOKS, default=None, help="only the assets of these notebooks")

    def _preflight(a):
        from instdiff_lib.report.assets import preflight

        preflight(a.profile, a.params_dir, a.only)
        return 0

    pf.set_defaults(func=_preflight)
    b = rs.add_parser("blog", help="render blogpost.md from results/*.json")
    b.add_argument("--out", default=None)

    def _blog(a):
        from instdiff_lib.report.blog import render_blog

        path, info = render_blog(a.out)
        print(f"{path}: {info['tables']} tables from {', '.join(info['sources']) or 'no results'}")
        return 0

    b.set_defaults(func=_blog)


def _ok(_: Any) -> int:
    return 0
