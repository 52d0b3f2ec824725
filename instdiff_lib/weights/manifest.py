"""Synthetic key -> shape manifests of the official InstanceDiffusion UNet state dict.

The real checkpoint (13.6 GB) cannot be downloaded on the development / CI machines, so the loader is
tested against manifests generated here from the architecture rules of the official code
(`openaimodel.UNetModel` + `GatedSelfAttentionDense` fusers + ScaleU + `UniFusion` position net).
Key names are the official (LDM) ones, unprefixed, as in `ckpt["ema"]` / `keys.txt` of the parity
fixture; shapes are tuples (`()` for the scalar fuser gates).

Config dicts are flat: the `model.params` of an official `configs/test_*.yaml` plus the
`grounding_tokenizer.params` (UniFusion) entries, plus three keys that are hard-wired in the official
code (`convnext_depths`, `convnext_dims`: ConvNeXt-T; `num_seg_tokens`: 64). `official_config_from_yaml`
turns a parsed yaml into this form.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "TINY_OFFICIAL_CONFIG",
    "SD15_OFFICIAL_CONFIG",
    "official_unet_manifest",
    "official_config_from_yaml",
    "meta_state_dict",
    "key_group",
    "manifest_numel",
]

Shape = tuple[int, ...]

# Hard-wired in the official UniFusion (not config parameters there).
MAX_OBJS = 30  # instance slots = input channels of `in_conv`
FOURIER_FREQS = 16  # the constructor's fourier_freqs=8 is overridden
N_SCRIBBLE_POINTS = 20
N_POLYGON_POINTS = 256
SEG_RESIZE = 512  # masks are resized to 512x512; ConvNeXt downsamples by 32 -> 16x16 map

# The parity fixture (shared/parity/tiny_config.yaml).
TINY_OFFICIAL_CONFIG: dict = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": (1, 2),
    "num_res_blocks": 2,
    "channel_mult": (1, 1, 2),
    "num_heads": 2,
    "transformer_depth": 1,
    "context_dim": 64,
    # UniFusion
    "in_dim": 48,  # instance text-embedding width
    "out_dim": 64,  # object-token width (= context_dim)
    "mid_dim": 16,  # MLP hidden width
    "convnext_depths": (1, 1, 1, 1),
    "convnext_dims": (8, 16, 32, 64),
    "num_seg_tokens": 64,
}

# The released model (configs/test_*.yaml; ConvNeXt-T backbone).
SD15_OFFICIAL_CONFIG: dict = {
    "image_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": (4, 2, 1),
    "num_res_blocks": 2,
    "channel_mult": (1, 2, 4, 4),
    "num_heads": 8,
    "transformer_depth": 1,
    "context_dim": 768,
    # UniFusion
    "in_dim": 768,
    "out_dim": 768,
    "mid_dim": 3072,
    "convnext_depths": (3, 3, 9, 3),
    "convnext_dims": (96, 192, 384, 768),
    "num_seg_tokens": 64,
}

_UNET_KEYS = (
    "image_size", "in_channels", "out_channels", "model_channels", "attention_resolutions",
    "num_res_blocks", "channel_mult", "num_heads", "transformer_depth", "context_dim",
)  # fmt: skip
_UNIFUSION_KEYS = ("in_dim", "out_dim", "mid_dim", "convnext_depths", "convnext_dims", "num_seg_tokens")


def official_config_from_yaml(cfg: Mapping) -> dict:
    """Flat config from a parsed official yaml (`{"model": {"params": {..., "grounding_tokenizer": ...}}}`).

    Keys missing from the yaml take the SD1.5 defaults of the hard-wired values (ConvNeXt-T, 64 seg tokens).
    """
    params = cfg["model"]["params"]
    gparams = params.get("grounding_tokenizer", {}).get("params", {})
    out = {k: _freeze(params[k]) for k in _UNET_KEYS if k in params}
    out.update({k: _freeze(gparams[k]) for k in _UNIFUSION_KEYS if k in gparams})
    for k in ("convnext_depths", "convnext_dims", "num_seg_tokens"):
        out.setdefault(k, SD15_OFFICIAL_CONFIG[k])
    return out


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


# --------------------------------------------------------------------------------------------------
# building blocks (each adds `prefix.name -> shape` entries to a manifest dict)
# --------------------------------------------------------------------------------------------------


def _linear(m: dict, p: str, c_in: int, c_out: int, bias: bool = True):
    m[f"{p}.weight"] = (c_out, c_in)
    if bias:
        m[f"{p}.bias"] = (c_out,)


def _conv(m: dict, p: str, c_in: int, c_out: int, k: int, groups: int = 1):
    m[f"{p}.weight"] = (c_out, c_in // groups, k, k)
    m[f"{p}.bias"] = (c_out,)


def _norm(m: dict, p: str, c: int):  # GroupNorm / LayerNorm affine parameters
    m[f"{p}.weight"] = (c,)
    m[f"{p}.bias"] = (c,)


def _resblock(m: dict, p: str, c_in: int, c_out: int, emb_dim: int):
    """LDM `ResBlock` (no scale-shift norm): in_layers = [GN, SiLU, conv3], out_layers = [GN, SiLU, Dropout, conv3]."""
    _norm(m, f"{p}.in_layers.0", c_in)
    _conv(m, f"{p}.in_layers.2", c_in, c_out, 3)
    _linear(m, f"{p}.emb_layers.1", emb_dim, c_out)
    _norm(m, f"{p}.out_layers.0", c_out)
    _conv(m, f"{p}.out_layers.3", c_out, c_out, 3)
    if c_in != c_out:
        _conv(m, f"{p}.skip_connection", c_in, c_out, 1)


def _attention(m: dict, p: str, query_dim: int, context_dim: int, inner_dim: int):
    """q/k/v without bias, `to_out.0` with bias."""
    _linear(m, f"{p}.to_q", query_dim, inner_dim, bias=False)
    _linear(m, f"{p}.to_k", context_dim, inner_dim, bias=False)
    _linear(m, f"{p}.to_v", context_dim, inner_dim, bias=False)
    _linear(m, f"{p}.to_out.0", inner_dim, query_dim)


def _geglu_ff(m: dict, p: str, dim: int, mult: int = 4):
    _linear(m, f"{p}.net.0.proj", dim, 2 * mult * dim)  # GEGLU: value and gate halves
    _linear(m, f"{p}.net.2", mult * dim, dim)


def _spatial_transformer(m: dict, p: str, c: int, n_heads: int, context_dim: int, depth: int):
    """SpatialTransformer with 1x1-conv proj_in/out; every block: attn1, fuser, attn2, GEGLU ff, norm1..3."""
    inner = n_heads * (c // n_heads)
    _norm(m, f"{p}.norm", c)
    _conv(m, f"{p}.proj_in", c, inner, 1)
    for d in range(depth):
        tb = f"{p}.transformer_blocks.{d}"
        _attention(m, f"{tb}.attn1", inner, inner, inner)
        _attention(m, f"{tb}.attn2", inner, context_dim, inner)
        _geglu_ff(m, f"{tb}.ff", inner)
        for i in (1, 2, 3):
            _norm(m, f"{tb}.norm{i}", inner)
        # GatedSelfAttentionDense(query_dim=inner, context_dim, n_heads, d_head=inner // n_heads)
        f = f"{tb}.fuser"
        _linear(m, f"{f}.linear", context_dim, inner)
        _attention(m, f"{f}.attn", inner, inner, inner)
        _geglu_ff(m, f"{f}.ff", inner)
        _norm(m, f"{f}.norm1", inner)
        _norm(m, f"{f}.norm2", inner)
        m[f"{f}.alpha_attn"] = ()
        m[f"{f}.alpha_dense"] = ()
    _conv(m, f"{p}.proj_out", inner, c, 1)


# --------------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------------


def _unet_and_scaleu(m: dict, cfg: Mapping) -> dict[str, Shape]:
    """The UNet (SD1.5 keys + fusers, in construction order); returns the ScaleU entries separately."""
    mc = cfg["model_channels"]
    mult = list(cfg["channel_mult"])
    lpb = cfg["num_res_blocks"]
    attn_res = set(cfg["attention_resolutions"])
    heads, ctx = cfg["num_heads"], cfg["context_dim"]
    depth = cfg.get("transformer_depth", 1)
    emb = 4 * mc

    _linear(m, "time_embed.0", mc, emb)
    _linear(m, "time_embed.2", emb, emb)

    _conv(m, "input_blocks.0.0", cfg["in_channels"], mc, 3)
    skip_chans = [mc]  # channels of every input block output, popped by the output blocks
    ch, ds, i = mc, 1, 1
    for level, mu in enumerate(mult):
        for _ in range(lpb):
            _resblock(m, f"input_blocks.{i}.0", ch, mu * mc, emb)
            ch = mu * mc
            if ds in attn_res:
                _spatial_transformer(m, f"input_blocks.{i}.1", ch, heads, ctx, depth)
            skip_chans.append(ch)
            i += 1
        if level != len(mult) - 1:
            _conv(m, f"input_blocks.{i}.0.op", ch, ch, 3)  # Downsample (stride-2 conv)
            skip_chans.append(ch)
            ds *= 2
            i += 1

    _resblock(m, "middle_block.0", ch, ch, emb)
    _spatial_transformer(m, "middle_block.1", ch, heads, ctx, depth)
    _resblock(m, "middle_block.2", ch, ch, emb)

    scaleu: dict[str, Shape] = {}
    k = 0
    for level in reversed(range(len(mult))):
        for j in range(lpb + 1):
            scaleu[f"scaleu_b_{k}"] = (ch,)  # h channels before the skip concat
            scaleu[f"scaleu_s_{k}"] = (1,)  # one scalar (not channel-wise)
            skip = skip_chans.pop()
            _resblock(m, f"output_blocks.{k}.0", ch + skip, mult[level] * mc, emb)
            ch = mult[level] * mc
            sub = 1
            if ds in attn_res:
                _spatial_transformer(m, f"output_blocks.{k}.1", ch, heads, ctx, depth)
                sub = 2
            if level != 0 and j == lpb:
                _conv(m, f"output_blocks.{k}.{sub}.conv", ch, ch, 3)  # Upsample: nearest x2, conv
                ds //= 2
            k += 1

    _norm(m, "out.0", ch)
    _conv(m, "out.2", ch, cfg["out_channels"], 3)
    return scaleu


def _position_net(m: dict, cfg: Mapping, p: str = "position_net"):
    """UniFusion with separate tokenizers for boxes, points, scribbles, polygons and segs."""
    in_dim, out_dim, mid = cfg["in_dim"], cfg["out_dim"], cfg["mid_dim"]
    depths, dims = list(cfg["convnext_depths"]), list(cfg["convnext_dims"])
    n_tok = cfg.get("num_seg_tokens", 64)
    fourier = 2 * FOURIER_FREQS  # sin + cos per frequency and coordinate
    feat = dims[-1] * (SEG_RESIZE // 32) ** 2 // n_tok  # seg token width (SD1.5: 3072)

    _conv(m, f"{p}.in_conv", MAX_OBJS, 3, 3)
    bb = f"{p}.convnext_tiny_backbone"
    _conv(m, f"{bb}.downsample_layers.0.0", 3, dims[0], 4)  # stem: 4x4 stride-4 conv, then LayerNorm
    _norm(m, f"{bb}.downsample_layers.0.1", dims[0])
    for s in range(1, 4):  # LayerNorm, then 2x2 stride-2 conv
        _norm(m, f"{bb}.downsample_layers.{s}.0", dims[s - 1])
        _conv(m, f"{bb}.downsample_layers.{s}.1", dims[s - 1], dims[s], 2)
    for s, (depth, d) in enumerate(zip(depths, dims)):
        for b in range(depth):
            blk = f"{bb}.stages.{s}.{b}"
            _conv(m, f"{blk}.dwconv", d, d, 7, groups=d)
            _norm(m, f"{blk}.norm", d)
            _linear(m, f"{blk}.pwconv1", d, 4 * d)
            _linear(m, f"{blk}.pwconv2", 4 * d, d)
            m[f"{blk}.gamma"] = (d,)  # layer scale

    loc_dims = {  # Fourier embedding width per location modality
        "position": fourier * 4,  # box (x0, y0, x1, y1)
        "point": fourier * 2,
        "scribble": fourier * 2 * N_SCRIBBLE_POINTS,
        "polygon": fourier * 2 * N_POLYGON_POINTS,
    }
    mlp_in = [in_dim + loc_dims[k] for k in ("position", "point", "scribble", "polygon")] + [feat]
    for t, c_in in enumerate(mlp_in):  # Linear, SiLU, Linear, SiLU, Linear
        _linear(m, f"{p}.linears_list.{t}.0", c_in, mid)
        _linear(m, f"{p}.linears_list.{t}.2", mid, mid)
        _linear(m, f"{p}.linears_list.{t}.4", mid, out_dim)

    m[f"{p}.null_positive_feature"] = (in_dim,)
    for name, dim in loc_dims.items():
        m[f"{p}.null_{name}_feature"] = (dim,)
    m[f"{p}.null_seg_feature"] = (feat,)
    m[f"{p}.pos_embedding"] = (1, n_tok, feat)


def official_unet_manifest(cfg: Mapping) -> dict[str, Shape]:
    """Official (LDM-named, unprefixed) UNet state-dict key -> shape, for an official-style config.

    Order: UNet in construction order (SD1.5 keys with the fusers inline), then `position_net.*`,
    then `scaleu_b_*`, `scaleu_s_*`. Tiny config: 790 keys (= shared/parity/keys.txt); SD1.5: 1199.
    """
    if cfg["out_dim"] != cfg["context_dim"]:
        raise ValueError(f"UniFusion out_dim ({cfg['out_dim']}) must equal context_dim ({cfg['context_dim']})")
    m: dict[str, Shape] = {}
    scaleu = _unet_and_scaleu(m, cfg)
    _position_net(m, cfg)
    m.update(sorted(scaleu.items(), key=lambda kv: (kv[0][7], int(kv[0][9:]))))
    return m


def key_group(key: str) -> str:
    """Which part of the official model an (LDM-named) key belongs to:
    "fuser", "position_net", "scaleu" or "sd" (the original SD1.5 UNet)."""
    if key.startswith("position_net."):
        return "position_net"
    if key.startswith("scaleu_"):
        return "scaleu"
    if ".fuser." in key:
        return "fuser"
    return "sd"


def manifest_numel(manifest: Mapping[str, Shape]) -> int:
    """Total number of parameters of a manifest."""
    total = 0
    for shape in manifest.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def meta_state_dict(manifest: Mapping[str, Shape], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A state dict of meta tensors (shape and dtype only, no storage) for a manifest."""
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in manifest.items()}
