"""Tests for instdiff_lib.training.diffusion: the Shapes training set, the training step, resuming, export, dropout rates."""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from instdiff_lib.model.config import DropFlags, get_config
from instdiff_lib.layouts.layout import grounding_arrays
from instdiff_lib.datasets.shapes import ShapesSplit, shapes_layouts
from instdiff_lib.training.diffusion import (
    ShapesTrainSet,
    TrainConfig,
    Trainer,
    lr_schedule,
    add_train_parser,
    batch_indices,
    conditioning,
    grounding_gap,
    sample_drop_flags,
    step_noise,
)

N_IMAGES = 16


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons need a fixed intra-op thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="module")
def dataset(data_dir):
    return ShapesTrainSet(data_dir, N_IMAGES, seed=5, size=64, seg_size=64)


def _cfg(tmp_path, data_dir, **kw):
    base = dict(out_dir=str(tmp_path / "run"), data_dir=str(data_dir), n_train_images=N_IMAGES, data_seed=5,
                batch_size=2, steps=4, warmup_steps=2, log_every=1, ckpt_every=2, figure=str(tmp_path / "loss.png"),
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ---- data ------------------------------------------------------------------------------------------
def test_dataset_is_deterministic_and_matches_grounding_arrays(dataset, data_dir, tmp_path):
    other = ShapesTrainSet(tmp_path / "other", N_IMAGES, seed=5, size=64, seg_size=64, cache=False)
    cached = ShapesTrainSet(data_dir, N_IMAGES, seed=5, size=64, seg_size=64)  # read back from the cache file
    assert list(data_dir.glob("train_cache_*.npz"))
    idx = list(range(N_IMAGES))
    a, b, c = dataset.batch(idx), other.batch(idx), cached.batch(idx)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    assert dataset.captions == other.captions and dataset.instance_captions == other.instance_captions
    different = ShapesTrainSet(tmp_path / "seed6", 4, seed=6, size=64, seg_size=64, cache=False)
    assert not torch.equal(different.batch([0])["images"], a["images"][:1])

    # every field equals grounding_arrays(layout, seed=image_id, seg_size=64); images in [-1, 1]
    layouts = shapes_layouts(ShapesSplit.load(data_dir, "train"))
    for j in (0, 7, 15):
        image_id, _, layout = layouts[j]
        g = grounding_arrays(layout, seed=image_id, seg_size=64)
        for k, v in g.items():
            assert np.array_equal(a[k][j].numpy(), v), k
        n = len(layout.instances)
        assert dataset.instance_captions[j] == [inst.caption for inst in layout.instances]
        assert dataset.captions[j] == layout.caption
        ids = a["inst_ids"][j]
        tok = dataset.batch([j])["global_ids"][0]
        assert tok[0] == 49406 and (tok == 49407).any()
        assert (ids[:n, 0] == 49406).all() and (ids[n:] == 49407).all()
    assert a["images"].min() >= -1 and a["images"].max() <= 1 and a["images"].shape == (N_IMAGES, 3, 64, 64)


def test_batch_order_covers_each_epoch_once():
    seen = np.concatenate([batch_indices(10, 4, seed=3, step=s) for s in range(5)])  # 2 epochs of 10
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a new permutation per epoch
    assert np.array_equal(batch_indices(10, 4, 3, 2), batch_indices(10, 4, 3, 2))


# ---- conditioning dropout --------------------------------------------------------------------------
def _within(count, n, p, sigmas=4.5):
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_dropout_rates(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, batch_size=16)
    mcfg = get_config("shapes-mini")
    steps = 600
    nulls = caps = 0
    for s in range(steps):
        r = step_noise(cfg, mcfg, s)
        nulls += int(r.null.sum())
        caps += int(r.drop_caption.sum())
        assert r.t.min() >= 0 and r.t.max() < 1000 and r.noise.shape == (16, 12, 32, 32)
    n = steps * 16
    assert _within(nulls, n, 0.1) and _within(caps, n, 0.1), (nulls / n, caps / n)
    # per-batch unit (official): the whole batch at once
    rb = [step_noise(_cfg(tmp_path, data_dir, batch_size=8, null_grounding_unit="batch"), mcfg, s).null
          for s in range(400)]
    assert all(bool(x.all()) or not bool(x.any()) for x in rb)
    assert _within(sum(bool(x[0]) for x in rb), 400, 0.1)

    # modality drops (official reset_dropout_train), one draw per batch
    gen = torch.Generator().manual_seed(0)
    flags = [sample_drop_flags(gen) for _ in range(20000)]
    n = len(flags)
    masks_dropped = sum(f.masks for f in flags)
    point_only = sum(f.boxes and f.scribbles and f.masks and not f.points for f in flags)
    boxes_dropped = sum(f.boxes for f in flags)
    assert _within(masks_dropped, n, 0.1 + 0.9 * 0.1)  # point-only mode or the mask coin
    assert _within(point_only, n, 0.1 + 0.9 * 0.1 ** 3 * 0.9)
    assert _within(boxes_dropped, n, 0.1 + 0.9 * 0.01)  # boxes only go with the masks
    assert all(f.masks or not f.boxes for f in flags)  # masks kept => boxes kept
    assert all(f.masks or not f.points for f in flags)  # masks kept => points kept
    assert sum(f.points for f in flags) < 0.005 * n  # points are (almost) never dropped
    assert not any(all(f.as_tuple()) for f in flags)  # never everything
    p0 = sample_drop_flags(torch.Generator(), p_drop=0.0, p_point_only=0.0, p_seg_only=0.0)
    assert p0 == DropFlags.preset("all")


def test_null_grounding_equals_the_samplers_null(tmp_path, data_dir, dataset):
    cfg = _cfg(tmp_path, data_dir)
    tr = Trainer(cfg, data=dataset)
    batch = dataset.batch([0, 1, 2])
    null = torch.tensor([False, True, False])
    with torch.no_grad():
        _, g = conditioning(tr.model, batch, null=null)
        ref = tr.comp.unet.position_net.null_grounding(1, seg_size=64)
        for k, v in ref.items():
            assert torch.equal(g[k][1], v[0]), k
        assert g["masks"][0].sum() > 0 and g["positive_embeddings"][0].abs().sum() > 0
        objs = tr.comp.unet.tokenize(g, DropFlags.preset("all"))
        objs_null = tr.comp.unet.tokenize(ref, DropFlags.preset("all"))
    torch.testing.assert_close(objs[1], objs_null[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(objs[0], objs_null[0])


def test_instance_embeddings_batched_equal_one_at_a_time(tmp_path, data_dir, dataset):
    tr = Trainer(_cfg(tmp_path, data_dir), data=dataset)
    batch = dataset.batch([3, 4])
    with torch.no_grad():
        _, g = conditioning(tr.model, batch)
        tr.comp.text.eval()
        for j, i in enumerate((3, 4)):
            ref = tr.comp.text.encode_phrases(dataset.instance_captions[i])
            n = len(ref)
            torch.testing.assert_close(g["positive_embeddings"][j, :n], ref, rtol=1e-5, atol=1e-5)
            assert not g["positive_embeddings"][j, n:].any()


# ---- training --------------------------------------------------------------------------------------
def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path, data_dir, dataset, one_thread):
    cfg = _cfg(tmp_path, data_dir, batch_size=4, steps=30, lr=1e-3, warmup_steps=3)
    tr = Trainer(cfg, data=dataset)
    for f in tr.comp.unet.fusers:
        assert f.alpha_attn.item() == 1.0 and f.alpha_dense.item() == 1.0  # from-scratch gate init
    gen = torch.Generator().manual_seed(123)
    batch = dataset.batch(list(range(8)))
    t = torch.tensor([50, 150, 250, 400, 550, 700, 850, 950])
    noise = torch.randn(8, 12, 32, 32, generator=gen)
    before = tr.eval_loss(batch, t, noise)
    params0 = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    losses = [tr.train_step()[0] for _ in range(30)]
    after = tr.eval_loss(batch, t, noise)
    assert all(math.isfinite(v) for v in losses)
    print(f"eval loss before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before, (before, after)
    # every part trains: UNet, fusers, UniFusion tokenizer, ScaleU, the text tower
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(p, params0[n])}
    for part in ("unet.unet.conv_in.weight", "unet.unet.position_net.linears_list.0.0.weight",
                 "unet.unet.position_net.linears_list.4.0.weight", "unet.unet.scaleu.scaleu_b_0",
                 "text.encoder.layers.0.mlp.fc1.weight", "text.embeddings.token_embedding.weight"):
        assert part in moved, part
    assert any(".fuser.alpha_attn" in n for n in moved)
    ema_after = tr.eval_loss(batch, t, noise, use_ema=True)
    assert math.isfinite(ema_after)


def test_the_ema_follows_every_parameter_with_the_warmup_decay(tmp_path, data_dir, dataset, one_thread):
    """After each step the EMA of every trained weight (UNet, fusers, tokenizer, ScaleU and the text tower) moves
    towards it by 1 - min(ema_decay, (1 + k) / (10 + k)); recomputed here from the weights after each step."""
    tr = Trainer(_cfg(tmp_path, data_dir, steps=2, ema_decay=0.5), data=dataset)
    want = {n: p.detach().double().clone() for n, p in tr.model.named_parameters()}
    for k, d in enumerate((1 / 10, 2 / 11)):  # (1 + k) / (10 + k), below ema_decay at both steps
        assert tr.ema_decay_at(k) == pytest.approx(d)
        tr.train_step()
        want = {n: d * want[n] + (1 - d) * p.detach().double() for n, p in tr.model.named_parameters()}
    assert tr.ema_decay_at(20) == 0.5  # capped at ema_decay
    assert set(tr.ema) == set(want)
    for part in ("unet.unet.conv_in.weight", "unet.unet.position_net.linears_list.0.0.weight",
                 "text.embeddings.token_embedding.weight"):
        assert not torch.allclose(want[part], tr.model.get_parameter(part).double()), part  # the EMA lags
    for n, v in want.items():
        torch.testing.assert_close(tr.ema[n].double(), v, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_is_bit_identical_and_export_loads(tmp_path, data_dir, dataset, one_thread):
    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

    straight = Trainer(_cfg(tmp_path / "a", data_dir, steps=6, ckpt_every=100), data=dataset).run()
    first = Trainer(_cfg(tmp_path / "b", data_dir, steps=3, ckpt_every=100), data=dataset).run()
    assert first["steps"] == 3
    with pytest.raises(ValueError, match="--resume"):
        Trainer(_cfg(tmp_path / "b", data_dir, steps=6), data=dataset)
    with pytest.raises(ValueError, match="different settings"):
        Trainer(_cfg(tmp_path / "b", data_dir, steps=6, lr=3e-4, resume=True), data=dataset)
    resumed_trainer = Trainer(_cfg(tmp_path / "b", data_dir, steps=6, resume=True), data=dataset)
    assert resumed_trainer.step == 3
    resumed = resumed_trainer.run()
    assert resumed["steps"] == 6 and resumed["resumed_from"] == 3

    sa = torch.load(tmp_path / "a" / "run" / "state.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "run" / "state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 6
    for key in ("model", "ema"):
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), (key, k)
    for k, v in sa["optimizer"]["state"].items():
        assert all(torch.equal(v[s], sb["optimizer"]["state"][k][s]) for s in v)

    def losses(run):
        with open(tmp_path / run / "run" / "loss.csv") as f:
            return [(r["step"], r["loss"]) for r in csv.DictReader(f)]
    assert losses("a") == losses("b") and len(losses("a")) == 6
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0

    # the export: the EMA weights, fp16, <= 20 MB, loads in the pipeline and generates 64x64 images
    out = tmp_path / "a" / "run"
    assert straight["export"]["bytes"] <= 20 * 2**20
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["source"]["step"] == 6
    pipe = InstanceDiffusionPipeline.from_pretrained(str(out))
    ema = sa["ema"]["unet.unet.conv_in.weight"].half().float()
    torch.testing.assert_close(pipe.c.unet.unet.conv_in.weight.float(), ema)
    layout = shapes_layouts(ShapesSplit.load(data_dir, "train"))[0][2]
    res = pipe(layout, seed=0, steps=3, mis=0.36, progress=False)
    assert res.images[0].size == (64, 64)
    # the loaded export generates exactly what the run's EMA weights (every module, rounded to fp16) generate
    from instdiff_lib.training.diffusion import Trainable
    from instdiff_lib.weights.checkpoint import build_components

    cfg_a = _cfg(tmp_path / "a", data_dir, steps=6, ckpt_every=100)
    ref = build_components(get_config(cfg_a.model), seed=cfg_a.seed)  # the run's init: buffers as the run had them
    sd = Trainable(ref).state_dict()
    sd.update({k: v.half().float() for k, v in sa["ema"].items()})
    Trainable(ref).load_state_dict(sd, strict=True)
    expected = InstanceDiffusionPipeline(ref.eval())(layout, seed=0, steps=3, mis=0.36, progress=False)
    np.testing.assert_array_equal(np.asarray(res.images[0]), np.asarray(expected.images[0]))


def test_cli_parser():
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    a = p.parse_args(["train", "shapes", "--out", "x", "--steps", "5", "--batch-size", "8", "--seed", "3", "--resume"])
    assert (a.steps, a.minutes, a.batch_size, a.seed, a.resume, a.out) == (5, None, 8, 3, True, "x")
    assert callable(a.func)
    assert a.device == "cpu"
    b = p.parse_args(["train", "shapes", "--out", "x", "--minutes", "1.5", "--device", "cuda"])
    assert b.minutes == 1.5 and b.steps is None and b.device == "cuda"
    with pytest.raises(SystemExit):
        p.parse_args(["train", "shapes", "--out", "x", "--minutes", "1", "--steps", "3"])
    with pytest.raises(ValueError):
        TrainConfig()  # no budget


def test_minutes_budget_counts_wall_time_once(tmp_path, data_dir, dataset):
    """The wall-clock budget compares the accumulated training time once (a double count stopped runs at half)."""
    tr = Trainer(_cfg(tmp_path, data_dir, steps=None, minutes=1.0), data=dataset)
    tr.elapsed_s = 59.0
    assert not tr.done()
    tr.elapsed_s = 60.0
    assert tr.done()


# ---- diagnostics -----------------------------------------------------------------------------------
LAYOUT_KEYS = ("boxes", "masks", "scribbles", "polygons", "segs", "points", "positive_embeddings")


def _layout_vectors(grounding) -> torch.Tensor:
    """Every field of each sample's grounding, flattened into one row."""
    return torch.cat([grounding[k].flatten(1).float() for k in LAYOUT_KEYS], dim=1)


class _OracleUNet(torch.nn.Module):
    """A denoiser whose use of the layout is known: it recognises each image by its caption, predicts the exact
    target when given that image's own layout (every field), the target + ``wrong`` with another image's whole layout,
    the target + ``null`` with the null (all-zero) layout, and the target + 1 with anything else (a mix of two images'
    fields). Its training losses are then 0, wrong**2 and null**2."""

    def __init__(self, cfg, contexts, x0s, layouts, acp, wrong, null):
        super().__init__()
        self.cfg, self.contexts, self.x0s, self.layouts, self.acp = cfg, contexts, x0s, layouts, acp
        self.wrong, self.null = wrong, null

    def tokenize(self, grounding, drop=None):
        return _layout_vectors(grounding)

    def regions(self, grounding, drop, size):
        return None  # full fuser attention: no instance regions

    def forward(self, xt, t, context, objs, gate=1, regions=None):
        out = []
        for b in range(len(xt)):
            i = int((self.contexts - context[b]).flatten(1).abs().amax(1).argmin())  # the image, by its caption
            a = self.acp[t[b]]
            target = (a.sqrt() * xt[b] - self.x0s[i]) / (1 - a).sqrt()  # v, from x_t and the image's x0
            if self.cfg.schedule.prediction_type != "v_prediction":
                target = (xt[b] - a.sqrt() * self.x0s[i]) / (1 - a).sqrt()  # eps
            owner = [j for j in range(len(self.layouts)) if torch.allclose(objs[b], self.layouts[j], atol=1e-5)]
            if not objs[b].any():
                target = target + self.null
            elif owner != [i]:
                target = target + (self.wrong if len(owner) == 1 else 1.0)
            out.append(target)
        return torch.stack(out)


def test_grounding_gap_is_the_loss_lost_without_the_true_layout(tmp_path, data_dir, dataset):
    """Known answer: for the oracle above the true loss is 0, the shuffled-layout gap wrong**2 (every field of the
    layout comes from one other image) and the null gap null**2, whatever the timesteps and noise drawn."""
    tr = Trainer(_cfg(tmp_path, data_dir), data=dataset)
    n = 8
    batch = dataset.batch(range(n))
    assert len({tuple(r) for r in batch["global_ids"].tolist()}) == n  # distinct captions: the oracle can tell
    with torch.no_grad():
        contexts = tr.model.text(input_ids=batch["global_ids"]).last_hidden_state
        x0s = tr.comp.vae.encode_latents(batch["images"])
        layouts = _layout_vectors(conditioning(tr.model, batch)[1])
    assert all(not torch.allclose(layouts[i], layouts[j], atol=1e-5) for i in range(n) for j in range(i))

    class Oracle(torch.nn.Module):
        def __init__(self, prediction_type):
            super().__init__()
            self.text = tr.model.text
            cfg = tr.comp.unet.cfg.replace(schedule=dataclasses.replace(tr.comp.unet.cfg.schedule,
                                                                         prediction_type=prediction_type))
            self.unet = _OracleUNet(cfg, contexts, x0s, layouts, tr.acp, wrong=0.3, null=0.5)

    for kind in ("v_prediction", "epsilon"):
        oracle = Oracle(kind)
        for seed in (0, 1):
            gap = grounding_gap(oracle, tr.comp.vae, tr.acp, dataset, n_images=n, batch_size=4, seed=seed)
            assert gap["true"] == pytest.approx(0.0, abs=1e-9), kind
            assert gap["shuffled"] == pytest.approx(0.09, rel=1e-5) and gap["null"] == pytest.approx(0.25, rel=1e-5)
            assert gap["gap_shuffled"] == pytest.approx(0.09, rel=1e-5) and gap["gap_null"] == pytest.approx(0.25, rel=1e-5)
            assert gap["n_images"] == n and oracle.training  # train mode restored


def test_grounding_gap_is_zero_without_fusers_and_needs_two_images(tmp_path, data_dir, dataset):
    tr = Trainer(_cfg(tmp_path, data_dir), data=dataset)
    on = grounding_gap(tr.model, tr.comp.vae, tr.acp, dataset, n_images=8, batch_size=4, seed=7)
    tr.comp.unet.cfg = tr.comp.unet.cfg.replace(fusers=False)
    off = grounding_gap(tr.model, tr.comp.vae, tr.acp, dataset, n_images=8, batch_size=4, seed=7)
    assert off["gap_null"] == 0.0 and off["gap_shuffled"] == 0.0 and off["true"] != on["true"]
    with pytest.raises(ValueError, match="at least 2 images"):
        grounding_gap(tr.model, tr.comp.vae, tr.acp, dataset, n_images=1)


def test_coordinate_channels_train_export_and_load(tmp_path, data_dir, dataset):
    """``unet.coord_channels = 2``: the UNet sees x/y planes beside the latents; trains, exports and loads back."""
    import dataclasses

    from instdiff_lib.model.unet import coordinate_planes
    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

    planes = coordinate_planes(torch.zeros(2, 12, 4, 4))
    assert planes.shape == (2, 2, 4, 4)
    assert torch.allclose(planes[0, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # x along columns
    assert torch.allclose(planes[0, 1, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # y along rows
    cfg = get_config("shapes-mini")
    cfg = cfg.replace(unet=dataclasses.replace(cfg.unet, coord_channels=2))
    path = tmp_path / "coord.json"
    cfg.save(path)
    tr = Trainer(_cfg(tmp_path, data_dir, model=str(path), steps=2, figure=None), data=dataset)
    assert tr.comp.unet.unet.conv_in.in_channels == 14
    summary = tr.run()
    pipe = InstanceDiffusionPipeline.from_pretrained(summary["export"]["dir"])
    assert pipe.cfg.unet.coord_channels == 2
    layout = shapes_layouts(ShapesSplit.load(data_dir, "train"))[0][2]
    img = pipe(layout, steps=2, guidance=2.0, mis=0.0, progress=False).images[0]
    assert img.size == (64, 64)
    bad = cfg.replace(unet=dataclasses.replace(cfg.unet, coord_channels=3))
    with pytest.raises(ValueError, match="coord_channels"):
        from instdiff_lib.model.unet import InstanceUNet
        InstanceUNet(bad)


def test_a_learning_rate_decay_added_on_resume_equals_a_straight_run_with_it(tmp_path, data_dir, dataset, one_thread):
    """--lr-decay-start may be added when resuming, as long as it starts after the steps already taken: the result
    is bit-identical to a straight run with the decay (so the final command reproduces the model)."""
    decay = dict(lr_decay_start=3, lr_decay_steps=2, lr_min_ratio=0.1)
    Trainer(_cfg(tmp_path / "a", data_dir, steps=5, ckpt_every=100, **decay), data=dataset).run()
    Trainer(_cfg(tmp_path / "b", data_dir, steps=3, ckpt_every=100), data=dataset).run()
    with pytest.raises(ValueError, match="different settings"):  # a decay reaching back into steps already taken
        Trainer(_cfg(tmp_path / "b", data_dir, steps=5, resume=True, lr_decay_start=1), data=dataset)
    Trainer(_cfg(tmp_path / "b", data_dir, steps=5, resume=True, **decay), data=dataset).run()
    sa = torch.load(tmp_path / "a" / "run" / "state.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "run" / "state.pt", weights_only=False)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    lrs = [lr_schedule(TrainConfig(steps=5, lr=1e-3, warmup_steps=1, **decay), k) for k in range(6)]
    assert lrs[:3] == [1e-3] * 3 and lrs[3] == pytest.approx(1e-3) and lrs[4] == pytest.approx(0.55e-3)
    assert lrs[5] == pytest.approx(1e-4)


def test_p_drop_masks_changes_only_the_mask_coin():
    """``p_drop_masks`` None is the official rule (the same flags, draw for draw); a higher value drops the masks
    (box-only batches) that much more often, from the same random numbers, and leaves the other coins alone."""
    def draws(**kw):
        gen = torch.Generator().manual_seed(3)
        return [sample_drop_flags(gen, **kw) for _ in range(20000)]

    official, same, more = draws(), draws(p_drop_masks=0.1), draws(p_drop_masks=0.5)
    assert official == same
    n = len(more)
    assert _within(sum(f.masks for f in official), n, 0.1 + 0.9 * 0.1)
    assert _within(sum(f.masks for f in more), n, 0.1 + 0.9 * 0.5)  # point-only mode or the mask coin
    # a batch whose masks stay under 0.5 kept them under 0.1 as well, with the same other flags
    assert all(a == b for a, b in zip(official, more) if not b.masks)
    # the box-only case (the box setting: boxes fed, masks not) is ~5x as frequent
    box_only = [sum(f.masks and not f.boxes for f in fl) for fl in (official, more)]
    assert box_only[1] > 4 * box_only[0], box_only
    with pytest.raises(ValueError, match="p_drop_masks"):
        TrainConfig(steps=1, p_drop_masks=1.5)


def test_init_from_starts_at_an_exported_models_weights(tmp_path, data_dir, dataset):
    from instdiff_lib.training.diffusion import Trainable
    from instdiff_lib.weights.checkpoint import load_converted
    from instdiff_lib.weights.embedded import models_dir

    src = str(models_dir() / "shapes-mini")
    tr = Trainer(_cfg(tmp_path, data_dir, steps=1, init_from=src, figure=None), data=dataset)
    want = Trainable(load_converted(src)).state_dict()
    got = tr.model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k].float()), k
    for k, v in tr.ema.items():  # the EMA starts there too
        assert torch.equal(v, want[k].float()), k
    scratch = Trainer(_cfg(tmp_path / "s", data_dir, steps=1), data=dataset)
    assert not torch.equal(scratch.model.state_dict()["unet.unet.conv_in.weight"], got["unet.unet.conv_in.weight"])
    summary = tr.run()
    # the recipe is the chain: the source's own command, then this run's, reading the folder that command writes
    made = json.loads((models_dir() / "shapes-mini" / "summary.json").read_text())
    *prior, then = summary["reproduce"]
    assert prior == (made["reproduce"] if isinstance(made["reproduce"], list) else [made["reproduce"]])
    assert "--steps 1 " in then
    assert f"--init-from {made['export']['dir']} " in then
    manifest = json.loads((models_dir() / "shapes-mini" / "manifest.json").read_text())
    assert summary["init_from"]["sha256"] == {k: m["sha256"] for k, m in manifest["files"].items()}
    assert isinstance(scratch.reproduce(), str) and "--init-from" not in scratch.reproduce()
    assert scratch._init_source() is None
    other = get_config("shapes-mini").to_dict()
    other["point_region"] = 0.2
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"model config differs .*point_region"):
        Trainer(_cfg(tmp_path / "t", data_dir, steps=1, init_from=src, model=str(tmp_path / "other.json")), data=dataset)


def test_a_run_may_move_a_model_onto_another_noise_schedule(tmp_path, data_dir, dataset):
    from instdiff_lib.model.config import ModelConfig
    from instdiff_lib.sampling.sampler import alphas_cumprod
    from instdiff_lib.weights.checkpoint import load_converted
    from instdiff_lib.weights.embedded import models_dir

    src = models_dir() / "shapes-mini"
    cfg = _cfg(tmp_path, data_dir, steps=1, init_from=str(src), figure=None, beta_schedule="linear",
               beta_start=1e-4, beta_end=0.02)
    tr = Trainer(cfg, data=dataset)
    sched = tr.model_cfg.schedule
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("linear", 1e-4, 0.02)
    assert sched.prediction_type == get_config("shapes-mini").schedule.prediction_type  # the rest is the preset's
    assert torch.equal(tr.acp, alphas_cumprod(sched))
    assert tr.acp[960].sqrt() < 0.01 < 0.08 < alphas_cumprod(get_config("shapes-mini").schedule)[960].sqrt()
    summary = tr.run()
    assert load_converted(cfg.out_dir).cfg.schedule == sched  # the sampler reads the exported config's schedule
    source = dataclasses.asdict(ModelConfig.load(src / "model_config.json").schedule)
    assert summary["init_from"]["schedule"] == source and source != dataclasses.asdict(sched)
    assert " --beta-schedule linear --beta-start 0.0001 --beta-end 0.02 " in summary["reproduce"][-1]
    same = Trainer(_cfg(tmp_path / "same", data_dir, steps=1, init_from=str(src), figure=None), data=dataset)
    assert "schedule" not in same._init_source() and "--beta" not in same.reproduce()[-1]
    # configs written before the field existed read as SD's schedule
    old = get_config("shapes-mini").to_dict()
    del old["schedule"]["beta_schedule"]
    assert ModelConfig.from_dict(old).schedule.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        _cfg(tmp_path, data_dir, beta_schedule="cosine")
    import argparse

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "shapes", "--out", "o", "--steps", "1", "--beta-schedule", "linear",
                              "--beta-start", "1e-4", "--beta-end", "0.02"])
    assert (args.beta_schedule, args.beta_start, args.beta_end) == ("linear", 1e-4, 0.02)


def test_grow_adds_attention_blocks_that_start_as_the_identity(tmp_path, data_dir, dataset):
    from instdiff_lib.training.diffusion import Trainable, diffusion_loss
    from instdiff_lib.weights.checkpoint import build_components, load_converted
    from instdiff_lib.weights.embedded import models_dir

    src = str(models_dir() / "shapes-mini")
    source = load_converted(src)
    grown_cfg = source.cfg.to_dict()
    assert list(grown_cfg["unet"]["attention_resolutions"]) == [4]
    grown_cfg["unet"]["attention_resolutions"] = [2, 4]  # attention (and fusers) at 16 x 16 too
    (tmp_path / "grown.json").write_text(json.dumps(grown_cfg))
    model = str(tmp_path / "grown.json")
    with pytest.raises(ValueError, match=r"model config differs .*unet"):
        Trainer(_cfg(tmp_path / "a", data_dir, steps=1, init_from=src, model=model), data=dataset)
    tr = Trainer(_cfg(tmp_path, data_dir, steps=1, init_from=src, model=model, grow=True, figure=None), data=dataset)
    assert len(tr.comp.unet.fusers) == len(source.unet.fusers) + 3
    want = Trainable(source).state_dict()
    got = tr.model.state_dict()
    new = sorted(set(got) - set(want))
    assert len(new) > 50 and all(".attentions." in n for n in new)
    for k in want:
        assert torch.equal(got[k], want[k].float()), k
    zeroed = [n for n in new if ".proj_out." in n]
    assert len(zeroed) == 6 and all(not got[n].any() for n in zeroed)
    assert all(got[n].any() for n in new if n.endswith("proj_in.weight"))  # the rest keeps its fresh init
    # the grown model computes the source's function (every modality fed), then trains away from it
    batch = dataset.batch([0, 1])
    t, noise = torch.tensor([700, 150]), torch.randn(2, 12, 32, 32, generator=torch.Generator().manual_seed(3))
    ref = build_components(source.cfg)
    Trainable(ref).load_state_dict({k: v.float() for k, v in want.items()})
    theirs = diffusion_loss(Trainable(ref), ref.vae, batch, t, noise, tr.acp)
    ours = diffusion_loss(tr.model, tr.comp.vae, batch, t, noise, tr.acp)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    summary = tr.run()
    assert summary["init_from"]["attention_resolutions"] == [4]
    assert f"--model {model} " in summary["reproduce"][-1] and " --grow " in summary["reproduce"][-1]
    assert load_converted(tr.cfg.out_dir).cfg.unet.attention_resolutions == (2, 4)
    # shrinking is not growing
    small = dict(grown_cfg, unet=dict(grown_cfg["unet"], attention_resolutions=[2]))
    (tmp_path / "small.json").write_text(json.dumps(small))
    with pytest.raises(ValueError, match="has attention where"):
        Trainer(_cfg(tmp_path / "b", data_dir, steps=1, init_from=src, model=str(tmp_path / "small.json"), grow=True),
                data=dataset)
    with pytest.raises(ValueError, match="grow needs init_from"):
        _cfg(tmp_path, data_dir, grow=True)


def test_pyramid_noise_is_unit_variance_low_frequency_in_pixel_space(tmp_path, data_dir):
    import torch.nn.functional as F

    from instdiff_lib.training.diffusion import pyramid_noise

    mcfg = get_config("shapes-mini")
    white = step_noise(_cfg(tmp_path, data_dir, batch_size=8), mcfg, 7)
    pyr = step_noise(_cfg(tmp_path, data_dir, batch_size=8, pyramid_noise=0.6), mcfg, 7)
    # the other randomness of the step is unchanged (the coarse draws come after it)
    assert torch.equal(white.t, pyr.t) and torch.equal(white.null, pyr.null) and white.drop == pyr.drop
    assert not torch.equal(white.noise, pyr.noise) and pyr.noise.shape == white.noise.shape
    std = pyr.noise.flatten(1).std(dim=1)
    torch.testing.assert_close(std, torch.ones(8), atol=1e-5, rtol=0)

    def block_std(z, k):  # std of k x k pixel-block means of the unfolded (pixel space) noise
        return float(F.avg_pool2d(F.pixel_shuffle(z, 2), k).std())

    # white noise: block means shrink as 1/k; the pyramid keeps shape-sized (16 px) structure ~4x stronger
    assert abs(block_std(white.noise, 16) - 1 / 16) < 0.02
    assert block_std(pyr.noise, 16) > 3 * block_std(white.noise, 16)
    # the coarse draws are shared by the 4 sub-pixel channels of a colour: low-frequency in pixel space, not a
    # 2 x 2 checkerboard (group=1 gives each latent channel its own, which cancels out in pixel blocks)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 12, 32, 32, generator=g)
    shared = pyramid_noise(z, torch.Generator().manual_seed(1), 0.6, group=4)
    own = pyramid_noise(z, torch.Generator().manual_seed(1), 0.6, group=1)
    assert block_std(shared, 16) > 1.6 * block_std(own, 16)
    assert torch.equal(pyramid_noise(z, torch.Generator().manual_seed(1), 0.6, 4), shared)  # deterministic
    with pytest.raises(ValueError, match="pyramid_noise"):
        TrainConfig(steps=1, pyramid_noise=1.0)
