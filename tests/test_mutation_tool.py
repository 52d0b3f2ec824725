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
