"""Mutation testing of the modules whose bugs would silently corrupt results (``make mutation``; not in CI).

    python tools/mutation.py                 # every module below, one after the other
    python tools/mutation.py pim guards      # some of them
    python tools/mutation.py --report        # the table of the last runs only (no mutmut)
    python tools/mutation.py --recheck-timeouts keymap   # also retest "timeouts" (spurious on an oversubscribed machine)
    python tools/mutation.py sampler --functions '*x_plms_combine*'   # a slow module in parts

Each module runs in its own scratch project ``outputs/mutation/<name>/``: a copy of ``instdiff_lib``, ``tests`` and
``pyproject.toml`` (plus a generated ``[tool.mutmut]`` section naming the module and ONLY the test files that
exercise it), and the data folders those tests read. mutmut writes its mutants under that folder's ``mutants/``;
the working tree is never touched. mutmut caches verdicts per function, so a rerun retests only what changed.

The score of a module is killed / (all mutants - the ones judged equivalent in tests/MUTATION.md); a timeout
counts as killed (the mutant made the tests hang), "no tests" and "survived" count against it. The table and the
undecided survivors are printed and written to ``outputs/mutation/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "outputs" / "mutation"
RECORD = ROOT / "tests" / "MUTATION.md"


@dataclass
class Target:
    files: list[str]  # files to mutate
    tests: list[str]  # the test files that exercise them (pytest arguments)
    functions: list[str] = field(default_factory=list)  # mutmut name globs; empty: every function of the files
    data: list[str] = field(default_factory=lambda: ["layouts"])  # folders the tests read, copied beside them


M = "instdiff_lib.evaluation.metrics"
TARGETS: dict[str, Target] = {
    "pim": Target(["instdiff_lib/evaluation/metrics/pim.py"], ["tests/test_pim.py"]),
    # detection.py: the COCO AP glue and mask IoU (the YOLO inference is checked against `yolo val` row by row)
    "detection": Target(["instdiff_lib/evaluation/metrics/detection.py", "instdiff_lib/evaluation/metrics/__init__.py"],
                        ["tests/test_detection.py", "tests/test_pim.py"],
                        [f"{M}.detection.x_coco_ap*", f"{M}.detection.x_mask_iou*", f"{M}.detection.x__empty*",
                         f"{M}.x_*", f"{M}.xǁMetricResultǁ*"]),
    "guards": Target(["instdiff_lib/evaluation/metrics/guards.py"], ["tests/test_guards.py"]),
    "layout": Target(["instdiff_lib/layouts/layout.py"], ["tests/test_layout.py"]),
    "derive": Target(["instdiff_lib/layouts/derive.py"], ["tests/test_derive.py"]),
    "keymap": Target(["instdiff_lib/weights/keymap.py"], ["tests/test_keymap.py"]),
    "unifusion": Target(["instdiff_lib/model/unifusion.py"], ["tests/test_model.py", "tests/test_parity.py"]),
    # test_fuser_mask: the only sampler runs of an instance-masked model (the regions of every path)
    "sampler": Target(["instdiff_lib/sampling/sampler.py"],
                      ["tests/test_sampler.py", "tests/test_parity.py", "tests/test_fuser_mask.py"]),
    # the instance-masked fusers (shapes-mini): the official configs never call them, so not the parity tests
    "fuser_mask": Target(["instdiff_lib/model/fuser_mask.py"], ["tests/test_fuser_mask.py", "tests/test_sampler.py"]),
}

# Written as the scratch project's root conftest.py: mutmut runs a mutant's tests with ``-x`` in no particular order,
# so a mutant that only the 1-second test kills could first sit through the 20-second ones. This runs the tests that
# were fastest in mutmut's stats run first (pytest loads this conftest before the tests' own; it changes no test).
FASTEST_FIRST = '''"""Written by tools/mutation.py: run the fastest tests first (mutmut stops at the first failure)."""
import json
from pathlib import Path


def pytest_collection_modifyitems(session, config, items):
    try:
        seconds = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):  # the stats run itself: nothing recorded yet
        return
    items.sort(key=lambda item: seconds.get(item.nodeid, float("inf")))
'''

KILLED = {1, 3, 36, 37, -24, 24, 152, 255}  # test failure, pytest internal error, timeouts, type check
STATUS = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", None: "not checked", -11: "segfault",
          -9: "segfault"}


def _sync_tree(src: Path, dst: Path) -> None:
    """Like rsync -a --delete for plain files: unchanged files keep their copy (and mtime)."""
    dst.mkdir(parents=True, exist_ok=True)
    want = {p.relative_to(src) for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    have = {p.relative_to(dst) for p in dst.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    for rel in have - want:
        (dst / rel).unlink()
    for rel in want:
        s, d = src / rel, dst / rel
        if not d.exists() or d.stat().st_mtime_ns != s.stat().st_mtime_ns or d.stat().st_size != s.stat().st_size:
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, d)


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare(name: str, t: Target) -> Path:
    """The scratch project of one module (created or brought up to date)."""
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    _sync_tree(ROOT / "instdiff_lib", work / "instdiff_lib")
    _sync_tree(ROOT / "tests", work / "tests")
    for d in t.data:
        if (ROOT / d).exists():
            _sync_tree(ROOT / d, work / d)
    files = [f for f in t.files if (ROOT / f).exists()]
    conftest = work / "conftest.py"
    if not conftest.exists() or conftest.read_text() != FASTEST_FIRST:
        conftest.write_text(FASTEST_FIRST)
    section = "\n".join([
        "", "[tool.mutmut]",
        'source_paths = ["instdiff_lib"]',
        f"only_mutate = {_toml_list(files)}",
        f"pytest_add_cli_args_test_selection = {_toml_list([x for x in t.tests if (ROOT / x).exists()])}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly"]',
        f"also_copy = {_toml_list([*t.data, 'conftest.py'])}",
        'process_isolation = "forkserver"',
        "use_git_change_detection = false",
        "use_setproctitle = false",
        "",
    ])
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.mutmut\].*?(?=\n\[|\Z)", "", text, flags=re.S)  # never two sections
    target = work / "pyproject.toml"
    new = text + section
    if not target.exists() or target.read_text() != new:
        target.write_text(new)
    return work


def run(name: str, t: Target, jobs: int, recheck_timeouts: bool = False, only: list[str] | None = None) -> int:
    """mutmut on one module; ``only``: mutant-name globs (e.g. ``*x_plms_combine*``) to test just those functions
    this time (a module of slow tests, done in parts; the rest keep their verdicts)."""
    work = prepare(name, t)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the copy under mutants/ must be the instdiff_lib that the tests import
    env.setdefault("INSTDIFF_PARITY_DIR", str(ROOT.parent / "shared" / "parity"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    # tests/conftest.py gives torch 2 threads; with several mutants at once that oversubscribes the cores (spinning
    # OpenMP threads: a 1-minute test file took 15 minutes with 2 jobs on 2 cores), so share the cores out
    env.setdefault("INSTDIFF_TEST_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, jobs))))
    env.setdefault("OMP_NUM_THREADS", env["INSTDIFF_TEST_THREADS"])
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = [str(mutmut), "run", "--max-children", str(jobs), *(only or t.functions)]
    print(f"== {name}: {' '.join(t.files)} with {' '.join(t.tests)} (in {work.relative_to(ROOT)})", flush=True)
    # mutmut keeps a verdict until the function changes; a survivor of an earlier run must meet the current tests
    again = [] if t.functions or only else [k for k, s in collect(name, t)["undecided"] if s != "not checked"]
    if recheck_timeouts and not only:  # a timeout on a starved machine may be spurious: another chance
        again += collect(name, t)["timeouts"]
    rc = subprocess.run(cmd, cwd=work, env=env).returncode
    if again and rc == 0:
        print(f"== {name}: retesting {len(again)} earlier survivors with the current tests", flush=True)
        rc = subprocess.run(cmd + again, cwd=work, env=env).returncode
    return rc


def equivalents() -> dict[str, str]:
    """Mutant name -> why it is equivalent, from the tables of tests/MUTATION.md (rows `| `name` | why |`)."""
    out = {}
    if RECORD.exists():
        for m in re.finditer(r"^\|\s*`([\w.ǁ]+__mutmut_\d+)`\s*\|\s*(.*?)\s*\|\s*$", RECORD.read_text(), re.M):
            out[m.group(1)] = m.group(2)
    return out


def _selected(key: str, t: Target) -> bool:
    from fnmatch import fnmatch

    return not t.functions or any(fnmatch(key, g) for g in t.functions)


def collect(name: str, t: Target) -> dict:
    work = WORK / name
    eq = equivalents()
    counts = {"killed": 0, "survived": 0, "no tests": 0, "other": 0, "equivalent": 0}
    survivors, timeouts = [], []
    for f in t.files:
        meta = work / "mutants" / (f + ".meta")
        if not meta.exists():
            continue
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if not _selected(key, t):
                continue
            if code in KILLED:
                counts["killed"] += 1
                if code in (36, -24, 24, 152):  # mutmut's timeouts (a CPU-seconds limit per mutant)
                    timeouts.append(key)
            elif key in eq and code in (0, 5, 33):
                counts["equivalent"] += 1
            else:
                status = STATUS.get(code, "suspicious")
                counts[status if status in counts else "other"] += 1
                survivors.append((key, status))
    total = sum(counts.values())
    scored = total - counts["equivalent"]
    score = counts["killed"] / scored if scored else float("nan")
    return {"module": name, "files": t.files, "tests": t.tests, **counts, "total": total, "score": score,
            "undecided": survivors, "timeouts": timeouts}


def report(names: list[str]) -> str:
    rows = [collect(n, TARGETS[n]) for n in names]
    lines = ["| module | mutants | killed | equivalent | survived | no tests | other | score |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["total"]:
            lines.append(f"| {r['module']} | not run | | | | | | |")
            continue
        lines.append(f"| {r['module']} | {r['total']} | {r['killed']} | {r['equivalent']} | {r['survived']} | "
                     f"{r['no tests']} | {r['other']} | {100 * r['score']:.1f}% |")
    for r in rows:
        if r["undecided"]:
            lines.append(f"\n{r['module']}: {len(r['undecided'])} mutants neither killed nor judged equivalent")
            lines += [f"    {k}: {s}" for k, s in r["undecided"]]
    text = "\n".join(lines) + "\n"
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "summary.md").write_text(text)
    (WORK / "summary.json").write_text(json.dumps(rows, indent=1))
    return text


def _file_of(key: str, files: list[str]) -> str:
    """The mutated file a mutant name belongs to: the longest module prefix (a package's ``__init__.py`` is the
    package's own name, a prefix of its sub-modules' names too)."""
    def module(f: str) -> str:
        m = f[:-3].replace("/", ".")
        return m[: -len(".__init__")] if m.endswith(".__init__") else m

    hits = [f for f in files if key.startswith(module(f) + ".")]
    return max(hits, key=lambda f: len(module(f))) if hits else files[0]


def show(names: list[str]) -> str:
    """The diff of every undecided survivor of the last runs (mutmut's own diff, read from the scratch copies)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    out = []
    for n in names:
        t = TARGETS[n]
        for key, status in collect(n, t)["undecided"]:
            path = _file_of(key, t.files)
            cwd = os.getcwd()
            os.chdir(WORK / n)
            try:
                diff = get_diff_for_mutant(key, path=path)
            except (FileNotFoundError, KeyError, ValueError) as e:  # show the others rather than stop
                diff = f"\n\n(no diff: {e})"
            finally:
                os.chdir(cwd)
            out.append(f"# {key}: {status}\n" + "\n".join(line for line in diff.splitlines()[2:]
                                                          if line.startswith(("+", "-", "@"))))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"default: all, in this order: {' '.join(TARGETS)}")
    ap.add_argument("--report", action="store_true", help="only print the table of the last runs")
    ap.add_argument("--show", action="store_true", help="only print the diffs of the undecided survivors")
    ap.add_argument("--recheck-timeouts", action="store_true",
                    help="also retest the mutants whose tests timed out (spurious on a starved machine)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MUTATION_JOBS", "1")),
                    help="mutants tested in parallel (default 1, or $MUTATION_JOBS)")
    ap.add_argument("--functions", action="append", default=None, metavar="GLOB",
                    help="test only the mutants whose names match (repeatable), e.g. '*x_plms_combine*'")
    args = ap.parse_args(argv)
    names = args.modules or list(TARGETS)
    if args.functions and len(names) != 1:
        ap.error("--functions needs exactly one module")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; choose from {list(TARGETS)}")
    if args.show:
        print(show(names))
        return 0
    rc = 0
    if not args.report:
        for n in names:
            rc = run(n, TARGETS[n], args.jobs, args.recheck_timeouts, args.functions) or rc
    print(report(names))
    return rc


if __name__ == "__main__":
    sys.exit(main())
