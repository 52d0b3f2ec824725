"""Key maps between the official InstanceDiffusion checkpoint and our diffusers-based model.

The official checkpoint (`instancediffusion_sd15.pth`) stores the UNet under `ema` / `model` with the
CompVis LDM names of `openaimodel.UNetModel` (`input_blocks.*`, `middle_block.*`, `output_blocks.*`,
`time_embed.*`, `out.*`), plus the InstanceDiffusion additions:

* `<transformer>.transformer_blocks.0.fuser.*`  the gated self-attention in each of the 16 transformers;
* `position_net.*`                             the UniFusion grounding tokenizer;
* `scaleu_b_{k}`, `scaleu_s_{k}`                ScaleU, one pair per output block k.

Our model is a stock `diffusers.UNet2DConditionModel(attention_type="gated")`. Conventions of the
converted state dict (what `convert_unet_state_dict` returns):

* UNet keys get diffusers names. Only *module prefixes* change; every name inside a transformer
  (`norm`, `proj_in`, `transformer_blocks.0.*` including `fuser.*`, `proj_out`) is kept, and ResBlock
  internals follow `RESNET_RENAMES`.
* `position_net.*` is passed through verbatim (our UniFusion keeps the official sub-names and replaces
  the UNet's own GLIGEN `position_net`).
* `scaleu_b_{k}` / `scaleu_s_{k}` become `scaleu.scaleu_b_{k}` / `scaleu.scaleu_s_{k}` (our ScaleU module
  is registered as `scaleu`; see `SCALEU_PREFIX`).

All tables are generated from the config (`UNetLayout`, the VAE `block_out_channels`), never by
substring replacement, and every conversion is strict: each input key is used exactly once, unknown
keys and missing keys raise `KeyMapError`. Conversions only re-key (VAE attention weights are also
reshaped with a view), so they work on meta tensors and never copy data.

The VAE (`autoencoder` entry, LDM `AutoencoderKL`) and text encoder (`text_encoder` entry,
`FrozenCLIPEmbedder`) maps are at the end of the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "KeyMapError",
    "UNetLayout",
    "RESNET_RENAMES",
    "SCALEU_PREFIX",
    "SD15_VAE",
    "transformer_param_names",
    "ldm_to_diffusers_unet",
    "diffusers_to_ldm_unet",
    "unet_key_table",
    "convert_unet_state_dict",
    "convert_unet_state_dict_to_ldm",
    "vae_key_table",
    "convert_vae_state_dict",
    "convert_vae_state_dict_to_ldm",
    "convert_text_encoder_state_dict",
]

Tensor = torch.Tensor

# ResBlock internals: LDM `ResBlock` sub-module -> diffusers `ResnetBlock2D` sub-module.
RESNET_RENAMES: dict[str, str] = {
    "in_layers.0": "norm1",  # GroupNorm
    "in_layers.2": "conv1",  # 3x3 conv
    "emb_layers.1": "time_emb_proj",  # Linear(time_embed_dim -> C_out)
    "out_layers.0": "norm2",  # GroupNorm
    "out_layers.3": "conv2",  # 3x3 conv
    "skip_connection": "conv_shortcut",  # 1x1 conv, only when C_in != C_out
}

# Our ScaleU module is installed under this attribute name (parameters `scaleu_b_k`, `scaleu_s_k`).
SCALEU_PREFIX = "scaleu."
POSITION_NET_PREFIX = "position_net."
_SCALEU_KEY = re.compile(r"scaleu_([bs])_(\d+)")
_WB = ("weight", "bias")


class KeyMapError(KeyError):
    """A state dict does not match the expected key set (unknown and/or missing keys)."""

    def __init__(self, what: str, unknown: Iterable[str] = (), missing: Iterable[str] = ()):
        self.unknown = sorted(unknown)
        self.missing = sorted(missing)
        parts = [f"{what}: key mismatch."]
        for label, keys in (("unknown", self.unknown), ("missing", self.missing)):
            if keys:
                shown = ", ".join(keys[:10])
                more = f", ... (+{len(keys) - 10} more)" if len(keys) > 10 else ""
                parts.append(f"{len(keys)} {label} key(s): {shown}{more}.")
        self.message = " ".join(parts)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message (extra quotes)
        return self.message


def _check_keys(what: str, given: Iterable[str], expected: Iterable[str], optional: Iterable[str] = ()):
    given, expected, optional = set(given), set(expected), set(optional)
    unknown = given - expected - optional
    missing = expected - given
    if unknown or missing:
        raise KeyMapError(what, unknown, missing)


# --------------------------------------------------------------------------------------------------
# UNet layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetLayout:
    """What the UNet key names depend on.

    n_levels:          number of resolution levels, len(channel_mult) (SD1.5: 4).
    layers_per_block:  ResBlocks per down level, LDM `num_res_blocks` (SD1.5: 2); up levels have one more.
    attn_levels:       attn_levels[i] is True iff level i has a SpatialTransformer after each ResBlock,
                       i.e. 2**i in `attention_resolutions` (SD1.5: (True, True, True, False)).
    channel_mult:      optional; only decides which ResBlocks have a 1x1 `skip_connection`. Without it,
                       `skip_connection` keys are accepted for every ResBlock but required for none.
    transformer_depth: transformer blocks per SpatialTransformer (1 for SD1.5).

    The middle block always is ResBlock, SpatialTransformer, ResBlock (as in SD1.5 / the official UNet).
    """

    n_levels: int
    layers_per_block: int
    attn_levels: tuple[bool, ...]
    channel_mult: tuple[int, ...] | None = None
    transformer_depth: int = 1

    def __post_init__(self):
        if len(self.attn_levels) != self.n_levels:
            raise ValueError(f"attn_levels has {len(self.attn_levels)} entries, expected n_levels={self.n_levels}")
        if self.channel_mult is not None and len(self.channel_mult) != self.n_levels:
            raise ValueError(f"channel_mult has {len(self.channel_mult)} entries, expected {self.n_levels}")

    @classmethod
    def from_ldm(
        cls,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        transformer_depth: int = 1,
    ) -> UNetLayout:
        """Layout from the official (LDM) UNet hyper-parameters."""
        n = len(channel_mult)
        return cls(
            n_levels=n,
            layers_per_block=int(num_res_blocks),
            attn_levels=tuple(2**i in set(attention_resolutions) for i in range(n)),
            channel_mult=tuple(int(m) for m in channel_mult),
            transformer_depth=int(transformer_depth),
        )

    @classmethod
    def from_config(cls, cfg: Mapping) -> UNetLayout:
        """Layout from an official-style config dict (see `instdiff_lib.weights.manifest`)."""
        return cls.from_ldm(
            cfg["channel_mult"], cfg["num_res_blocks"], cfg["attention_resolutions"], cfg.get("transformer_depth", 1)
        )

    @property
    def n_output_blocks(self) -> int:
        """Number of LDM `output_blocks` (= number of ScaleU pairs)."""
        return self.n_levels * (self.layers_per_block + 1)

    # Channel multipliers (units of model_channels) at the input of each ResBlock; None if unknown.
    def _down_resnet_in_mult(self, level: int, j: int) -> int | None:
        if self.channel_mult is None:
            return None
        if j > 0:
            return self.channel_mult[level]
        return 1 if level == 0 else self.channel_mult[level - 1]  # conv_in outputs model_channels

    def _up_resnet_in_mult(self, level: int, j: int) -> int | None:
        """Input of output ResBlock j of (LDM) level `level`: h channels + popped skip channels."""
        cm = self.channel_mult
        if cm is None:
            return None
        h = cm[level] if j > 0 else cm[min(level + 1, self.n_levels - 1)]
        skip = cm[level] if j < self.layers_per_block else (cm[level - 1] if level > 0 else 1)
        return h + skip

    def resnet_has_shortcut(self, ldm_prefix: str) -> bool | None:
        """True/False if the ResBlock at `ldm_prefix` has a 1x1 skip conv; None if channel_mult is unknown."""
        return _resnet_shortcuts(self).get(ldm_prefix)


@dataclass(frozen=True)
class _Block:
    """One LDM module whose name changes: `ldm` prefix -> `diffusers` prefix, with its kind.

    kind: "plain" (a conv / linear / norm holding `weight` and `bias`), "resnet" or "transformer".
    """

    ldm: str
    diffusers: str
    kind: str


def _unet_blocks(layout: UNetLayout) -> list[_Block]:
    """All renamed modules of the UNet, in LDM construction order."""
    lpb = layout.layers_per_block
    last = layout.n_levels - 1
    blocks = [
        _Block("time_embed.0", "time_embedding.linear_1", "plain"),
        _Block("time_embed.2", "time_embedding.linear_2", "plain"),
        _Block("input_blocks.0.0", "conv_in", "plain"),
    ]
    # Encoder: each level has lpb x (ResBlock [+ SpatialTransformer]), then a Downsample except the last.
    i = 1
    for level in range(layout.n_levels):
        for j in range(lpb):
            blocks.append(_Block(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if layout.attn_levels[level]:
                blocks.append(_Block(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", "transformer"))
            i += 1
        if level != last:
            blocks.append(_Block(f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            i += 1
    blocks += [
        _Block("middle_block.0", "mid_block.resnets.0", "resnet"),
        _Block("middle_block.1", "mid_block.attentions.0", "transformer"),
        _Block("middle_block.2", "mid_block.resnets.1", "resnet"),
    ]
    # Decoder: LDM level `level` (from the last one down to 0) is diffusers up_blocks[u], u = last - level.
    # Each has lpb+1 x (ResBlock [+ ST]); all but the last up block end with an Upsample, which is
    # sub-module 1 of the output block without attention and sub-module 2 with it.
    k = 0
    for u in range(layout.n_levels):
        level = last - u
        attn = layout.attn_levels[level]
        for j in range(lpb + 1):
            blocks.append(_Block(f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{j}", "resnet"))
            if attn:
                blocks.append(_Block(f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{j}", "transformer"))
            if level != 0 and j == lpb:
                sub = 2 if attn else 1
                blocks.append(_Block(f"output_blocks.{k}.{sub}.conv", f"up_blocks.{u}.upsamplers.0.conv", "plain"))
            k += 1
    blocks += [
        _Block("out.0", "conv_norm_out", "plain"),
        _Block("out.2", "conv_out", "plain"),
    ]
    return blocks


def _resnet_shortcuts(layout: UNetLayout) -> dict[str, bool | None]:
    """LDM ResBlock prefix -> whether it has `skip_connection` (None: unknown, channel_mult not given)."""
    out: dict[str, bool | None] = {}
    lpb, last = layout.layers_per_block, layout.n_levels - 1
    cm = layout.channel_mult
    i = 1
    for level in range(layout.n_levels):
        for j in range(lpb):
            c_in = layout._down_resnet_in_mult(level, j)
            out[f"input_blocks.{i}.0"] = None if cm is None else c_in != cm[level]
            i += 1
        if level != last:
            i += 1  # the Downsample
    out["middle_block.0"] = out["middle_block.2"] = None if cm is None else False
    k = 0
    for level in reversed(range(layout.n_levels)):
        for j in range(lpb + 1):
            c_in = layout._up_resnet_in_mult(level, j)
            out[f"output_blocks.{k}.0"] = None if cm is None else c_in != cm[level]
            k += 1
    return out


def transformer_param_names(depth: int = 1, fuser: bool = True) -> list[str]:
    """Parameter names inside one SpatialTransformer / Transformer2DModel (identical in LDM and diffusers).

    `use_linear_projection=False`: `proj_in` / `proj_out` are 1x1 convs in both. With `fuser=True` each
    transformer block also holds the InstanceDiffusion / GLIGEN `GatedSelfAttentionDense` (`fuser.*`).
    """
    names = [f"{m}.{p}" for m in ("norm", "proj_in", "proj_out") for p in _WB]
    for d in range(depth):
        tb = f"transformer_blocks.{d}"
        for attn in ("attn1", "attn2"):
            names += [f"{tb}.{attn}.{q}.weight" for q in ("to_q", "to_k", "to_v")]
            names += [f"{tb}.{attn}.to_out.0.{p}" for p in _WB]
        names += [f"{tb}.{m}.{p}" for m in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3") for p in _WB]
        if fuser:
            f = f"{tb}.fuser"
            names += [f"{f}.alpha_attn", f"{f}.alpha_dense"]
            names += [f"{f}.attn.{q}.weight" for q in ("to_q", "to_k", "to_v")]
            names += [f"{f}.{m}.{p}" for m in ("attn.to_out.0", "ff.net.0.proj", "ff.net.2") for p in _WB]
            names += [f"{f}.{m}.{p}" for m in ("linear", "norm1", "norm2") for p in _WB]
    return names


def ldm_to_diffusers_unet(layout: UNetLayout) -> dict[str, str]:
    """Module-prefix table: official LDM module prefix -> diffusers module prefix.

    Examples (SD1.5): `input_blocks.0.0 -> conv_in`, `input_blocks.4.0 -> down_blocks.1.resnets.0`,
    `input_blocks.4.1 -> down_blocks.1.attentions.0`, `input_blocks.3.0.op -> down_blocks.0.downsamplers.0.conv`,
    `middle_block.1 -> mid_block.attentions.0`, `output_blocks.2.1.conv -> up_blocks.0.upsamplers.0.conv`,
    `output_blocks.5.2.conv -> up_blocks.1.upsamplers.0.conv`, `time_embed.0 -> time_embedding.linear_1`,
    `out.2 -> conv_out`. Each ResBlock entry is followed by its inner modules (`RESNET_RENAMES`, e.g.
    `input_blocks.4.0.skip_connection -> down_blocks.1.resnets.0.conv_shortcut`; the shortcut only where
    the block has one, or everywhere if `layout.channel_mult` is None). Inside a transformer nothing changes.
    """
    shortcuts = _resnet_shortcuts(layout)
    table: dict[str, str] = {}
    for b in _unet_blocks(layout):
        table[b.ldm] = b.diffusers
        if b.kind == "resnet":
            for ldm_sub, diff_sub in RESNET_RENAMES.items():
                if ldm_sub != "skip_connection" or shortcuts[b.ldm] is not False:
                    table[f"{b.ldm}.{ldm_sub}"] = f"{b.diffusers}.{diff_sub}"
    return table


def diffusers_to_ldm_unet(layout: UNetLayout) -> dict[str, str]:
    """Inverse of `ldm_to_diffusers_unet`: diffusers module prefix -> LDM module prefix."""
    return {v: k for k, v in ldm_to_diffusers_unet(layout).items()}


def unet_key_table(layout: UNetLayout, *, fusers: bool = True) -> tuple[dict[str, str], frozenset[str]]:
    """Full parameter table of the UNet proper (no `position_net`, no ScaleU).

    Returns `(table, optional)`: `table` maps every LDM parameter key to its diffusers key; `optional`
    holds the LDM keys that may be absent (the `skip_connection` keys when `layout.channel_mult` is None).
    `fusers=False` gives the plain SD1.x UNet (no `fuser.*` keys).
    """
    shortcuts = _resnet_shortcuts(layout)
    tr_names = transformer_param_names(layout.transformer_depth, fuser=fusers)
    table: dict[str, str] = {}
    optional: set[str] = set()
    for b in _unet_blocks(layout):
        if b.kind == "plain":
            pairs = [(p, p) for p in _WB]
        elif b.kind == "transformer":
            pairs = [(n, n) for n in tr_names]
        else:  # resnet
            has_skip = shortcuts[b.ldm]
            pairs = []
            for ldm_sub, diff_sub in RESNET_RENAMES.items():
                if ldm_sub == "skip_connection" and has_skip is False:
                    continue
                for p in _WB:
                    pairs.append((f"{ldm_sub}.{p}", f"{diff_sub}.{p}"))
                    if ldm_sub == "skip_connection" and has_skip is None:
                        optional.add(f"{b.ldm}.{ldm_sub}.{p}")
        for ldm_name, diff_name in pairs:
            table[f"{b.ldm}.{ldm_name}"] = f"{b.diffusers}.{diff_name}"
    assert len(set(table.values())) == len(table), "UNet key table is not injective"
    return table, frozenset(optional)


def _is_scaleu_key(key: str, layout: UNetLayout) -> bool:
    m = _SCALEU_KEY.fullmatch(key)
    return m is not None and int(m.group(2)) < layout.n_output_blocks


def _scaleu_keys(layout: UNetLayout) -> list[str]:
    return [f"scaleu_{c}_{k}" for c in "bs" for k in range(layout.n_output_blocks)]


def convert_unet_state_dict(
    sd: Mapping[str, Tensor], layout: UNetLayout, *, instdiff: bool = True
) -> dict[str, Tensor]:
    """Official UNet state dict (unprefixed keys, as in `ckpt["ema"]`) -> our model's state dict.

    * UNet keys -> diffusers `UNet2DConditionModel(attention_type="gated")` keys (`unet_key_table`);
    * `position_net.*` -> verbatim (for our UniFusion installed as `unet.position_net`);
    * `scaleu_{b,s}_{k}` -> `scaleu.scaleu_{b,s}_{k}`.

    Strict: every input key is used exactly once; unknown keys and missing keys (including all ScaleU
    pairs and at least one `position_net.*` key) raise `KeyMapError`. Completeness *inside*
    `position_net` is left to the strict load of the UniFusion module. `instdiff=False` converts a plain
    SD1.x UNet (no fusers, no `position_net`, no ScaleU). Values are not copied (meta tensors work).
    """
    table, optional = unet_key_table(layout, fusers=instdiff)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in table:
            out[table[key]] = value
        elif instdiff and key.startswith(POSITION_NET_PREFIX):
            out[key] = value
        elif instdiff and _is_scaleu_key(key, layout):
            out[SCALEU_PREFIX + key] = value
        else:
            unknown.append(key)
    missing = [k for k in table if k not in sd and k not in optional]
    if instdiff:
        missing += [k for k in _scaleu_keys(layout) if k not in sd]
        if not any(k.startswith(POSITION_NET_PREFIX) for k in sd):
            missing.append(POSITION_NET_PREFIX + "*")
    if unknown or missing:
        raise KeyMapError("official UNet -> diffusers", unknown, missing)
    return out


def convert_unet_state_dict_to_ldm(
    sd: Mapping[str, Tensor], layout: UNetLayout, *, instdiff: bool = True
) -> dict[str, Tensor]:
    """Inverse of `convert_unet_state_dict`: our model's state dict -> official (LDM) names.

    Expects diffusers UNet keys, `position_net.*` (ours, passed through verbatim; drop the stock GLIGEN
    `position_net` first if the dict comes from a bare diffusers UNet) and `scaleu.scaleu_{b,s}_{k}`.
    Strict in the same way as the forward conversion.
    """
    table, optional = unet_key_table(layout, fusers=instdiff)
    inverse = {v: k for k, v in table.items()}
    optional_diff = {table[k] for k in optional}
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in inverse:
            out[inverse[key]] = value
        elif instdiff and key.startswith(POSITION_NET_PREFIX):
            out[key] = value
        elif instdiff and key.startswith(SCALEU_PREFIX) and _is_scaleu_key(key[len(SCALEU_PREFIX) :], layout):
            out[key[len(SCALEU_PREFIX) :]] = value
        else:
            unknown.append(key)
    missing = [k for k in inverse if k not in sd and k not in optional_diff]
    if instdiff:
        missing += [SCALEU_PREFIX + k for k in _scaleu_keys(layout) if SCALEU_PREFIX + k not in sd]
        if not any(k.startswith(POSITION_NET_PREFIX) for k in sd):
            missing.append(POSITION_NET_PREFIX + "*")
    if unknown or missing:
        raise KeyMapError("diffusers -> official UNet", unknown, missing)
    return out


# --------------------------------------------------------------------------------------------------
# VAE: LDM `AutoencoderKL` (ckpt["autoencoder"]) <-> diffusers `AutoencoderKL`
# --------------------------------------------------------------------------------------------------

# Mid-block attention: LDM `AttnBlock` (1x1 convs) -> diffusers `Attention` (Linear layers).
_VAE_ATTN_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_RESNET_RENAMES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",  # 1x1 conv, only when C_in != C_out
}


SD15_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}  # ch 128, ch_mult [1,2,4,4]


def _vae_dims(config) -> tuple[list[int], int]:
    """(block_out_channels, layers_per_block) from None (SD1.5), a mapping, or an object with those
    attributes (e.g. `instdiff_lib.model.config.VAEConfig`, a diffusers `AutoencoderKL.config`)."""
    if config is None:
        config = SD15_VAE
    if isinstance(config, Mapping):
        boc, lpb = config["block_out_channels"], config["layers_per_block"]
    else:
        boc, lpb = config.block_out_channels, config.layers_per_block
    return [int(c) for c in boc], int(lpb)


def vae_key_table(config=None) -> tuple[dict[str, str], frozenset[str]]:
    """Full VAE table: LDM key -> diffusers key, and the set of LDM keys whose 1x1 conv weight
    [C, C, 1, 1] becomes a Linear weight [C, C] (mid-block attention q/k/v/proj_out).

    `config` gives `block_out_channels` (= ch * ch_mult) and `layers_per_block` (= num_res_blocks), as a
    mapping or attributes; None means the SD1.5 VAE. The LDM encoder has `num_res_blocks` ResBlocks per
    level, the decoder `num_res_blocks + 1`; LDM decoder level i is diffusers `decoder.up_blocks[n - 1 - i]`.
    A ResBlock has `nin_shortcut` iff C_in != C_out.
    """
    boc, lpb = _vae_dims(config)
    n = len(boc)
    modules: list[tuple[str, str, str]] = []  # (ldm prefix, diffusers prefix, kind)

    def resnet(ldm: str, diff: str, c_in: int, c_out: int):
        for ldm_sub, diff_sub in _VAE_RESNET_RENAMES.items():
            if ldm_sub != "nin_shortcut" or c_in != c_out:
                modules.append((f"{ldm}.{ldm_sub}", f"{diff}.{diff_sub}", "plain"))

    def mid(side: str):
        c = boc[-1]
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", c, c)
        for ldm_sub, diff_sub in _VAE_ATTN_RENAMES.items():
            kind = "plain" if ldm_sub == "norm" else "conv1x1"
            modules.append((f"{side}.mid.attn_1.{ldm_sub}", f"{side}.mid_block.attentions.0.{diff_sub}", kind))
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", c, c)

    # encoder
    modules.append(("encoder.conv_in", "encoder.conv_in", "plain"))
    for i in range(n):
        for j in range(lpb):
            c_in = boc[i] if j > 0 else boc[max(i - 1, 0)]
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in, boc[i])
        if i != n - 1:
            down = (f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", "plain")
            modules.append(down)
    mid("encoder")
    modules.append(("encoder.norm_out", "encoder.conv_norm_out", "plain"))
    modules.append(("encoder.conv_out", "encoder.conv_out", "plain"))
    # decoder
    modules.append(("decoder.conv_in", "decoder.conv_in", "plain"))
    mid("decoder")
    for i in reversed(range(n)):
        u = n - 1 - i
        for j in range(lpb + 1):
            c_in = boc[i] if j > 0 else boc[min(i + 1, n - 1)]
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", c_in, boc[i])
        if i != 0:
            modules.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv", "plain"))
    modules.append(("decoder.norm_out", "decoder.conv_norm_out", "plain"))
    modules.append(("decoder.conv_out", "decoder.conv_out", "plain"))
    modules += [("quant_conv", "quant_conv", "plain"), ("post_quant_conv", "post_quant_conv", "plain")]

    table: dict[str, str] = {}
    reshape: set[str] = set()
    for ldm, diff, kind in modules:
        for p in _WB:
            table[f"{ldm}.{p}"] = f"{diff}.{p}"
        if kind == "conv1x1":
            reshape.add(f"{ldm}.weight")
    assert len(set(table.values())) == len(table), "VAE key table is not injective"
    return table, frozenset(reshape)


def _conv1x1_to_linear(key: str, w: Tensor) -> Tensor:
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        return w.reshape(w.shape[0], w.shape[1])  # a view: no copy
    if w.ndim == 2:  # already Linear-shaped (some re-saved checkpoints)
        return w
    raise ValueError(f"{key}: expected a 1x1 conv weight [C, C, 1, 1], got {tuple(w.shape)}")


def convert_vae_state_dict(sd: Mapping[str, Tensor], config=None) -> dict[str, Tensor]:
    """LDM `AutoencoderKL` state dict (unprefixed: `encoder.*`, `decoder.*`, `quant_conv.*`,
    `post_quant_conv.*`, as in `ckpt["autoencoder"]`) -> diffusers `AutoencoderKL` state dict.

    `config`: `block_out_channels` + `layers_per_block` (see `vae_key_table`; None = SD1.5).
    The mid-block attention q/k/v/proj_out 1x1-conv weights are reshaped (viewed) to Linear [C, C].
    Strict: unknown and missing keys raise `KeyMapError`.
    """
    table, reshape = vae_key_table(config)
    _check_keys("official VAE -> diffusers", sd.keys(), table.keys())
    return {table[k]: (_conv1x1_to_linear(k, v) if k in reshape else v) for k, v in sd.items()}


def convert_vae_state_dict_to_ldm(sd: Mapping[str, Tensor], config=None) -> dict[str, Tensor]:
    """Inverse of `convert_vae_state_dict` (Linear attention weights [C, C] -> [C, C, 1, 1] views)."""
    table, reshape = vae_key_table(config)
    inverse = {v: k for k, v in table.items()}
    _check_keys("diffusers VAE -> official", sd.keys(), inverse.keys())
    out = {}
    for key, value in sd.items():
        ldm = inverse[key]
        out[ldm] = value.reshape(*value.shape, 1, 1) if ldm in reshape and value.ndim == 2 else value
    return out


# --------------------------------------------------------------------------------------------------
# Text encoder: `FrozenCLIPEmbedder` (ckpt["text_encoder"]) -> transformers `CLIPTextModel`
# --------------------------------------------------------------------------------------------------

_TEXT_PREFIX = "transformer.text_model."  # FrozenCLIPEmbedder.transformer = CLIPTextModel (transformers 4.x)


def convert_text_encoder_state_dict(
    sd: Mapping[str, Tensor], expected_keys: Iterable[str] | None = None, *, target_prefix: str = ""
) -> dict[str, Tensor]:
    """Official `text_encoder` state dict -> transformers `CLIPTextModel` state dict.

    The official keys are `transformer.text_model.*` (a transformers-4 `CLIPTextModel` inside
    `FrozenCLIPEmbedder.transformer`). transformers 5 (pinned 5.24.0) flattened `CLIPTextModel`: its
    state dict has `embeddings.*`, `encoder.*`, `final_layer_norm.*` with no `text_model.` level
    (`from_pretrained` strips that prefix itself, `load_state_dict` does not). So by default
    `transformer.text_model.` is replaced by `target_prefix=""`; pass `target_prefix="text_model."` for
    the transformers-4 layout (or for the text tower inside a `CLIPModel`).

    `*position_ids` buffers are dropped (not persisted by transformers 5). Any other key raises
    `KeyMapError`. If `expected_keys` (e.g. `CLIPTextModel(cfg).state_dict().keys()`) is given, the
    result must have exactly that key set (position_ids excluded on both sides).
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith(_TEXT_PREFIX):
            out[target_prefix + key[len(_TEXT_PREFIX) :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyMapError("official text encoder -> CLIPTextModel", unknown)
    if expected_keys is not None:
        expected = {k for k in expected_keys if not k.endswith("position_ids")}
        _check_keys("official text encoder -> CLIPTextModel", out.keys(), expected)
    return out
