"""Instance-masked fuser attention: regions from the fed modalities only, the masked attention against a direct
masked softmax, 'full' untouched, and the masked model through every sampler path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import GatedSelfAttentionDense

from instdiff_lib.model.config import DropFlags, get_config
from instdiff_lib.model.fuser_mask import InstanceMaskedFuser, MaskedTokens, instance_regions
from instdiff_lib.model.unet import InstanceUNet
from instdiff_lib.sampling.sampler import Branch, Sampler


def _grounding(B=1, N=3, seg=16):
    z = lambda *s: torch.zeros(B, N, *s)  # noqa: E731
    return {"boxes": z(4), "masks": torch.zeros(B, N), "scribbles": z(40), "polygons": z(512), "segs": z(seg, seg),
            "points": z(2), "positive_embeddings": z(8)}


def test_box_region_is_column_major_x():
    """A wide, short box in the top-right: x is the column (the official rasteriser transposes it)."""
    g = _grounding()
    g["masks"][0, 0] = 1
    g["boxes"][0, 0] = torch.tensor([0.5, 0.0, 1.0, 0.25])  # x0, y0, x1, y1
    r = instance_regions(g, DropFlags.preset("box"), (8, 8), 0.1)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[0:2, 4:8] = True  # rows 0-1, columns 4-7
    assert torch.equal(r[0, 0], want)
    assert not r[0, 1:].any()  # padded slots see nothing


def test_mask_region_wins_when_masks_are_fed_and_box_when_not():
    g = _grounding(seg=16)
    g["masks"][0, 0] = 1
    g["boxes"][0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    g["segs"][0, 0, 12:16, 0:4] = 1  # bottom-left corner of the mask raster
    r_mask = instance_regions(g, DropFlags.preset("mask"), (4, 4), 0.1)[0, 0]
    assert r_mask.sum() == 1 and r_mask[3, 0]
    r_box = instance_regions(g, DropFlags.preset("box"), (4, 4), 0.1)[0, 0]
    assert r_box.all()


def test_point_only_region_does_not_depend_on_boxes():
    g = _grounding()
    g["masks"][0, :2] = 1
    g["points"][0, 0] = torch.tensor([0.2, 0.8])
    g["points"][0, 1] = torch.tensor([0.9, 0.1])
    flags = DropFlags.preset("point")
    a = instance_regions(g, flags, (16, 16), 0.1)
    g2 = dict(g, boxes=torch.rand_like(g["boxes"]), segs=torch.ones_like(g["segs"]))
    b = instance_regions(g2, flags, (16, 16), 0.1)
    assert torch.equal(a, b)
    # a square of half-width 0.1 around (x=0.2, y=0.8): columns 1..4, rows 11..14 of 16
    rows, cols = a[0, 0].nonzero().T
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (11, 14, 1, 4)
    assert a[0, 1, 0:3, 12:16].all() and not a[0, 1, 8:, :8].any()


def test_scribble_region_is_its_bounding_box_and_never_empty():
    g = _grounding()
    g["masks"][0, 0] = 1
    pts = torch.tensor([[0.1, 0.5], [0.4, 0.5], [0.3, 0.6]] + [[0.4, 0.6]] * 17).flatten()
    g["scribbles"][0, 0] = pts
    flags = DropFlags(boxes=True, points=True, scribbles=False, masks=True)
    r = instance_regions(g, flags, (10, 10), 0.1)[0, 0]
    rows, cols = r.nonzero().T
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 5, 1, 3)
    g["scribbles"][0, 0] = 0  # a real instance with nothing fed sees the whole image rather than nothing
    assert instance_regions(g, flags, (10, 10), 0.1)[0, 0].all()


def _fuser(C=16, heads=2, ctx=8):
    torch.manual_seed(0)
    f = GatedSelfAttentionDense(C, ctx, heads, C // heads)
    with torch.no_grad():
        f.alpha_attn.fill_(0.7)
        f.alpha_dense.fill_(-0.4)
    return f


def test_masked_fuser_with_nothing_masked_equals_the_diffusers_fuser():
    f = _fuser()
    x, objs = torch.randn(2, 16, 16), torch.randn(2, 4 * 3 + 5, 8)
    want = f(x, objs)
    f.__class__ = InstanceMaskedFuser
    regions = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    got = f(x, MaskedTokens(objs, regions, 5))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_masked_fuser_equals_a_direct_masked_softmax():
    f = _fuser()
    B, n_vis, N, n_seg = 2, 16, 3, 5
    x, objs = torch.randn(B, n_vis, 16), torch.randn(B, 4 * N + n_seg, 8)
    regions = torch.rand(B, N, 4, 4) > 0.5
    f.__class__ = InstanceMaskedFuser
    got = f(x, MaskedTokens(objs, regions, n_seg))
    # by hand: per head softmax over allowed keys only
    h = f.norm1(torch.cat([x, f.linear(objs)], 1))
    q, k, v = f.attn.to_q(h[:, :n_vis]), f.attn.to_k(h), f.attn.to_v(h)
    allowed = torch.ones(B, n_vis, n_vis + 4 * N + n_seg, dtype=torch.bool)
    for g in range(4):
        for i in range(N):
            allowed[:, :, n_vis + g * N + i] = regions[:, i].flatten(1)
    heads, d = 2, 8
    out = torch.zeros(B, n_vis, 16)
    for hd in range(heads):
        sl = slice(hd * d, (hd + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        logits = logits.masked_fill(~allowed, float("-inf"))
        out[..., sl] = logits.softmax(-1) @ v[..., sl]
    y = x + f.alpha_attn.tanh() * f.attn.to_out[0](out)
    want = y + f.alpha_dense.tanh() * f.ff(f.norm2(y))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and the mask matters: the unmasked fuser gives another result
    assert not torch.allclose(got, GatedSelfAttentionDense.forward(f, x, objs), atol=1e-4)


def test_full_attention_model_keeps_the_diffusers_fusers():
    m = InstanceUNet(get_config("tiny"))
    assert all(type(f) is GatedSelfAttentionDense for f in m.fusers)
    assert m.regions(m.position_net.null_grounding(1), None, (32, 32)) is None


def _masked_tiny():
    cfg = get_config("shapes-mini").replace(fuser_attention="instance_masked")
    torch.manual_seed(0)
    m = InstanceUNet(cfg).eval()
    with torch.no_grad():
        for f in m.fusers:
            f.alpha_attn.fill_(1.0)
            f.alpha_dense.fill_(1.0)
    return m


def _layout_grounding(m, B=1):
    g = m.position_net.null_grounding(B, seg_size=64)
    g["masks"][:, :2] = 1
    g["boxes"][:, 0] = torch.tensor([0.0, 0.0, 0.4, 0.4])
    g["boxes"][:, 1] = torch.tensor([0.6, 0.5, 1.0, 0.9])
    g["positive_embeddings"][:, :2] = torch.randn(2, g["positive_embeddings"].shape[-1])
    return g


def test_masked_model_needs_regions_and_the_layout_moves_only_its_boxes():
    m = _masked_tiny()
    g = _layout_grounding(m)
    x, t = torch.randn(1, 12, 32, 32), torch.tensor([500])
    ctx = torch.zeros(1, 77, 64)
    objs = m.tokenize(g, DropFlags.preset("box"))
    with pytest.raises(ValueError, match="regions"):
        m(x, t, ctx, objs, 1)
    base = m(x, t, ctx, objs, 1, m.regions(g, DropFlags.preset("box"), (32, 32)))
    g2 = {k: v.clone() for k, v in g.items()}
    g2["positive_embeddings"][:, 1] = torch.randn(g["positive_embeddings"].shape[-1])  # change instance 1's text
    out = m(x, t, ctx, m.tokenize(g2, DropFlags.preset("box")), 1, m.regions(g2, DropFlags.preset("box"), (32, 32)))
    assert not torch.allclose(out, base)


def test_masked_sampler_batched_equals_the_official_order_with_mis():
    m = _masked_tiny()
    g = _layout_grounding(m)
    ctx, uc = torch.randn(1, 77, 64), torch.randn(1, 77, 64)
    one = {k: v[:, :] for k, v in g.items()}
    inst = {k: v.clone() for k, v in g.items()}
    inst["masks"][:, 1] = 0
    branches = lambda: [Branch(ctx, g), Branch(ctx, inst)]  # noqa: E731
    x_T = torch.randn(1, 12, 32, 32, generator=torch.Generator().manual_seed(1))
    s = Sampler(m)
    kw = dict(steps=4, guidance=3.0, alpha=1.0, mis=0.5, drop=DropFlags.preset("box"), progress=False)
    a = s.sample(x_T, branches(), uc, batched=True, **kw)
    b = s.sample(x_T, branches(), uc, batched=False, **kw)
    c = s.sample(x_T, branches(), uc, batched=True, max_batch=1, **kw)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    assert one["masks"].shape == g["masks"].shape
    # points only: regions are the points' squares, not the boxes, in the official order too (not the model's flags)
    kw["drop"] = DropFlags.preset("point")
    p_b = s.sample(x_T, branches(), uc, batched=True, **kw)
    p_r = s.sample(x_T, branches(), uc, batched=False, **kw)
    torch.testing.assert_close(p_b, p_r, rtol=1e-4, atol=1e-4)
    assert (p_b - a).abs().max() > 1e-3


def test_regions_survive_a_dtype_and_batch_round_trip():
    m = _masked_tiny()
    g = _layout_grounding(m, B=2)
    r = m.regions(g, DropFlags.preset("box"), (32, 32))
    assert r.dtype == torch.bool and r.shape == (2, 30, 32, 32)
    mt = MaskedTokens(torch.zeros(2, 184, 64), r, 64)
    km = mt.key_mask(64)
    assert km.shape == (2, 64, 64 + 184)
    assert km[:, :, :64].all() and km[:, :, -64:].all()  # visual and seg tokens always visible
    assert not km[:, :, 64 + 2:64 + 30].any()  # padded box slots never
    assert km.any(-1).all()  # no attention row fully masked
    assert F.adaptive_max_pool2d(r.float(), (8, 8)).flatten(2).transpose(1, 2).bool().equal(km[:, :, 64:64 + 30])


# ---- edge cases found by mutation testing (tests/MUTATION.md) ------------------------------------------------
def test_rect_cells_at_the_edges_of_the_grid():
    """Every rectangle covers at least one cell, including one that starts on the right or bottom edge, and a
    rectangle inside the first cell covers that cell only."""
    from instdiff_lib.model.fuser_mask import _rect_cells

    def cells(x0, y0, x1, y1, H=8, W=8):
        r = _rect_cells(*(torch.tensor(v) for v in (x0, y0, x1, y1)), H, W)
        return sorted(map(tuple, r.nonzero().tolist()))

    assert cells(1.0, 1.0, 1.0, 1.0) == [(7, 7)]  # a point on the bottom-right corner: the last cell
    assert cells(1.0, 0.0, 1.0, 0.05) == [(0, 7)]
    assert cells(0.0, 0.0, 0.1, 0.1) == [(0, 0)]  # inside the first cell (0.1 * 8 < 1): one cell
    assert cells(0.0, 0.0, 0.0, 0.0) == [(0, 0)]
    assert cells(0.5, 0.25, 0.75, 0.5, H=4, W=8) == [(1, 4), (1, 5)]  # a non-square grid: rows of H, columns of W


def test_regions_on_a_non_square_grid_and_on_the_inputs_device():
    g = _grounding()
    g["masks"][0, 0] = 1
    g["boxes"][0, 0] = torch.tensor([0.5, 0.0, 1.0, 0.5])
    r = instance_regions(g, DropFlags.preset("box"), (4, 8), 0.1)
    assert r.shape == (1, 3, 4, 8)
    want = torch.zeros(4, 8, dtype=torch.bool)
    want[0:2, 4:8] = True
    assert torch.equal(r[0, 0], want)
    # built on the device of the grounding (the meta device stands in for a GPU here)
    meta = {k: v.to("meta") for k, v in g.items()}
    r_meta = instance_regions(meta, DropFlags.preset("mask"), (8, 8), 0.1)
    assert r_meta.device.type == "meta"
    km = MaskedTokens(torch.zeros(1, 4 * 3 + 5, 8, device="meta"), r_meta, 5).key_mask(16)
    assert km.device.type == "meta" and km.shape == (1, 16, 16 + 17)


def test_everything_dropped_keeps_the_boxes_region():
    g = _grounding()
    g["masks"][0, 0] = 1
    g["boxes"][0, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5])
    nothing = DropFlags(boxes=True, points=True, scribbles=True, masks=True)
    r = instance_regions(g, nothing, (4, 4), 0.1)[0, 0]
    assert torch.equal(r, instance_regions(g, DropFlags.preset("box"), (4, 4), 0.1)[0, 0])
    assert r.sum() == 4 and r[:2, :2].all()  # the box, not the whole image


def test_each_slot_falls_back_on_its_own():
    """Masks fed but one instance has an empty mask: that one uses its box while the other keeps its mask.
    Scribbles fed but one instance has none: that one uses its point. Presence is per slot, never global."""
    g = _grounding(seg=16)
    g["masks"][0, :2] = 1
    g["boxes"][0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    g["boxes"][0, 1] = torch.tensor([0.5, 0.5, 1.0, 1.0])
    g["segs"][0, 0, 0:4, 0:4] = 1  # slot 0: a mask in the top-left corner; slot 1: no mask pixels
    r = instance_regions(g, DropFlags.preset("mask"), (4, 4), 0.1)[0]
    assert r[0].sum() == 1 and r[0, 0, 0]
    assert r[1].sum() == 4 and r[1, 2:, 2:].all()  # its box
    s = _grounding()
    s["masks"][0, :2] = 1
    # slot 0: a scribble near the top-left corner whose coordinates sum to less than 1; slot 1: none, a point
    s["scribbles"][0, 0] = torch.tensor([[0.01, 0.02]] * 20).flatten()
    s["points"][0, 0] = torch.tensor([0.5, 0.5])  # its point is elsewhere: the scribble, not the point, decides
    s["points"][0, 1] = torch.tensor([0.85, 0.85])
    flags = DropFlags(boxes=True, points=False, scribbles=False, masks=True)
    r = instance_regions(s, flags, (10, 10), 0.1)[0]
    assert r[0].sum() == 1 and r[0, 0, 0]  # its scribble's bounding box
    rows, cols = r[1].nonzero().T
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (7, 9, 7, 9)  # its point's square [0.75, 0.95]


def test_key_mask_is_built_once_per_grid_and_names_a_mismatch():
    regions = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    mt = MaskedTokens(torch.zeros(2, 4 * 3 + 5, 8), regions, 5)
    assert mt.key_mask(16) is mt.key_mask(16)  # cached: once per UNet call and grid, not per fuser
    assert mt.key_mask(4) is not mt.key_mask(16)
    with pytest.raises(ValueError, match="fuser grid of 15 cells does not match the 4x4 region grid"):
        mt.key_mask(15)
    bad = MaskedTokens(torch.zeros(2, 4 * 3 + 6, 8), regions, 5)  # one token too many
    with pytest.raises(ValueError, match=r"^18 object tokens do not fit 3 slots \+ 5 seg$"):
        bad.key_mask(16)


def test_a_seg_raster_of_one_cell_is_the_no_mask_placeholder():
    """The null grounding's 1 x 1 seg raster means "no masks": the region falls back to the box even where that
    cell is set; a 2 x 2 raster is a real (coarse) mask."""
    g = _grounding(seg=1)
    g["masks"][0, 0] = 1
    g["boxes"][0, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5])
    g["segs"][0, 0] = 1
    r = instance_regions(g, DropFlags.preset("mask"), (4, 4), 0.1)[0, 0]
    assert r.sum() == 4 and r[:2, :2].all()  # the box
    g2 = _grounding(seg=2)
    g2["masks"][0, 0] = 1
    g2["boxes"][0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    g2["segs"][0, 0, 1, 1] = 1  # the bottom-right quadrant
    r2 = instance_regions(g2, DropFlags.preset("mask"), (4, 4), 0.1)[0, 0]
    assert r2.sum() == 4 and r2[2:, 2:].all()


def test_masked_fuser_refuses_bare_tokens_with_a_clear_message():
    f = _fuser()
    f.__class__ = InstanceMaskedFuser
    with pytest.raises(TypeError, match=r"^instance-masked fusers need MaskedTokens \(tokens and regions\), not bare "
                                        r"tokens$"):
        f(torch.randn(1, 16, 16), torch.randn(1, 17, 8))
