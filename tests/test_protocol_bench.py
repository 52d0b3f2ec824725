"""``instdiff bench --protocol``: its cost model follows the sampler's own call count, its projection counts the images
the full profile's params files ask for, and the measurement runs end to end (tiny model, CPU; nothing is timed)."""
import json

import pytest
import torch

from instdiff_lib.bench import synthetic_layout
from instdiff_lib.protocol_bench import (coco_instance_counts, format_protocol, mis_evaluations, predict_seconds,
                                         project_protocol, protocol_images, run_protocol_bench)
from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline
from instdiff_lib.sampling.sampler import SamplerStats
from instdiff_lib.weights.checkpoint import build_components

COST = {"unet_s": {"2": 1.0, "4": 2.0, "8": 3.0}, "rest_s": 0.5}


def test_cost_model_by_hand():
    # 50 steps, MIS 0.36: int(18) MIS steps + the improved-Euler step's second call = 19 of the 51 evaluations
    assert mis_evaluations(50, 0.36, 3) == 19
    assert mis_evaluations(50, 0.36, 0) == 0  # no instances: no MIS branch
    assert mis_evaluations(50, 0.0, 5) == 0
    assert mis_evaluations(2, 0.5, 1) == 2
    assert predict_seconds(COST, 0, 50, 0.36) == pytest.approx(51 * 1.0 + 0.5)
    assert predict_seconds(COST, 1, 50, 0.36) == pytest.approx(32 * 1.0 + 19 * 2.0 + 0.5)  # batch 4
    assert predict_seconds(COST, 2, 50, 0.36) == pytest.approx(32 * 1.0 + 19 * 2.5 + 0.5)  # batch 6: interpolated
    assert predict_seconds(COST, 5, 50, 0.36) == pytest.approx(32 * 1.0 + 19 * 4.0 + 0.5)  # batch 12: extrapolated
    assert predict_seconds(COST, 40, 50, 0.36) == predict_seconds(COST, 30, 50, 0.36)  # 30 instances at most


@pytest.mark.parametrize("steps,mis,n", [(5, 0.4, 2), (4, 0.0, 3), (3, 0.36, 1), (6, 0.5, 0)])
def test_cost_model_counts_the_samplers_unet_samples(steps, mis, n):
    """The evaluations the cost model charges at each batch size are the UNet samples the sampler really runs."""
    pipe = InstanceDiffusionPipeline(build_components("tiny"))
    stats = SamplerStats()
    branches, uc = pipe.prepare(synthetic_layout(n, size=pipe.cfg.image_size), seed=0, num_images=1,
                                negative_prompt="", mis=mis)
    pipe.sampler.sample(pipe.noise(0, 1), branches, uc, steps=steps, mis=mis, progress=False, stats=stats)
    k = mis_evaluations(steps, mis, n)
    assert stats.unet_calls == 2 * (steps + 1 - k) + 2 * (n + 1) * k
    assert stats.unet_batches == steps + 1  # batched: one UNet call per guided evaluation


def test_full_profile_images_counted_once_per_folder():
    folders = protocol_images("full")
    by_nb = {}
    for f in folders:
        for nb in f["notebooks"]:
            by_nb.setdefault(nb, []).append(f)
    # 10: 4 settings x 5000; 11: colour and texture x 5000; 20: 14 distinct configurations (the base + 13 ablated
    # values) x 3 seeds x 500. At seed 0 four of them are 10's folders, counted once at 5000: the base (10's mask
    # setting) and drop=box/point/all (what the box, point and scribble settings feed: Variant.images_setting)
    assert sorted(f["variant"].setting for f in by_nb["10_location_formats"]) == ["box", "mask", "point", "scribble"]
    assert len(by_nb["11_attribute_binding"]) == 2 and len(by_nb["20_ablations"]) == 14 * 3
    shared = [f for f in folders if len(f["notebooks"]) == 2]
    assert sorted((f["variant"].images_setting, f["notebooks"], f["seed"], f["images"]) for f in shared) == [
        (s, ["10_location_formats", "20_ablations"], 0, 5000) for s in ("box", "mask", "point", "scribble")]
    assert len(folders) == 4 + 2 + 14 * 3 - 4
    assert sum(f["images"] for f in folders) == 6 * 5000 + (14 * 3 - 4) * 500


def test_projection_uses_each_variants_mis_and_steps():
    proj = project_protocol(COST, "full", mean_instances=1.0)  # every image: 1 instance, a batch of 4 while MIS runs
    rows = {r["folder"]: r for r in proj["folders"]}
    for r in rows.values():
        k = mis_evaluations(r["steps"], r["mis"], 1)
        assert r["s_per_image"] == pytest.approx((r["steps"] + 1 - k) * 1.0 + k * 2.0 + 0.5, abs=1e-3)
    mis0 = [r for r in rows.values() if r["mis"] == 0.0]
    assert mis0 and all(r["s_per_image"] == pytest.approx(51.5) for r in mis0)
    assert proj["images"] == 6 * 5000 + 38 * 500
    assert proj["gpu_hours"] == pytest.approx(sum(r["images"] * r["s_per_image"] for r in rows.values()) / 3600,
                                              abs=0.1)


def test_coco_instance_histogram(tmp_path):
    (tmp_path / "annotations").mkdir()
    anns = [{"image_id": 2, "iscrowd": 0}] * 2 + [{"image_id": 3, "iscrowd": 1}] + [{"image_id": 3, "iscrowd": 0}] * 34
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": [{"id": 1}, {"id": 2}, {"id": 3}], "annotations": anns}))
    assert coco_instance_counts(tmp_path) == {0: 1, 2: 1, 30: 1}  # crowd counts; more than 30 are cut to 30
    at_mean = project_protocol(COST, "full", mean_instances=10 / 3)
    exact = project_protocol(COST, "full", coco_root=tmp_path)
    assert exact["instances"] == "COCO histogram" and exact["gpu_hours"] != at_mean["gpu_hours"]


def test_protocol_bench_runs_end_to_end(tmp_path):
    cost = run_protocol_bench(config="tiny", device="cpu", dtype=torch.float32, steps=3, batches=(2, 4), repeats=1,
                              mis_counts=(2,), settings=("box", "scribble"), counts=(1, 3), images_per_setting=2,
                              out_dir=tmp_path, log=lambda *_: None)
    assert set(cost["unet_s"]) == {"2", "4"} and all(s > 0 for s in cost["unet_s"].values())
    (row,) = cost["mis_compare"]
    assert row["batched"]["unet_forward_passes"] == 3 + 1  # one UNet call per guided evaluation
    assert row["official_order"]["unet_forward_passes"] == 2 * 3 * 2 + 2 * 2  # 2 MIS evaluations of 3 branches
    assert row["max_abs_diff"] < 1e-4  # the batched sampler computes what the official order does
    assert [(r["setting"], r["instances"]) for r in cost["end_to_end"]] == [
        ("box", 1), ("box", 3), ("scribble", 1), ("scribble", 3)]
    assert sorted(p.name for p in (tmp_path / "box").glob("*.jpg")) == ["000000000001.jpg", "000000000002.jpg"]
    text = format_protocol(cost, project_protocol(cost, "full"))
    assert "49000 images" in text and "scribble" in text
