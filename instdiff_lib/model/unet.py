"""The InstanceDiffusion UNet on pinned diffusers: SD1.5 ``UNet2DConditionModel(attention_type="gated")``
+ our UniFusion ``position_net`` + ScaleU on every decoder skip concatenation.

* The gated fuser (``GatedSelfAttentionDense``) that diffusers places after self-attention in every
  transformer block *is* the official fuser at inference (same parameter names, same formula with
  scale 1). The official per-step ``scale`` is only ever 0 or 1; 0 is ``fuser.enabled = False``.
* ``position_net`` replaces diffusers' GLIGEN projection (before any strict load).
* ScaleU parameters live under ``scaleu.`` in the UNet's state dict.
* ``fuser_attention="instance_masked"`` (models trained from scratch) turns every fuser into an
  :class:`~instdiff_lib.model.fuser_mask.InstanceMaskedFuser` (same parameters); the UNet then needs the
  instances' regions (:meth:`InstanceUNet.regions`) beside the object tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel
from diffusers.models.attention import GatedSelfAttentionDense

from instdiff_lib.model.config import DropFlags, ModelConfig, UNetConfig
from instdiff_lib.model.fuser_mask import InstanceMaskedFuser, MaskedTokens, instance_regions
from instdiff_lib.model.skips import FreeU, ScaleU, attach_skip_hooks, decoder_h_channels
from instdiff_lib.model.unifusion import UniFusion


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    """Translate the official (LDM) UNet config into ``UNet2DConditionModel`` arguments.

    Trap: diffusers' ``attention_head_dim`` holds the *number of heads* for this model family.
    """
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attn_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attn_levels))
    if cfg.coord_channels not in (0, 2):
        raise ValueError(f"coord_channels must be 0 or 2 (x and y planes), got {cfg.coord_channels}")
    return dict(sample_size=cfg.sample_size, in_channels=cfg.in_channels + cfg.coord_channels,
                out_channels=cfg.out_channels,
                down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
                block_out_channels=cfg.block_out_channels, layers_per_block=cfg.num_res_blocks,
                attention_head_dim=cfg.num_heads, cross_attention_dim=cfg.context_dim, norm_num_groups=32,
                norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu",
                use_linear_projection=False, transformer_layers_per_block=1, attention_type="gated")


def coordinate_planes(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W]: pixel-centre x (column) and y (row) of ``x``'s grid, each in [-1, 1], same dtype/device."""
    B, _, H, W = x.shape
    ys = (torch.arange(H, device=x.device, dtype=torch.float32) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, device=x.device, dtype=torch.float32) + 0.5) / W * 2 - 1
    planes = torch.stack([xs[None, :].expand(H, W), ys[:, None].expand(H, W)])
    return planes.to(x.dtype).unsqueeze(0).expand(B, -1, -1, -1)


class InstanceUNet(nn.Module):
    """eps-prediction UNet with instance conditioning.

    ``forward(x, t, context, objs, gate, regions)``: ``objs`` are object tokens from :meth:`tokenize` (or None
    for a call without grounding, i.e. fusers skipped); ``gate`` is the official fuser scale (0 or 1);
    ``regions`` come from :meth:`regions` (instance-masked fusers only, else None).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(cfg.unet))
        unet.position_net = UniFusion(cfg.unifusion, cfg.drop)
        self.h_channels = decoder_h_channels(cfg.unet.block_out_channels, cfg.unet.num_res_blocks)
        unet.scaleu = ScaleU(self.h_channels)
        self.unet = unet
        self.fusers = [m for m in unet.modules() if isinstance(m, GatedSelfAttentionDense)]
        expected = cfg.unet.n_transformer_blocks
        if len(self.fusers) != expected:
            raise RuntimeError(f"expected {expected} gated fusers (one per transformer block), found {len(self.fusers)}")
        self.masked = cfg.fuser_attention == "instance_masked"
        if self.masked:
            for f in self.fusers:
                f.__class__ = InstanceMaskedFuser  # same parameters and names, masked attention
        self._hooks: list = []
        self.set_skip_mode(cfg.skip_mode)
        self._coords: torch.Tensor | None = None  # coord_channels: [1, 2, H, W], built on first use per grid/device/dtype

    # ---- switches ------------------------------------------------------------------------------
    @property
    def position_net(self) -> UniFusion:
        return self.unet.position_net

    @property
    def scaleu(self) -> ScaleU:
        return self.unet.scaleu

    def set_skip_mode(self, mode: str) -> None:
        """"scaleu" (official), "freeu" or "none"; hooks are re-attached, parameters are kept."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if mode == "scaleu":
            self._hooks = attach_skip_hooks(self.unet, self.scaleu, self.h_channels)
        elif mode == "freeu":
            self._hooks = attach_skip_hooks(self.unet, FreeU(self.h_channels), self.h_channels)
        elif mode != "none":
            raise ValueError(f"unknown skip mode {mode!r}")
        self.skip_mode = mode

    def set_gate(self, gate: float) -> None:
        """Official fuser scale: 1 = grounding on, 0 = off. Fractional scales are not used officially."""
        if gate not in (0, 1):
            raise ValueError(f"fuser gate must be 0 or 1 (official alpha schedule), got {gate}")
        on = bool(gate) and self.cfg.fusers
        for f in self.fusers:
            f.enabled = on

    # ---- compute -------------------------------------------------------------------------------
    def tokenize(self, grounding: dict[str, torch.Tensor], drop: DropFlags | None = None) -> torch.Tensor:
        return self.position_net.tokenize(*(grounding[k] for k in ("boxes", "masks", "positive_embeddings",
                                                                    "scribbles", "polygons", "segs", "points")),
                                          drop=drop)

    def regions(self, grounding: dict[str, torch.Tensor], drop: DropFlags | None, size: tuple[int, int],
                ) -> torch.Tensor | None:
        """The instances' regions [B, N, H, W] at the latent grid ``size`` for instance-masked fusers (None for full
        attention). Like the tokens, they depend on neither x nor t: compute them once per run and branch."""
        if not self.masked:
            return None
        return instance_regions(grounding, drop or self.position_net.drop, size, self.cfg.point_region)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, objs: torch.Tensor | None,
                gate: float = 1, regions: torch.Tensor | None = None) -> torch.Tensor:
        self.set_gate(gate if objs is not None else 0)
        kwargs = None
        if objs is not None:
            if self.masked:
                if regions is None:
                    raise ValueError("instance-masked fusers need the instances' regions (InstanceUNet.regions)")
                objs = MaskedTokens(objs, regions, self.cfg.unifusion.n_seg_tokens)
            kwargs = {"gligen": {"objs": objs}}
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.cfg.unet.coord_channels:
            c = self._coords
            if c is None or c.shape[-2:] != x.shape[-2:] or c.device != x.device or c.dtype != x.dtype:
                c = self._coords = coordinate_planes(x[:1])  # not a buffer: modules are built on meta when loading
            x = torch.cat([x, c.expand(x.shape[0], -1, -1, -1)], dim=1)
        return self.unet(x, t, encoder_hidden_states=context, cross_attention_kwargs=kwargs).sample

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
