"""Sharded, resumable evaluation generation."""

from dataclasses import dataclass

import pytest
import torch

from instdiff_lib.weights.checkpoint import build_components
from instdiff_lib.evaluation.generation import ManifestError, generate_eval, image_seed, parse_shard, read_manifest
from instdiff_lib.layouts.layout import Instance, Layout
from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline


@dataclass
class Item:
    image_id: int
    file_name: str
    layout: Layout


@pytest.fixture(scope="module")
def pipe():
    return InstanceDiffusionPipeline(build_components("tiny", seed=0))


@pytest.fixture(scope="module")
def items():
    out = []
    for k, image_id in enumerate([139, 285, 632, 724, 776]):
        x = 0.1 + 0.1 * k
        out.append(Item(image_id, f"{image_id:012d}.jpg",
                        Layout(f"scene {k}", 512, 512, [Instance(caption=f"object {k}", box=(x, 0.2, x + 0.3, 0.7))])))
    return out


FAST = dict(steps=2, mis=0.0, progress=False)


def test_shards_union_equals_single_run(tmp_path, pipe, items):
    single = tmp_path / "single"
    generate_eval(items, single, pipe, "box", **FAST)
    sharded = tmp_path / "sharded"
    for i in range(3):
        generate_eval(items, sharded, pipe, "box", shard=(i, 3), **FAST)
    a, b = read_manifest(single), read_manifest(sharded)
    assert [r["image_id"] for r in a] == [it.image_id for it in items]
    assert [(r["image_id"], r["seed"], r["sha256"]) for r in a] == [(r["image_id"], r["seed"], r["sha256"]) for r in b]
    assert (single / "000000000139.jpg").read_bytes() == (sharded / "000000000139.jpg").read_bytes()


def test_kill_midway_resumes_and_loses_nothing(tmp_path, pipe, items):
    class Dies:
        def __init__(self, pipe, after):
            self.pipe, self.after, self.n = pipe, after, 0
            self.c, self.cfg, self.dtype = pipe.c, pipe.cfg, pipe.dtype

        def __call__(self, *a, **kw):
            if self.n == self.after:
                raise KeyboardInterrupt("killed")
            self.n += 1
            return self.pipe(*a, **kw)

    with pytest.raises(KeyboardInterrupt):
        generate_eval(items, tmp_path, Dies(pipe, 2), "box", **FAST)
    assert len(read_manifest(tmp_path)) == 2
    first = {r["image_id"]: r["sha256"] for r in read_manifest(tmp_path)}
    s = generate_eval(items, tmp_path, pipe, "box", **FAST)
    assert (s.n_generated, s.n_skipped_existing) == (3, 2)
    rows = read_manifest(tmp_path)
    assert len(rows) == 5 and all(first[r["image_id"]] == r["sha256"] for r in rows if r["image_id"] in first)
    assert not list(tmp_path.glob("*.tmp"))
    # a damaged image is regenerated, identically
    victim = tmp_path / rows[0]["file"]
    good = victim.read_bytes()
    victim.write_bytes(b"garbage")
    assert generate_eval(items, tmp_path, pipe, "box", **FAST).n_generated == 1
    assert victim.read_bytes() == good


def test_other_configuration_is_refused(tmp_path, pipe, items):
    generate_eval(items[:1], tmp_path, pipe, "box", **FAST)
    with pytest.raises(ManifestError, match="another configuration"):
        generate_eval(items[:1], tmp_path, pipe, "mask", **FAST)


def test_seed_and_shard_parsing():
    assert image_seed(0, 139) == image_seed(0, 139) != image_seed(1, 139)
    assert parse_shard("2/8") == (2, 8)
    for bad in ("8/8", "x/2", "3"):
        with pytest.raises(ValueError):
            parse_shard(bad)
