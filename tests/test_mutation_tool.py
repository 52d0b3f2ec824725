"""tools/mutation.py (the driver of `make mutation`): which mutated file a mutant name belongs to."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutation_tool", ROOT / "tools" / "mutation.py")
mutation = importlib.util.module_from_spec(_spec)
sys.modules["mutation_tool"] = mutation  # dataclasses look their module up while the file runs
_spec.loader.exec_module(mutation)


def test_mutant_names_map_to_their_file_package_init_included():
    files = mutation.TARGETS["detection"].files  # detection.py and the package's __init__.py
    init = "instdiff_lib/evaluation/metrics/__init__.py"
    det = "instdiff_lib/evaluation/metrics/detection.py"
    assert set(files) == {init, det}
    assert mutation._file_of("instdiff_lib.evaluation.metrics.detection.x_coco_ap__mutmut_3", files) == det
    assert mutation._file_of("instdiff_lib.evaluation.metrics.x_rle_area__mutmut_9", files) == init
    assert mutation._file_of("instdiff_lib.evaluation.metrics.xǁMetricResultǁsummary__mutmut_1", files) == init
    assert mutation._file_of("instdiff_lib.layouts.layout.x__px__mutmut_7",
                             mutation.TARGETS["layout"].files) == "instdiff_lib/layouts/layout.py"


def test_functions_restricts_mutmut_to_those_mutants_and_skips_the_retest_of_others(monkeypatch, tmp_path):
    import subprocess

    import pytest

    calls = []
    monkeypatch.setattr(mutation, "prepare", lambda name, t: mutation.ROOT / "outputs" / "mutation" / name)
    monkeypatch.setattr(mutation.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    undecided = [("m.x_f__mutmut_1", "survived"), ("m.x_g__mutmut_2", "not checked")]
    monkeypatch.setattr(mutation, "collect", lambda name, t: {"undecided": undecided, "timeouts": ["m.x_h__mutmut_3"]})
    t = mutation.TARGETS["sampler"]
    assert mutation.run("sampler", t, 2, recheck_timeouts=True, only=["*x_plms_combine*"]) == 0
    assert calls == [[calls[0][0], "run", "--max-children", "2", "*x_plms_combine*"]]
    calls.clear()
    assert mutation.run("sampler", t, 1, recheck_timeouts=True) == 0  # the whole module: earlier survivors again
    assert len(calls) == 2 and calls[0][-1] == "1"
    assert calls[1][4:] == ["m.x_f__mutmut_1", "m.x_h__mutmut_3"]  # never the untested ones
    with pytest.raises(SystemExit):
        mutation.main(["pim", "guards", "--functions", "*x*"])
