"""Key maps official InstanceDiffusion checkpoint <-> diffusers model (CPU, fast).

Ground truths: `shared/parity/keys.txt` (official tiny key list), the spec's SD1.5 counts, the key sets
of real diffusers / transformers modules, and diffusers' internal LDM converters (used here only as an
oracle: `diffusers.loaders.single_file_utils`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from instdiff_lib.weights.keymap import (
    KeyMapError,
    UNetLayout,
    convert_text_encoder_state_dict,
    convert_unet_state_dict,
    convert_unet_state_dict_to_ldm,
    convert_vae_state_dict,
    convert_vae_state_dict_to_ldm,
    diffusers_to_ldm_unet,
    ldm_to_diffusers_unet,
    transformer_param_names,
    unet_key_table,
    vae_key_table,
)
from instdiff_lib.weights.manifest import (
    SD15_OFFICIAL_CONFIG,
    TINY_OFFICIAL_CONFIG,
    key_group,
    manifest_numel,
    meta_state_dict,
    official_config_from_yaml,
    official_unet_manifest,
)

# $INSTDIFF_PARITY_DIR first (as `instdiff_lib.parity.parity_dir`): the mutation-testing copies of the tests live
# under outputs/mutation/<module>/, where ../shared/parity does not exist and these tests would silently skip
PARITY = Path(os.environ.get("INSTDIFF_PARITY_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "parity")
OURS = ("position_net.", "scaleu.")  # keys that live outside the diffusers UNet proper

TINY_LAYOUT = UNetLayout.from_config(TINY_OFFICIAL_CONFIG)
SD15_LAYOUT = UNetLayout.from_config(SD15_OFFICIAL_CONFIG)


def _parity_file(name: str) -> Path:
    path = PARITY / name
    if not path.exists():
        pytest.skip(f"parity fixture {path} not found (expected the shared/ folder next to the repo)")
    return path


def _read_keys_txt() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in _parity_file("keys.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        out[key] = tuple(json.loads(shape))
    return out


def _tiny_unet(device: str = "cpu") -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel(
            sample_size=32,
            block_out_channels=(32, 32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            attention_head_dim=2,  # = number of heads (SD1.x diffusers quirk)
            cross_attention_dim=64,
            attention_type="gated",
        )


@pytest.fixture(scope="module")
def sd15_unet_meta() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            attention_type="gated",
        )
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(_parity_file("unet_tiny.safetensors")))


def _shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------
# 1-2. manifests
# ------------------------------------------------------------------------------------------------


def test_tiny_manifest_equals_official_keys_txt():
    assert official_unet_manifest(TINY_OFFICIAL_CONFIG) == _read_keys_txt()


def test_tiny_config_matches_fixture_yaml():
    yaml = pytest.importorskip("yaml")
    parsed = yaml.safe_load(_parity_file("tiny_config.yaml").read_text())
    assert official_config_from_yaml(parsed) == TINY_OFFICIAL_CONFIG


def test_sd15_manifest_counts():
    m = official_unet_manifest(SD15_OFFICIAL_CONFIG)
    assert len(m) == 1199
    assert manifest_numel(m) == 1_228_333_437
    groups: dict[str, dict] = {}
    for k, shape in m.items():
        groups.setdefault(key_group(k), {})[k] = shape
    assert len(groups["sd"]) == 686
    assert manifest_numel(groups["sd"]) == 859_520_964
    assert len(groups["fuser"]) == 272
    assert manifest_numel(groups["fuser"]) == 208_018_272
    assert len({k.split(".fuser.")[0] for k in groups["fuser"]}) == 16
    assert len(groups["position_net"]) == 217
    assert manifest_numel(groups["position_net"]) == 160_782_669
    convnext = {k: s for k, s in groups["position_net"].items() if ".convnext_tiny_backbone." in k}
    assert manifest_numel(convnext) == 27_818_592
    assert len(groups["scaleu"]) == 24
    assert manifest_numel(groups["scaleu"]) == 11_532
    assert [m[f"scaleu_b_{k}"][0] for k in range(12)] == [1280] * 7 + [640] * 3 + [320] * 2


def test_meta_state_dict():
    sd = meta_state_dict(official_unet_manifest(TINY_OFFICIAL_CONFIG))
    t = sd["input_blocks.1.1.transformer_blocks.0.fuser.alpha_attn"]
    assert t.is_meta and t.shape == () and t.dtype == torch.float32
    assert sd["scaleu_s_0"].shape == (1,)


# ------------------------------------------------------------------------------------------------
# 3. mapped manifests / weights == diffusers key sets and shapes
# ------------------------------------------------------------------------------------------------


def test_sd15_prefix_table_matches_spec():
    t = ldm_to_diffusers_unet(SD15_LAYOUT)
    expected = {
        "time_embed.0": "time_embedding.linear_1",
        "input_blocks.0.0": "conv_in",
        "input_blocks.2.1": "down_blocks.0.attentions.1",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.9.0.op": "down_blocks.2.downsamplers.0.conv",
        "input_blocks.11.0": "down_blocks.3.resnets.1",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.8.2.conv": "up_blocks.2.upsamplers.0.conv",
        "output_blocks.11.1": "up_blocks.3.attentions.2",
        "out.2": "conv_out",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "output_blocks.3.0.emb_layers.1": "up_blocks.1.resnets.0.time_emb_proj",
        "middle_block.2.out_layers.3": "mid_block.resnets.1.conv2",
    }
    assert {k: t[k] for k in expected} == expected
    absent = ("input_blocks.10.1", "output_blocks.0.1", "output_blocks.11.2.conv", "input_blocks.5.0.skip_connection")
    assert not any(k in t for k in absent)
    assert diffusers_to_ldm_unet(SD15_LAYOUT) == {v: k for k, v in t.items()}
    assert [SD15_LAYOUT.resnet_has_shortcut(f"input_blocks.{i}.0") for i in (1, 4, 5, 7, 10)] == [
        False, True, False, True, False,
    ]  # fmt: skip
    assert all(SD15_LAYOUT.resnet_has_shortcut(f"output_blocks.{i}.0") for i in range(12))


def test_prefix_table_agrees_with_full_key_table():
    for layout in (SD15_LAYOUT, TINY_LAYOUT):
        prefixes = ldm_to_diffusers_unet(layout)
        table, _ = unet_key_table(layout)
        for ldm, diff in table.items():
            parts = ldm.split(".")
            # longest module prefix of the key that the prefix table knows; the rest is kept verbatim
            n = max(i for i in range(1, len(parts)) if ".".join(parts[:i]) in prefixes)
            assert prefixes[".".join(parts[:n])] + "." + ".".join(parts[n:]) == diff, ldm


def test_sd15_manifest_maps_onto_diffusers_unet(sd15_unet_meta):
    manifest = official_unet_manifest(SD15_OFFICIAL_CONFIG)
    src = meta_state_dict(manifest)
    converted = convert_unet_state_dict(src, SD15_LAYOUT)
    assert len(converted) == len(src)
    expected = {k: s for k, s in sd15_unet_meta.items() if not k.startswith("position_net.")}  # drop GLIGEN
    expected |= {k: s for k, s in manifest.items() if k.startswith("position_net.")}
    expected |= {"scaleu." + k: s for k, s in manifest.items() if k.startswith("scaleu_")}
    assert _shapes(converted) == expected
    assert {id(v) for v in converted.values()} == {id(v) for v in src.values()}  # re-keyed, not copied
    table, optional = unet_key_table(SD15_LAYOUT)
    assert not optional and all(converted[d] is src[k] for k, d in table.items())


def test_tiny_manifest_maps_onto_diffusers_unet():
    manifest = official_unet_manifest(TINY_OFFICIAL_CONFIG)
    converted = convert_unet_state_dict(meta_state_dict(manifest), TINY_LAYOUT)
    model = _shapes(_tiny_unet("meta").state_dict())
    expected = {k: s for k, s in model.items() if not k.startswith("position_net.")}
    assert {k: s for k, s in _shapes(converted).items() if not k.startswith(OURS)} == expected
    assert sum(k.startswith("scaleu.") for k in converted) == 18
    assert sum(k.startswith("position_net.") for k in converted) == 91


def test_tiny_real_weights_load_into_diffusers_unet(tiny_weights):
    converted = convert_unet_state_dict(tiny_weights, TINY_LAYOUT)
    assert len(converted) == len(tiny_weights) == 790
    ids = {id(v) for v in tiny_weights.values()}
    assert all(id(v) in ids for v in converted.values())  # no copies
    unet = _tiny_unet()
    result = unet.load_state_dict({k: v for k, v in converted.items() if not k.startswith(OURS)}, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("position_net.") for k in result.missing_keys)
    sd = unet.state_dict()
    assert torch.equal(sd["up_blocks.1.upsamplers.0.conv.weight"], tiny_weights["output_blocks.5.2.conv.weight"])
    assert torch.equal(sd["up_blocks.0.upsamplers.0.conv.weight"], tiny_weights["output_blocks.2.1.conv.weight"])
    k = "down_blocks.2.resnets.0.conv_shortcut.weight"
    assert torch.equal(sd[k], tiny_weights["input_blocks.7.0.skip_connection.weight"])
    assert converted["scaleu.scaleu_b_3"] is tiny_weights["scaleu_b_3"]
    assert converted["position_net.in_conv.weight"] is tiny_weights["position_net.in_conv.weight"]


def test_layout_without_channel_mult_accepts_optional_shortcuts(tiny_weights):
    layout = UNetLayout(n_levels=3, layers_per_block=2, attn_levels=(True, True, False))
    assert layout.n_output_blocks == 9
    assert convert_unet_state_dict(tiny_weights, layout) == convert_unet_state_dict(tiny_weights, TINY_LAYOUT)


# ------------------------------------------------------------------------------------------------
# 4. oracles (diffusers' internal converters) and round trips
# ------------------------------------------------------------------------------------------------


def _oracle_unet(sd, layers_per_block):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ckpt = {"model.diffusion_model." + k: v for k, v in sd.items()}
    return convert_ldm_unet_checkpoint(ckpt, {"layers_per_block": layers_per_block})


def test_unet_oracle_tiny_real_weights(tiny_weights):
    ours = convert_unet_state_dict(tiny_weights, TINY_LAYOUT)
    oracle = _oracle_unet(tiny_weights, 2)  # silently drops position_net / scaleu
    ours_unet = {k: v for k, v in ours.items() if not k.startswith(OURS)}
    assert set(oracle) == set(ours_unet)
    assert len(ours_unet) == 681
    for k, v in oracle.items():
        assert v is ours_unet[k], k


def test_unet_oracle_sd15_manifest():
    src = meta_state_dict(official_unet_manifest(SD15_OFFICIAL_CONFIG))
    ours = {k: v for k, v in convert_unet_state_dict(src, SD15_LAYOUT).items() if not k.startswith(OURS)}
    oracle = _oracle_unet(src, 2)
    assert set(oracle) == set(ours)
    assert all(oracle[k] is ours[k] for k in oracle)


def test_unet_round_trip_diffusers_ldm_diffusers():
    unet = _tiny_unet()
    sd = {k: v for k, v in unet.state_dict().items() if not k.startswith("position_net.")}
    official = _read_keys_txt()
    sd |= {k: torch.zeros(s) for k, s in official.items() if k.startswith("position_net.")}
    sd |= {"scaleu." + k: torch.zeros(s) for k, s in official.items() if k.startswith("scaleu_")}
    ldm = convert_unet_state_dict_to_ldm(sd, TINY_LAYOUT)
    assert _shapes(ldm) == official  # writes back exactly the official names and shapes
    back = convert_unet_state_dict(ldm, TINY_LAYOUT)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


def test_unet_round_trip_ldm_diffusers_ldm(tiny_weights):
    back = convert_unet_state_dict_to_ldm(convert_unet_state_dict(tiny_weights, TINY_LAYOUT), TINY_LAYOUT)
    assert set(back) == set(tiny_weights) and all(back[k] is tiny_weights[k] for k in back)


def _vae_oracle(ldm_sd, n_blocks):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {
        "down_block_types": ("DownEncoderBlock2D",) * n_blocks,
        "up_block_types": ("UpDecoderBlock2D",) * n_blocks,
    }
    return convert_ldm_vae_checkpoint(dict(ldm_sd), config)


def test_vae_table_with_three_channel_widths():
    """The first decoder ResBlock of each level reads the channels of the level above it (after the mid block, for
    the last): with widths (32, 32, 64, 96) the table has exactly the diffusers VAE's keys, shortcuts included (found
    by mutation testing: with (32, 64, 64) a block reading the wrong level's width still decides its shortcut right)."""
    boc, lpb = (32, 32, 64, 96), 1
    vae = AutoencoderKL(block_out_channels=boc, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=lpb, latent_channels=4)
    table, _ = vae_key_table({"block_out_channels": boc, "layers_per_block": lpb})
    assert set(table.values()) == set(vae.state_dict())
    shortcuts = {k.split(".")[2] for k in table.values() if k.startswith("decoder.") and "conv_shortcut.weight" in k}
    assert shortcuts == {"1", "2"}  # up_blocks 0: 96 -> 96 (after the mid block), 1: 96 -> 64, 2: 64 -> 32, 3: 32 -> 32


def test_vae_oracle_and_round_trip_tiny():
    boc, lpb = (32, 64, 64), 2
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=boc,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=lpb,
        latent_channels=4,
    )
    sd = vae.state_dict()
    ldm = convert_vae_state_dict_to_ldm(sd, {"block_out_channels": boc, "layers_per_block": lpb})
    # LDM names and shapes by rule
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert ldm["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    assert "encoder.down.2.block.0.nin_shortcut.weight" not in ldm
    assert "encoder.down.2.downsample.conv.weight" not in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    # LDM decoder up.0 (highest resolution, 32 ch, with a shortcut from 64) is diffusers up_blocks[2]
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"] is sd["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"]
    assert ldm["decoder.up.2.upsample.conv.weight"] is sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]

    ours = convert_vae_state_dict(ldm, SimpleNamespace(block_out_channels=boc, layers_per_block=lpb))  # attributes
    oracle = _vae_oracle(ldm, 3)
    assert set(ours) == set(oracle) == set(sd)
    for k in sd:
        assert ours[k].shape == sd[k].shape and torch.equal(ours[k], sd[k]) and torch.equal(oracle[k], ours[k]), k
    AutoencoderKL(
        block_out_channels=boc,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=lpb,
        latent_channels=4,
    ).load_state_dict(ours, strict=True)


def test_vae_sd15_key_set_and_oracle():
    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        )
    sd = vae.state_dict()
    table, reshape = vae_key_table()  # SD1.5 defaults
    assert set(table.values()) == set(sd) and len(reshape) == 8
    ldm = convert_vae_state_dict_to_ldm(sd)
    assert len(ldm) == 248
    ours = convert_vae_state_dict(ldm)
    oracle = _vae_oracle(ldm, 4)
    assert _shapes(ours) == _shapes(oracle) == _shapes(sd)


def test_text_encoder_conversion():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    model = CLIPTextModel(cfg)
    sd = model.state_dict()
    # transformers 5 flattened CLIPTextModel (no `text_model.` level); the official keys carry it
    assert "final_layer_norm.weight" in sd
    official = {"transformer.text_model." + k: v for k, v in sd.items()}
    official["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out = convert_text_encoder_state_dict(official, expected_keys=sd.keys())
    assert set(out) == set(sd)
    assert all(out[k] is sd[k] for k in out)
    CLIPTextModel(cfg).load_state_dict(out, strict=True)

    with pytest.raises(KeyMapError, match="transformer.logit_scale"):
        convert_text_encoder_state_dict({**official, "transformer.logit_scale": torch.zeros(())})
    del official["transformer.text_model.final_layer_norm.bias"]
    with pytest.raises(KeyMapError, match=r"missing key\(s\): final_layer_norm\.bias"):
        convert_text_encoder_state_dict(official, expected_keys=sd.keys())
    assert "text_model.encoder.layers.1.mlp.fc2.bias" in convert_text_encoder_state_dict(
        official, target_prefix="text_model."
    )


# ------------------------------------------------------------------------------------------------
# 5. strictness
# ------------------------------------------------------------------------------------------------


def test_unknown_unet_key_raises(tiny_weights):
    bad = dict(tiny_weights)
    bad["input_blocks.99.0.weight"] = torch.zeros(1)
    # the message names the direction (found by mutation testing)
    with pytest.raises(KeyMapError, match=r"^official UNet -> diffusers: key mismatch\. "
                                          r"1 unknown key\(s\): input_blocks\.99\.0\.weight\.$") as info:
        convert_unet_state_dict(bad, TINY_LAYOUT)
    assert info.value.unknown == ["input_blocks.99.0.weight"] and info.value.missing == []
    assert isinstance(info.value, KeyError)
    for key in ("scaleu_b_9", "input_blocks.1.1.transformer_blocks.0.fuser.scale", "model.diffusion_model.out.0.bias"):
        with pytest.raises(KeyMapError, match=key.replace(".", r"\.")):
            convert_unet_state_dict({**tiny_weights, key: torch.zeros(1)}, TINY_LAYOUT)


def test_missing_unet_key_raises(tiny_weights):
    for key in ("output_blocks.5.2.conv.weight", "input_blocks.7.0.skip_connection.bias", "scaleu_s_8"):
        bad = {k: v for k, v in tiny_weights.items() if k != key}
        with pytest.raises(KeyMapError, match=r"1 missing key\(s\): " + key.replace(".", r"\.")):
            convert_unet_state_dict(bad, TINY_LAYOUT)
    no_pos = {k: v for k, v in tiny_weights.items() if not k.startswith("position_net.")}
    with pytest.raises(KeyMapError, match=r"position_net\.\*"):
        convert_unet_state_dict(no_pos, TINY_LAYOUT)
    # a plain SD checkpoint (no fusers / UniFusion / ScaleU) is rejected unless asked for
    plain = {k: v for k, v in tiny_weights.items() if key_group(k) == "sd"}
    with pytest.raises(KeyMapError):
        convert_unet_state_dict(plain, TINY_LAYOUT)
    assert len(convert_unet_state_dict(plain, TINY_LAYOUT, instdiff=False)) == len(plain)


def test_error_message_lists_first_ten_and_count(tiny_weights):
    bad = dict(tiny_weights) | {f"junk.{i:02d}": torch.zeros(1) for i in range(15)}
    with pytest.raises(KeyMapError) as info:
        convert_unet_state_dict(bad, TINY_LAYOUT)
    msg = str(info.value)
    assert "15 unknown key(s)" in msg and "junk.09" in msg and "junk.10" not in msg and "(+5 more)" in msg


def test_vae_strictness():
    sd = convert_vae_state_dict_to_ldm(meta_state_dict({k: (2, 2) for k in vae_key_table()[0].values()}))
    with pytest.raises(KeyMapError, match=r"loss\.logvar"):
        convert_vae_state_dict({**sd, "loss.logvar": torch.zeros(())})
    del sd["decoder.up.3.upsample.conv.bias"]
    with pytest.raises(KeyMapError, match=r"missing key\(s\): decoder\.up\.3\.upsample\.conv\.bias"):
        convert_vae_state_dict(sd)


# ------------------------------------------------------------------------------------------------
# 6. edge cases found by mutation testing (tests/MUTATION.md)
# ------------------------------------------------------------------------------------------------


def test_layout_from_ldm_hyper_parameters():
    # built inside the test (the module-level layouts above are built once, at import)
    sd15 = UNetLayout(n_levels=4, layers_per_block=2, attn_levels=(True, True, True, False), channel_mult=(1, 2, 4, 4))
    assert UNetLayout.from_config(SD15_OFFICIAL_CONFIG) == sd15 and sd15.transformer_depth == 1
    assert UNetLayout.from_config(TINY_OFFICIAL_CONFIG) == UNetLayout(3, 2, (True, True, False), (1, 1, 2), 1)
    # attention at the levels whose downsampling factor 2**level is listed; depth defaults to 1
    assert UNetLayout.from_ldm([1, 2, 2, 4, 4], 1, [2, 16]) == UNetLayout(5, 1, (False, True, False, False, True),
                                                                          (1, 2, 2, 4, 4), 1)
    cfg = {"channel_mult": (1, 2), "num_res_blocks": 3, "attention_resolutions": (1,)}  # no transformer_depth key
    assert UNetLayout.from_config(cfg) == UNetLayout(2, 3, (True, False), (1, 2), 1)
    assert UNetLayout.from_config(cfg | {"transformer_depth": 2}).transformer_depth == 2
    assert UNetLayout.from_ldm((1, 2), 3, (1,), transformer_depth=2) == UNetLayout(2, 3, (True, False), (1, 2), 2)


def test_layout_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match=r"attn_levels has 2 entries, expected n_levels=3"):
        UNetLayout(n_levels=3, layers_per_block=2, attn_levels=(True, False))
    with pytest.raises(ValueError, match=r"channel_mult has 2 entries, expected 3"):
        UNetLayout(n_levels=3, layers_per_block=2, attn_levels=(True, True, False), channel_mult=(1, 2))
    unknown = UNetLayout(n_levels=3, layers_per_block=2, attn_levels=(True, True, False))
    assert unknown.channel_mult is None  # then whether a ResBlock has a 1x1 shortcut is unknown (None), middle included
    assert [unknown.resnet_has_shortcut(p) for p in ("input_blocks.4.0", "middle_block.0", "output_blocks.8.0")] == [
        None, None, None]


def test_key_map_error_message_format():
    unknown = [f"u{i:02d}" for i in range(11)]
    err = KeyMapError("what", unknown=reversed(unknown), missing=["m1"])
    expected = ("what: key mismatch. 11 unknown key(s): u00, u01, u02, u03, u04, u05, u06, u07, u08, u09, ... "
                "(+1 more). 1 missing key(s): m1.")
    assert str(err) == err.message == expected and err.args == (expected,)
    assert err.unknown == unknown and err.missing == ["m1"]
    ten = KeyMapError("w", missing=unknown[:10])  # exactly ten: all shown, no "more"
    assert str(ten) == "w: key mismatch. 10 missing key(s): " + ", ".join(unknown[:10]) + "."


def test_text_encoder_errors_name_the_conversion_and_ignore_expected_position_ids():
    sd = {"transformer.text_model.final_layer_norm.weight": torch.zeros(2)}
    with pytest.raises(KeyMapError) as info:
        convert_text_encoder_state_dict({**sd, "transformer.logit_scale": torch.zeros(())})
    assert str(info.value) == ("official text encoder -> CLIPTextModel: key mismatch. "
                               "1 unknown key(s): transformer.logit_scale.")
    # a transformers-4 key list carries `embeddings.position_ids`: not required in the result
    out = convert_text_encoder_state_dict(sd, expected_keys=["final_layer_norm.weight", "embeddings.position_ids"])
    assert list(out) == ["final_layer_norm.weight"]
    with pytest.raises(KeyMapError) as info:
        convert_text_encoder_state_dict(sd, expected_keys=["final_layer_norm.weight", "final_layer_norm.bias"])
    assert str(info.value) == ("official text encoder -> CLIPTextModel: key mismatch. "
                               "1 missing key(s): final_layer_norm.bias.")


# official-style configs whose key sets differ from SD1.5 / tiny in the ResBlock channel arithmetic (decreasing and
# uneven multipliers, one and three ResBlocks per level) and in the transformer depth
ODD_CONFIGS = [
    TINY_OFFICIAL_CONFIG | {"channel_mult": (2, 1, 3), "num_res_blocks": 1},
    TINY_OFFICIAL_CONFIG | {"channel_mult": (3, 1, 1, 2), "num_res_blocks": 3, "attention_resolutions": (2, 8)},
    TINY_OFFICIAL_CONFIG | {"transformer_depth": 2},
]


@pytest.mark.parametrize("cfg", [SD15_OFFICIAL_CONFIG, TINY_OFFICIAL_CONFIG, *ODD_CONFIGS],
                         ids=["sd15", "tiny", "mult213", "mult3112", "depth2"])
def test_resnet_channels_shortcuts_and_key_table_match_the_official_manifest(cfg):
    """The manifest (an independent simulation of the LDM constructor's skip-channel stack) is the oracle."""
    layout = UNetLayout.from_config(cfg)
    m = official_unet_manifest(cfg)
    mc, lpb, n = cfg["model_channels"], cfg["num_res_blocks"], len(cfg["channel_mult"])
    resnets = []
    i = 1
    for level in range(n):
        for j in range(lpb):
            resnets.append((f"input_blocks.{i}.0", layout._down_resnet_in_mult(level, j)))
            i += 1
        i += level != n - 1  # the Downsample
    k = 0
    for level in reversed(range(n)):
        for j in range(lpb + 1):
            resnets.append((f"output_blocks.{k}.0", layout._up_resnet_in_mult(level, j)))
            k += 1
    for prefix, mult in resnets:
        assert mult * mc == m[f"{prefix}.in_layers.0.weight"][0], prefix  # GroupNorm over the block's input
    for prefix in [p for p, _ in resnets] + ["middle_block.0", "middle_block.2"]:
        assert layout.resnet_has_shortcut(prefix) == (f"{prefix}.skip_connection.weight" in m), prefix
    table, optional = unet_key_table(layout)  # fusers by default
    assert set(table) == {k for k in m if key_group(k) in ("sd", "fuser")} and not optional
    assert set(unet_key_table(layout, fusers=False)[0]) == {k for k in m if key_group(k) == "sd"}


def test_transformer_param_names_default_to_one_block_with_fuser():
    names = transformer_param_names()
    official = [k[len("input_blocks.1.1."):] for k in official_unet_manifest(TINY_OFFICIAL_CONFIG)
                if k.startswith("input_blocks.1.1.")]
    assert len(names) == len(official) == 43 and set(names) == set(official)
    assert len(transformer_param_names(fuser=False)) == 26


def test_vae_attention_weights_accept_linear_shapes_and_reject_others():
    boc = {"block_out_channels": (4, 8), "layers_per_block": 1}
    table, reshape = vae_key_table(boc)
    assert sorted(reshape) == sorted(f"{side}.mid.attn_1.{q}.weight" for side in ("encoder", "decoder")
                                     for q in ("q", "k", "v", "proj_out"))
    ldm = {k: torch.zeros(8, 8, 1, 1) if k in reshape else torch.zeros(1) for k in table}
    out = convert_vae_state_dict(ldm, boc)
    assert out["encoder.mid_block.attentions.0.to_q.weight"].shape == (8, 8)
    assert out["decoder.mid_block.attentions.0.group_norm.weight"] is ldm["decoder.mid.attn_1.norm.weight"]
    resaved = dict(ldm, **{"decoder.mid.attn_1.v.weight": torch.zeros(8, 8)})  # already Linear-shaped: kept
    assert convert_vae_state_dict(resaved, boc)["decoder.mid_block.attentions.0.to_v.weight"] is resaved[
        "decoder.mid.attn_1.v.weight"]
    bad = dict(ldm, **{"encoder.mid.attn_1.k.weight": torch.zeros(8, 8, 3, 3)})
    with pytest.raises(ValueError, match=r"encoder\.mid\.attn_1\.k\.weight: expected a 1x1 conv weight \[C, C, 1, 1\], "
                                         r"got \(8, 8, 3, 3\)"):
        convert_vae_state_dict(bad, boc)
    # back to LDM: Linear weights become [C, C, 1, 1]; conv-shaped ones (and everything else) are passed through
    back = convert_vae_state_dict_to_ldm(out, boc)
    assert back["encoder.mid.attn_1.q.weight"].shape == (8, 8, 1, 1)
    conv = dict(out, **{"encoder.mid_block.attentions.0.to_k.weight": torch.zeros(8, 8, 1, 1)})
    assert convert_vae_state_dict_to_ldm(conv, boc)["encoder.mid.attn_1.k.weight"] is conv[
        "encoder.mid_block.attentions.0.to_k.weight"]
    assert back["encoder.conv_in.weight"] is out["encoder.conv_in.weight"]


def test_conversion_back_to_ldm_is_strict(tiny_weights):
    ours = convert_unet_state_dict(tiny_weights, TINY_LAYOUT)

    def message(sd, layout=TINY_LAYOUT, **kw):
        with pytest.raises(KeyMapError) as info:
            convert_unet_state_dict_to_ldm(sd, layout, **kw)
        return str(info.value)

    assert message({**ours, "foo.weight": torch.zeros(1)}) == (
        "diffusers -> official UNet: key mismatch. 1 unknown key(s): foo.weight.")
    assert message({k: v for k, v in ours.items() if k != "scaleu.scaleu_s_8"}) == (
        "diffusers -> official UNet: key mismatch. 1 missing key(s): scaleu.scaleu_s_8.")
    key = "up_blocks.1.upsamplers.0.conv.weight"
    assert message({k: v for k, v in ours.items() if k != key}) == (
        f"diffusers -> official UNet: key mismatch. 1 missing key(s): {key}.")
    assert message({k: v for k, v in ours.items() if not k.startswith("position_net.")}) == (
        "diffusers -> official UNet: key mismatch. 1 missing key(s): position_net.*.")
    # a plain UNet (instdiff=False) has no ScaleU: such a key is unknown there
    plain = convert_unet_state_dict({k: v for k, v in tiny_weights.items() if key_group(k) == "sd"}, TINY_LAYOUT,
                                    instdiff=False)
    back = convert_unet_state_dict_to_ldm(plain, TINY_LAYOUT, instdiff=False)
    assert set(back) == {k for k in tiny_weights if key_group(k) == "sd"}
    assert message({**plain, "scaleu.scaleu_b_0": torch.zeros(1)}, instdiff=False) == (
        "diffusers -> official UNet: key mismatch. 1 unknown key(s): scaleu.scaleu_b_0.")
    # without channel_mult the shortcut keys are optional in this direction too
    layout = UNetLayout(n_levels=3, layers_per_block=2, attn_levels=(True, True, False))
    again = convert_unet_state_dict_to_ldm(convert_unet_state_dict(tiny_weights, layout), layout)
    assert set(again) == set(tiny_weights) and all(again[k] is tiny_weights[k] for k in again)


def test_vae_errors_name_the_direction():
    table, _ = vae_key_table()
    sd = convert_vae_state_dict_to_ldm(meta_state_dict({k: (2, 2) for k in table.values()}))
    with pytest.raises(KeyMapError) as info:
        convert_vae_state_dict({**sd, "loss.logvar": torch.zeros(())})
    assert str(info.value) == "official VAE -> diffusers: key mismatch. 1 unknown key(s): loss.logvar."
    with pytest.raises(KeyMapError) as info:
        convert_vae_state_dict_to_ldm({k: torch.zeros(1) for k in list(table.values())[1:]})
    assert str(info.value) == f"diffusers VAE -> official: key mismatch. 1 missing key(s): {list(table.values())[0]}."
