"""``instdiff bench --quality``: the acceptance bars judged on results files, never recomputed."""
import json

import pytest

from instdiff_lib.bench import format_bars, quality_bars


def _row(**metrics):
    return {"metrics": {k: {"mean": v, "values": [v]} for k, v in metrics.items()}}


def _write(root, *, gap=(0.1, 0.105), box=0.45, real_box=0.85, floor=0.1, colour=0.6, texture=0.5,
           real_attr=(0.95, 0.85), alpha0=0.1, base=0.4, profile="smoke"):
    files = {
        "00_setup_check": {"setup": {"grounding_gap": {"true": gap[0], "null": gap[1], "gap_null": gap[1] - gap[0]}}},
        "10_location_formats": {"metrics": {"rows": {"box": _row(box_AP50=box)}, "real": {"metrics": {"box_AP50": real_box}},
                                            "shuffled": {"box": _row(box_AP50=floor)}}},
        "11_attribute_binding": {"metrics": {"rows": {"color": _row(attr_acc=colour), "texture": _row(attr_acc=texture)},
                                             "real": {"metrics": {"color_acc": real_attr[0], "texture_acc": real_attr[1]}}}},
        "20_ablations": {"metrics": {"rows": {"base": _row(box_AP50=base), "alpha=0.0": _row(box_AP50=alpha0)}}},
    }
    for name, d in files.items():
        (root / f"{name}.json").write_text(json.dumps(dict(d, profile=profile)))


def _by_name(bars):
    return {b.name: b for b in bars}


def test_all_bars_pass_on_good_results(tmp_path):
    _write(tmp_path)
    bars = quality_bars(tmp_path)
    assert all(b.passed for b in bars), format_bars(bars)
    assert format_bars(bars).splitlines()[-1] == "PASS"
    b = _by_name(bars)
    assert b["grounding gap, null layout (fraction of the loss)"].value == pytest.approx(0.05)
    assert b["box AP50 / real-image box AP50"].value == pytest.approx(0.45 / 0.85)
    assert b["box AP50 / shuffled-layout box AP50"].value == pytest.approx(4.5)


@pytest.mark.parametrize("change, bar", [
    (dict(gap=(0.1, 0.102)), "grounding gap, null layout (fraction of the loss)"),
    (dict(box=0.35), "box AP50 / real-image box AP50"),
    (dict(floor=0.2), "box AP50 / shuffled-layout box AP50"),
    (dict(real_box=0.7, box=0.36), "real images: box AP50"),
    (dict(colour=0.49), "colour accuracy"),
    (dict(texture=0.44), "texture accuracy"),
    (dict(real_attr=(0.89, 0.85)), "real crops: colour accuracy"),
    (dict(real_attr=(0.95, 0.79)), "real crops: texture accuracy"),
    (dict(alpha0=0.21), "ablations: alpha=0 box AP50 / base box AP50"),
])
def test_each_bar_fails_alone_just_below_its_threshold(tmp_path, change, bar):
    _write(tmp_path, **change)
    failed = [b.name for b in quality_bars(tmp_path) if not b.passed]
    assert failed == [bar]


def test_a_missing_file_or_a_full_run_is_not_judged_as_smoke(tmp_path):
    _write(tmp_path)
    (tmp_path / "20_ablations.json").unlink()
    bars = _by_name(quality_bars(tmp_path))
    assert bars["ablations: alpha=0 box AP50 / base box AP50"].value is None
    assert "missing" in format_bars(list(bars.values()))
    _write(tmp_path, profile="full")
    with pytest.raises(ValueError, match="smoke"):
        quality_bars(tmp_path)
    _write(tmp_path)
    (tmp_path / "10_location_formats.json").write_text("{truncated")
    with pytest.raises(ValueError, match="10_location_formats.json is not a readable results file"):
        quality_bars(tmp_path)


def test_a_zero_floor_passes_only_above_zero(tmp_path):
    _write(tmp_path, floor=0.0)
    assert _by_name(quality_bars(tmp_path))["box AP50 / shuffled-layout box AP50"].passed
    _write(tmp_path, floor=0.0, box=0.0, real_box=0.85)
    assert not _by_name(quality_bars(tmp_path))["box AP50 / shuffled-layout box AP50"].passed
