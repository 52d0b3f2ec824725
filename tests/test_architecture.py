"""The layering that README's "Where things are" describes, read from the code's own imports.

Each unit (a sub-package of ``instdiff_lib`` or a top-level module) sits on a layer; an import may only point to a
lower layer. ``evaluation.metrics`` never imports the model, and nothing imports a notebook or a job script.
"""
import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "instdiff_lib"

# lowest first; a unit may import units of lower layers only (and itself)
LAYERS = [
    {"layouts", "model", "fileio", "offline"},
    {"results", "viz"},
    {"weights"},
    {"sampling", "datasets"},
    {"parity", "evaluation"},
    {"training", "extension", "playground"},
    {"bench"},
    {"report"},
    {"protocol_bench"},  # the full protocol's cost: reads the report's params files for its projection
    {"cli"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ``instdiff_lib`` modules (or packages) that ``path`` imports, absolute and relative imports alike."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
            out |= subs if len(subs) == len(node.names) else subs | {base}  # `from pkg import module` is not pkg
    return {m for m in out if m == "instdiff_lib" or m.startswith("instdiff_lib.")}


def _is_module(name: str) -> bool:
    path = LIB.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "instdiff_lib"


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in LIB.rglob("*.py")}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _graph()} - {"instdiff_lib"}
    assert units == set(RANK), f"units without a layer: {units - set(RANK)}; layers without a unit: {set(RANK) - units}"


def test_imports_point_downward_only():
    upward = []
    for me, targets in _graph().items():
        for t in targets:
            a, b = _unit(me), _unit(t)
            if a != b and a != "instdiff_lib" and (b == "instdiff_lib" or RANK[b] >= RANK[a]):
                upward.append(f"{me} -> {t}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    graph = _graph()

    def reachable(start):
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    # a package's __init__ re-exporting its own modules is not a cycle of the code's logic
    cycles = [m for m in graph if m in reachable(m) and m.count(".") > 1]
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_metrics_never_import_the_model():
    metrics = {m: t for m, t in _graph().items() if m.startswith("instdiff_lib.evaluation.metrics")}
    assert metrics, "the metrics package moved"
    bad = [f"{m} -> {t}" for m, ts in metrics.items() for t in ts
           if _unit(t) in {"model", "sampling", "weights", "training"}]
    assert not bad, bad


def test_the_library_never_imports_notebooks_or_jobs():
    for path in LIB.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in {"notebooks", "jobs", "tests"}], path


@pytest.mark.parametrize("package", sorted(p.parent.name for p in LIB.glob("*/__init__.py")))
def test_each_package_says_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse((LIB / package / "__init__.py").read_text())) or ""
    assert doc and ("import" in doc.lower()), f"{package}/__init__.py: docstring must say what it may import"
