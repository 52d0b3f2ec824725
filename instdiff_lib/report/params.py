"""The report's notebooks and their parameters: the notebook lists, the params files (``jobs/params/<profile>/``)
and the literals of each notebook's ``parameters`` cell, read without running anything. Imports nothing of the
report package, so the runner, the asset registry and the rehearsal can all read parameters without an import
cycle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from instdiff_lib.results import PROFILES, project_root

NOTEBOOKS = ("00_setup_check", "01_demos", "10_location_formats", "11_attribute_binding", "20_ablations",
             "30_extension", "99_blogpost")
GENERATION_NOTEBOOKS = ("10_location_formats", "11_attribute_binding", "20_ablations")  # their images: the array
# notebooks outside the report chain (never run by ``report all`` or SLURM): run one by name, e.g. the playground's
# headless example (``instdiff report notebook 02_playground``)
STANDALONE_NOTEBOOKS = ("02_playground",)


def notebook_path(name: str) -> Path:
    if name not in NOTEBOOKS + STANDALONE_NOTEBOOKS:
        raise ValueError(f"unknown notebook {name!r}; the report's notebooks are {list(NOTEBOOKS)} "
                         f"(and outside the chain {list(STANDALONE_NOTEBOOKS)})")
    return project_root() / "notebooks" / f"{name}.ipynb"


def params_path(name: str, profile: str, params_dir: str | os.PathLike | None = None) -> Path:
    """``jobs/params/<profile>/<name>.yaml``, or ``<params_dir>/<name>.yaml`` (a params set such as the rehearsal's)."""
    return Path(params_dir) / f"{name}.yaml" if params_dir else project_root() / "jobs" / "params" / profile / f"{name}.yaml"


def load_params(name: str, profile: str, params_file: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The papermill parameters of a notebook run: the params file (default: the profile's) plus overrides.

    Every key must be a parameter of the notebook (a typo would otherwise be silently ignored by papermill)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    path = Path(params_file) if params_file else params_path(name, profile)
    if not path.exists():
        raise FileNotFoundError(f"params file {path} not found")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of parameter names to values")
    params.update(overrides or {})
    declared = notebook_parameters(notebook_path(name))
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(f"{path}: {unknown} are not parameters of {name}.ipynb (it has {sorted(declared)})")
    if params.get("SMOKE", declared.get("SMOKE")) != (profile == "smoke"):
        raise ValueError(f"{path}: SMOKE={params.get('SMOKE')!r} contradicts profile {profile!r}")
    return params


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The literals of a notebook's ``parameters`` cell (parsed with ``ast``, never executed)."""
    import ast

    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    out = {}
    for node in ast.parse(cells[0].source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{path}: the parameters cell may only hold NAME = literal lines")
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def effective_params(name: str, profile: str, params_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """The values a notebook run will see: its parameters cell's literals, overridden by the params file."""
    return {**notebook_parameters(notebook_path(name)), **load_params(name, profile, params_file)}
