"""Identities and structure of the model: the checks that hold for any weights."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from instdiff_lib.model.config import DropFlags, ModelConfig, get_config, sd15, tiny
from instdiff_lib.model.unet import InstanceUNet, diffusers_unet_kwargs
from instdiff_lib.model.skips import decoder_h_channels, fourier_filter
from instdiff_lib.model.unifusion import ConvNeXtBlock, FourierEmbedder, UniFusion


def _randomise_instance_params(m: InstanceUNet, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("alpha_attn", "alpha_dense")):
                p.copy_(torch.rand((), generator=g) + 0.5)
            elif "scaleu" in name or "null_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = InstanceUNet(tiny()).eval()
    _randomise_instance_params(m)
    return m


@pytest.fixture(scope="module")
def inputs(model):
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    B, s = 2, cfg.unet.sample_size
    grounding = model.position_net.null_grounding(B, seg_size=32)
    grounding["masks"][:, :2] = 1
    grounding["boxes"][:, 0] = torch.tensor([0.1, 0.2, 0.5, 0.6])
    grounding["boxes"][:, 1] = torch.tensor([0.5, 0.1, 0.9, 0.4])
    grounding["positive_embeddings"][:, :2] = torch.randn(B, 2, cfg.unifusion.in_dim, generator=g)
    grounding["segs"][:, 0, 6:19, 3:16] = 1
    return dict(x=torch.randn(B, 4, s, s, generator=g), t=torch.tensor([900, 200]),
                ctx=torch.randn(B, 77, cfg.unet.context_dim, generator=g), grounding=grounding)


def test_fuser_count_and_token_count_at_sd15_size():
    cfg = sd15()
    with torch.device("meta"):
        m = InstanceUNet(cfg)
    assert len(m.fusers) == 16 == cfg.unet.n_transformer_blocks
    assert cfg.unifusion.n_tokens == 184 and cfg.unifusion.seg_feature_dim == 3072
    assert m.h_channels == [1280] * 7 + [640] * 3 + [320] * 2
    heads = {blk.attn1.heads for blk in m.unet.modules() if hasattr(blk, "attn1")}
    assert heads == {8}  # diffusers' attention_head_dim holds the head count (trap: not the head dim)


def test_tokens_shape(model, inputs):
    objs = model.tokenize(inputs["grounding"], DropFlags.preset("all"))
    assert objs.shape == (2, model.cfg.unifusion.n_tokens, model.cfg.unet.context_dim)


def test_gate_zero_is_the_plain_unet(model, inputs):
    """Fusers off (official scale 0) and no skip re-weighting == a stock diffusers UNet with the same weights."""
    plain = UNet2DConditionModel(**{**diffusers_unet_kwargs(model.cfg.unet), "attention_type": "default"}).eval()
    sd = {k: v for k, v in model.unet.state_dict().items() if ".fuser." not in k and not k.startswith(("position_net.", "scaleu."))}
    plain.load_state_dict(sd, strict=True)
    objs = model.tokenize(inputs["grounding"])
    model.set_skip_mode("none")
    try:
        with torch.no_grad():
            ours = model(inputs["x"], inputs["t"], inputs["ctx"], objs, gate=0)
            ref = plain(inputs["x"], inputs["t"], encoder_hidden_states=inputs["ctx"]).sample
            grounded = model(inputs["x"], inputs["t"], inputs["ctx"], objs, gate=1)
    finally:
        model.set_skip_mode("scaleu")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (grounded - ref).abs().max() > 1e-3  # and the fusers do act when on


def test_zero_gate_parameters_are_identity(inputs):
    """At init (alpha_attn = alpha_dense = 0) the fusers add nothing, whatever the tokens."""
    torch.manual_seed(0)
    m = InstanceUNet(tiny()).eval()
    objs = m.tokenize(inputs["grounding"])
    with torch.no_grad():
        torch.testing.assert_close(m(inputs["x"], inputs["t"], inputs["ctx"], objs, gate=1),
                                   m(inputs["x"], inputs["t"], inputs["ctx"], objs, gate=0), atol=0, rtol=0)


def test_scaleu_at_zero_is_identity(inputs):
    torch.manual_seed(0)
    m = InstanceUNet(tiny()).eval()
    objs = m.tokenize(inputs["grounding"])
    with torch.no_grad():
        with_scaleu = m(inputs["x"], inputs["t"], inputs["ctx"], objs)
        m.set_skip_mode("none")
        without = m(inputs["x"], inputs["t"], inputs["ctx"], objs)
    torch.testing.assert_close(with_scaleu, without, atol=2e-5, rtol=1e-5)


def test_skip_modes_differ_and_hooks_fire_once_per_decoder_block(model, inputs):
    objs = model.tokenize(inputs["grounding"])
    outs, calls = {}, []
    handle = model.unet.up_blocks[0].resnets[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        for mode in ("scaleu", "freeu", "none"):
            model.set_skip_mode(mode)
            with torch.no_grad():
                outs[mode] = model(inputs["x"], inputs["t"], inputs["ctx"], objs)
    finally:
        model.set_skip_mode("scaleu")
        handle.remove()
    assert len(calls) == 3
    assert (outs["scaleu"] - outs["none"]).abs().max() > 1e-3
    assert (outs["freeu"] - outs["none"]).abs().max() > 1e-3
    assert len(model._hooks) == len(model.h_channels)


def test_fusers_off_config_never_enables_fusers(inputs):
    torch.manual_seed(0)
    cfg = tiny().replace(fusers=False)
    m = InstanceUNet(cfg).eval()
    _randomise_instance_params(m)
    m.set_gate(1)
    assert not any(f.enabled for f in m.fusers)
    with pytest.raises(ValueError):
        m.set_gate(0.5)


def test_fourier_layout_is_freq_major_sin_then_cos():
    emb = FourierEmbedder(16, 100.0)
    v = torch.tensor([[0.1, 0.7, 0.3]])
    out = emb(v)[0]
    assert out.shape == (2 * 16 * 3,)
    for k in range(16):
        f = 100 ** (k / 16)
        torch.testing.assert_close(out[6 * k: 6 * k + 3], torch.sin(f * v[0]))
        torch.testing.assert_close(out[6 * k + 3: 6 * k + 6], torch.cos(f * v[0]))


def test_seg_tokens_are_a_raw_reshape():
    """Token j, feature f of ConvNeXt element (c, h, w): j = (h mod 4) * 16 + w, f = 4c + h // 4 (full size).

    The library's ``seg_features`` at the full-size geometry (768 x 16 x 16 features -> 64 tokens of 3072), with the
    backbone replaced by a known feature map so every one of the 196,608 positions is checked."""
    from instdiff_lib.model.config import UniFusionConfig

    full = sd15().unifusion
    cfg = UniFusionConfig(in_dim=8, out_dim=8, mid_dim=8, seg_input_size=full.seg_input_size,
                          n_seg_tokens=full.n_seg_tokens, convnext_depths=(1, 1, 1, 1), convnext_dims=(8, 8, 8, 768))
    assert cfg.seg_feature_dim == full.seg_feature_dim == 3072
    pn = UniFusion(cfg)
    feat = torch.randn(1, 768, 16, 16)
    seen = []

    class KnownFeatures(torch.nn.Module):  # a stand-in backbone
        def forward(self, x):
            seen.append(tuple(x.shape))
            return feat

    pn.convnext_tiny_backbone = KnownFeatures()
    tokens = pn.seg_features(torch.zeros(1, 30, 64, 64))  # resized to 512 first
    assert seen == [(1, 3, 512, 512)] and tokens.shape == (1, 64, 3072)
    c, h, w = torch.meshgrid(torch.arange(768), torch.arange(16), torch.arange(16), indexing="ij")
    torch.testing.assert_close(tokens[0, (h % 4) * 16 + w, 4 * c + h // 4], feat[0], rtol=0, atol=0)
    # and the tiny preset (4 x 4 features, 64 tokens of 16) follows the same raw reshape through the real backbone
    pn = UniFusion(tiny().unifusion)
    segs = torch.zeros(1, 30, 128, 128)
    segs[0, 0, 10:40, 20:90] = 1
    direct = pn.convnext_tiny_backbone(pn.in_conv(segs))  # [1, 64, 4, 4]
    c, h, w = torch.meshgrid(torch.arange(64), torch.arange(4), torch.arange(4), indexing="ij")
    flat = c * 16 + h * 4 + w  # memory order of (c, h, w)
    torch.testing.assert_close(pn.seg_features(segs)[0, flat % 64, flat // 64], direct[0])


def test_seg_presence_is_per_sample_and_drop_uses_null():
    torch.manual_seed(0)
    pn = UniFusion(tiny().unifusion).eval()
    with torch.no_grad():
        pn.null_seg_feature.normal_()
    g = pn.null_grounding(2, seg_size=32)
    g["segs"][0, 3, 5:9, 5:9] = 1  # slot 3 is padding (mask 0): presence is still decided per sample
    keep = pn.tokenize(**{k: g[k] for k in g}, drop=DropFlags.preset("all"))
    dropped = pn.tokenize(**{k: g[k] for k in g}, drop=DropFlags.preset("box"))
    seg = slice(120, 184)
    assert (keep[0, seg] - keep[1, seg]).abs().max() > 1e-4
    torch.testing.assert_close(dropped[0, seg], dropped[1, seg])


def test_everything_dropped_keeps_boxes():
    torch.manual_seed(0)
    pn = UniFusion(tiny().unifusion).eval()
    g = pn.null_grounding(1, seg_size=8)
    g["masks"][0, 0] = 1
    g["boxes"][0, 0] = torch.tensor([0.1, 0.1, 0.4, 0.4])
    everything = DropFlags(True, True, True, True)
    a = pn.tokenize(**g, drop=everything)
    b = pn.tokenize(**g, drop=DropFlags(False, True, True, True))
    torch.testing.assert_close(a, b)


def test_fourier_filter_matches_definition():
    x = torch.randn(2, 3, 8, 8)  # the filter computes in float32, like the official code
    torch.testing.assert_close(fourier_filter(x, 1, 1.0), x, atol=1e-6, rtol=1e-6)
    y = fourier_filter(x, 1, torch.tensor([0.5]))
    F = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    F[..., 3:5, 3:5] *= 0.5  # the 2x2 block [H/2-1, H/2+1) after fftshift, DC included
    ref = torch.fft.ifftn(torch.fft.ifftshift(F, dim=(-2, -1)), dim=(-2, -1)).real
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    assert abs(y.mean() - 0.5 * x.mean()) < 1e-6  # DC is scaled


def test_h_channels_match_official_scaleu_sizes():
    assert decoder_h_channels((32, 32, 64), 2) == [64] * 4 + [32] * 5


def test_config_round_trip(tmp_path):
    cfg = tiny().replace(skip_mode="freeu", drop=DropFlags.preset("point"))
    cfg.save(tmp_path / "c.json")
    back = get_config(tmp_path / "c.json")
    assert back == cfg
    with pytest.raises(ValueError, match="skip_mode"):
        ModelConfig(skip_mode="nope")
    with pytest.raises(FileNotFoundError, match="preset"):
        get_config("no-such-preset")


# -----------------------------------------------------------------------------
# UniFusion edge cases found by mutation testing (tests/MUTATION.md)


def _random_grounding(cfg, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, s = cfg.n_slots, cfg.seg_input_size
    return {"boxes": torch.rand(batch, n, 4, generator=g), "masks": torch.ones(batch, n),
            "positive_embeddings": torch.randn(batch, n, cfg.in_dim, generator=g),
            "scribbles": torch.rand(batch, n, 2 * cfg.n_scribble_points, generator=g),
            "polygons": torch.rand(batch, n, 2 * cfg.n_polygon_points, generator=g),
            "segs": (torch.rand(batch, n, s, s, generator=g) > 0.5).float(),
            "points": torch.rand(batch, n, 2, generator=g)}


def test_fourier_features_use_the_official_defaults_and_the_configs_temperature():
    import dataclasses
    import math

    v = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    # by hand: freq_k = 100^(k/16), k = 0..15; per k the sines of the 2 values, then their cosines
    want = [f(100 ** (k / 16) * x) for k in range(16) for f in (math.sin, math.cos) for x in (0.5, 0.25)]
    assert torch.allclose(FourierEmbedder()(v)[0], torch.tensor(want, dtype=torch.float64))
    cfg = dataclasses.replace(tiny().unifusion, fourier_temperature=37.0)
    got = UniFusion(cfg).fourier(v)[0]
    want37 = [f(37.0 ** (k / cfg.fourier_freqs) * x) for k in range(cfg.fourier_freqs) for f in (math.sin, math.cos)
              for x in (0.5, 0.25)]
    assert torch.allclose(got, torch.tensor(want37, dtype=torch.float64))


def test_convnext_block_starts_near_identity_and_normalises_with_eps_1e6():
    torch.manual_seed(0)
    block = ConvNeXtBlock(8)
    x = torch.randn(2, 8, 5, 5)
    assert (block(x) - x).abs().max() < 1e-4  # layer scale initialised at 1e-6: the residual branch is ~0
    # channels of variance ~1e-6: eps = 1e-6 (ConvNeXt's) and torch's default 1e-5 give clearly different values
    y = 1.0 + 1e-3 * torch.tensor([1.0, -1.0] * 4).repeat(3, 1)
    ref = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-6)
    assert torch.allclose(block.norm(y), ref, atol=1e-4)
    assert not torch.allclose(block.norm(y), (y - 1.0) / (1e-6 + 1e-5) ** 0.5, atol=1e-2)


def test_unifusion_forward_is_tokenize_with_the_same_arguments():
    cfg = tiny().unifusion
    torch.manual_seed(0)
    uni = UniFusion(cfg).eval()
    g = _random_grounding(cfg)
    with torch.no_grad():
        assert uni.drop == DropFlags()  # no drop flags given: the default ones
        default = uni.tokenize(**g)
        assert torch.equal(uni(**g), default)
        assert torch.equal(uni.tokenize(**g, drop=DropFlags()), default)
        box_only = DropFlags.preset("box")
        dropped = uni(**g, drop=box_only)
        assert torch.equal(dropped, uni.tokenize(**g, drop=box_only))
        assert not torch.allclose(dropped, default)  # the flags reach tokenize
        given = torch.randn(2, 3, cfg.out_dim)
        assert uni(objs=given) is given


def test_null_grounding_is_built_on_the_requested_device():
    cfg = tiny().unifusion
    g = UniFusion(cfg).null_grounding(3, device="meta", seg_size=8)
    assert {k: (v.device.type, tuple(v.shape)) for k, v in g.items()} == {
        "boxes": ("meta", (3, cfg.n_slots, 4)), "masks": ("meta", (3, cfg.n_slots)),
        "positive_embeddings": ("meta", (3, cfg.n_slots, cfg.in_dim)),
        "scribbles": ("meta", (3, cfg.n_slots, 2 * cfg.n_scribble_points)),
        "polygons": ("meta", (3, cfg.n_slots, 2 * cfg.n_polygon_points)), "segs": ("meta", (3, cfg.n_slots, 8, 8)),
        "points": ("meta", (3, cfg.n_slots, 2))}


def test_seg_position_embedding_initialised_at_std_002():
    torch.manual_seed(0)
    pos = UniFusion(tiny().unifusion).pos_embedding.detach()  # 64 x 16 values: their sd is 0.02 within ~5%
    assert 0.018 < float(pos.std()) < 0.022 and abs(float(pos.mean())) < 2e-3


def test_layer_norm_of_a_constant_pixel_is_its_bias():
    """A pixel whose channels are all equal has variance 0: eps keeps the division finite and the output is the bias
    (found by mutation testing: `var - eps` went unnoticed, a NaN for such pixels)."""
    from instdiff_lib.model.unifusion import LayerNorm2d

    ln = LayerNorm2d(4)
    with torch.no_grad():
        ln.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    out = ln(torch.full((1, 4, 2, 3), 7.0))
    torch.testing.assert_close(out, ln.bias.detach().view(1, 4, 1, 1).expand(1, 4, 2, 3))


def test_an_instance_with_zero_scribble_and_polygon_coordinates_is_present():
    """Official presence rule for scribbles and mask points: sum(coordinates) + mask > 0. An instance (mask 1) whose
    coordinates are all 0 is present: its scribble and polygon tokens embed the zeros and do not use the null
    features; a padded slot does (found by mutation testing: `- mask` and `> 1` went unnoticed)."""
    torch.manual_seed(0)
    m = InstanceUNet(tiny()).eval()
    pn, n = m.position_net, m.cfg.unifusion.n_slots
    g = pn.null_grounding(1, seg_size=1)
    g["masks"][:, 0] = 1
    g["boxes"][:, 0] = torch.tensor([0.1, 0.1, 0.5, 0.5])
    g["positive_embeddings"][:, 0] = torch.randn(m.cfg.unifusion.in_dim)
    keep_all = DropFlags.preset("all")  # nothing dropped (the model's default drops scribbles)
    with torch.no_grad():
        a = m.tokenize(g, keep_all)
        pn.null_scribble_feature.add_(1.0)
        pn.null_polygon_feature.add_(1.0)
        b = m.tokenize(g, keep_all)
    for block in (2, 3):  # [box | point | scribble | polygon] x n_slots, then the seg tokens
        torch.testing.assert_close(a[:, block * n], b[:, block * n])  # slot 0: present, null unused
        assert (a[:, block * n + 1] - b[:, block * n + 1]).abs().max() > 1e-3  # slot 1: padded, null used


def test_fourier_features_follow_the_coordinates_device_and_dtype():
    """On a GPU the frequencies must be built where the coordinates are (the meta device stands in for one here: a
    CPU tensor beside it raises), and half-precision coordinates give half-precision features of the right values."""
    emb = FourierEmbedder(16, 100.0)
    out = emb(torch.zeros(2, 3, 4, device="meta"))
    assert (out.device.type, tuple(out.shape), out.dtype) == ("meta", (2, 3, 128), torch.float32)
    v = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    half = emb(v.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16  # bfloat16 rounds an argument near 50 to a quarter: loose values
    torch.testing.assert_close(half.double(), emb(v), atol=0.15, rtol=0)


def test_a_bfloat16_unifusion_tokenizes_float32_grounding_in_its_own_dtype():
    """The half-precision GPU path: the sampler hands float32 grounding to a half-precision model. Every token is
    computed in the model's dtype, under every drop setting and with no seg pixels at all (one float32 intermediate
    would reach a bfloat16 Linear and raise), and equals the float32 model's tokens to bfloat16 precision."""
    import copy

    cfg = tiny().unifusion
    torch.manual_seed(0)
    uni = UniFusion(cfg).eval()
    with torch.no_grad():
        for name, p in uni.named_parameters():
            if name.startswith("null_"):
                p.normal_()
    half = copy.deepcopy(uni).to(torch.bfloat16)
    g = _random_grounding(cfg, seed=3)
    g["masks"][1, 2:] = 0  # padded slots in sample 1
    no_segs = dict(g, segs=torch.zeros_like(g["segs"]))
    cases = [(g, DropFlags.preset(p)) for p in ("all", "mask", "box", "point")] + [
        (g, DropFlags(True, True, True, True)), (no_segs, DropFlags.preset("all"))]
    with torch.no_grad():
        for grounding, drop in cases:
            want = uni.tokenize(**grounding, drop=drop)
            got = half.tokenize(**grounding, drop=drop)
            assert got.dtype == torch.bfloat16, drop
            torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05, msg=f"{drop}")


def test_a_dropped_modality_ignores_its_coordinates_and_a_kept_one_reads_them():
    """Each drop flag alone: the tokens of its modality no longer depend on its coordinates (they come from the null
    feature), and with nothing dropped they do. Masks: the polygon and the seg tokens. Token blocks are
    [box | point | scribble | polygon] x n_slots, then the seg tokens."""
    cfg = tiny().unifusion
    torch.manual_seed(0)
    uni = UniFusion(cfg).eval()
    n = cfg.n_slots
    g = _random_grounding(cfg, seed=4)
    moved = _random_grounding(cfg, seed=5)
    cases = {0: (["boxes"], [0]), 1: (["points"], [1]), 2: (["scribbles"], [2]), 3: (["polygons", "segs"], [3, 4])}
    with torch.no_grad():
        for flag, (keys, blocks) in cases.items():
            g2 = dict(g, **{k: moved[k] for k in keys})
            only = DropFlags(*[i == flag for i in range(4)])
            for drop, same in ((only, True), (DropFlags.preset("all"), False)):
                a, b = uni.tokenize(**g, drop=drop), uni.tokenize(**g2, drop=drop)
                for block in blocks:
                    rows = slice(block * n, (block + 1) * n) if block < 4 else slice(4 * n, None)
                    assert torch.equal(a[:, rows], b[:, rows]) == same, (keys, drop)
