"""What a notebook run holds: its name, parameters and profile; where its figures and results go.

    run = start("10_location_formats", SMOKE=SMOKE, N_IMAGES=N_IMAGES, ...)
    run.figure(fig, "ap_by_format")          # -> figures/10_location_formats__ap_by_format.png
    run.write(metrics, n_evaluated=..., n_skipped=...)   # -> results/10_location_formats.json (with provenance)

Relative paths in parameters are relative to the project root (:meth:`NotebookRun.path`), so a notebook
behaves the same from JupyterLab (cwd ``notebooks/``), papermill or a SLURM job.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from instdiff_lib.results import project_root, write_results


def figures_dir() -> Path:
    return Path(os.environ.get("INSTDIFF_FIGURES_DIR", project_root() / "figures"))


def results_dir() -> Path:
    return Path(os.environ.get("INSTDIFF_RESULTS_DIR", project_root() / "results"))


class NotebookRun:
    def __init__(self, name: str, params: dict[str, Any]):
        if "SMOKE" not in params:
            raise ValueError("every notebook has a SMOKE parameter (first in its parameters cell)")
        self.name = name
        self.params = dict(params)
        self.profile = "smoke" if params["SMOKE"] else "full"
        self.t0 = time.perf_counter()
        self.figures: list[str] = []
        self.steps: dict[str, Any] = {}  # what a notebook's steps produced for its results file (setup, demos)

    @property
    def smoke(self) -> bool:
        return self.profile == "smoke"

    def path(self, p: str | os.PathLike) -> Path:
        p = Path(p)
        return p if p.is_absolute() else project_root() / p

    def figure(self, obj, name: str) -> Path:
        """Save a matplotlib Figure or a PIL image as ``figures/<notebook>__<name>.png``; returns the path."""
        target = figures_dir() / f"{self.name}__{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if hasattr(obj, "savefig"):
            obj.savefig(target, dpi=120, bbox_inches="tight")
        else:
            obj.save(target)
        rel = target.relative_to(project_root()) if target.is_relative_to(project_root()) else target
        if str(rel) not in self.figures:
            self.figures.append(str(rel))
        return target

    def write(self, metrics: dict[str, Any], *, n_evaluated: int, n_skipped: int = 0,
              extra: dict[str, Any] | None = None) -> Path:
        return write_results(results_dir() / f"{self.name}.json", metrics, params=self.params,
                             n_evaluated=n_evaluated, n_skipped=n_skipped, profile=self.profile,
                             wall_time_s=round(time.perf_counter() - self.t0, 2),
                             extra={"notebook": self.name, "figures": self.figures, **(extra or {})})


def start(name: str, **params: Any) -> NotebookRun:
    """Begin a notebook run (call it in the cell after the parameters cell with every parameter)."""
    from instdiff_lib.offline import setup_offline_env

    setup_offline_env()
    return NotebookRun(name, params)


def show(run: NotebookRun, names: list[str] | None = None) -> None:
    """Display the run's saved figures inline (in JupyterLab and in the executed/HTML copies)."""
    from IPython.display import Image, display

    for rel in run.figures:
        if names is None or any(rel.endswith(f"__{n}.png") for n in names):
            display(Image(filename=str(run.path(rel))))
