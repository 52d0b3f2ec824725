"""UniFusion: the InstanceDiffusion instance tokenizer (official ``position_net``).

Turns up to ``n_slots`` (30) instances, each given by a text embedding and any of box / point /
scribble / mask-points / raster mask, into ``4 * n_slots + n_seg_tokens`` object tokens (184 at full
size) laid out as::

    [ 30 box | 30 point | 30 scribble | 30 polygon (mask points) | 64 seg ]

Conventions: coordinates are normalised to [0, 1], origin top-left, x = column, y = row. Boxes are
``(x0, y0, x1, y1)``. ``masks[b, i] = 1`` marks a real instance in slot ``i``.

Parameter names follow the official module so its state dict loads strictly (``linears_list.{0..4}``,
``null_*_feature``, ``pos_embedding``, ``in_conv``, ``convnext_tiny_backbone.*``). No weights are
downloaded: the ConvNeXt is built here from its depths/dims and filled by the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from instdiff_lib.model.config import DropFlags, UniFusionConfig

GROUNDING_KEYS = ("boxes", "masks", "positive_embeddings", "scribbles", "polygons", "segs", "points")


class FourierEmbedder(nn.Module):
    """sin/cos features at ``freq_k = T^(k/K)``; layout: for each k, [sin(f_k v) | cos(f_k v)] over the D values.

    Output width is ``2 * K * D`` (box 128, point 64, scribble 1280, polygon 16384 at K = 16).
    """

    def __init__(self, num_freqs: int = 16, temperature: float = 100.0):
        super().__init__()
        self.num_freqs, self.temperature = num_freqs, temperature  # no buffer: nothing to load or move

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        freqs = self.temperature ** (torch.arange(self.num_freqs, device=v.device) / self.num_freqs)
        arg = freqs.to(v.dtype)[:, None] * v[..., None, :]  # [..., K, D]
        return torch.stack([arg.sin(), arg.cos()], dim=-2).flatten(-3)  # [..., K, 2, D] -> [..., 2KD]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (ConvNeXt "channels_first")."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))  # layer scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt feature extractor (no head, no final norm): stride 4, then three stride-2 stages."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], in_chans: int = 3):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        downs = [nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
                 for i in range(1, len(dims))]
        self.downsample_layers = nn.ModuleList([stem, *downs])
        self.stages = nn.ModuleList(nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)]) for n, d in zip(depths, dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x


def _mlp(in_dim: int, mid_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, mid_dim), nn.SiLU(), nn.Linear(mid_dim, mid_dim), nn.SiLU(),
                         nn.Linear(mid_dim, out_dim))


class UniFusion(nn.Module):
    """Instance tokenizer. ``forward(**grounding)`` returns object tokens ``[B, n_tokens, out_dim]``.

    ``forward(objs=...)`` returns precomputed tokens unchanged: the sampler tokenizes each branch once
    per run and hands the tokens to the UNet at every step (they depend on neither x nor t).
    """

    def __init__(self, cfg: UniFusionConfig, drop: DropFlags | None = None):
        super().__init__()
        self.cfg = cfg
        self.drop = drop or DropFlags()
        k = 2 * cfg.fourier_freqs
        self.fourier = FourierEmbedder(cfg.fourier_freqs, cfg.fourier_temperature)
        self.dims = {"box": 4 * k, "point": 2 * k, "scribble": 2 * cfg.n_scribble_points * k,
                     "polygon": 2 * cfg.n_polygon_points * k}
        seg_dim = cfg.seg_feature_dim
        self.linears_list = nn.ModuleList(
            [_mlp(cfg.in_dim + self.dims[m], cfg.mid_dim, cfg.out_dim) for m in ("box", "point", "scribble", "polygon")]
            + [_mlp(seg_dim, cfg.mid_dim, cfg.out_dim)])
        self.null_positive_feature = nn.Parameter(torch.zeros(cfg.in_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(self.dims["box"]))
        self.null_point_feature = nn.Parameter(torch.zeros(self.dims["point"]))
        self.null_scribble_feature = nn.Parameter(torch.zeros(self.dims["scribble"]))
        self.null_polygon_feature = nn.Parameter(torch.zeros(self.dims["polygon"]))
        self.null_seg_feature = nn.Parameter(torch.zeros(seg_dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.n_seg_tokens, seg_dim) * 0.02)
        self.in_conv = nn.Conv2d(cfg.n_slots, 3, kernel_size=3, padding=1)
        self.convnext_tiny_backbone = ConvNeXt(cfg.convnext_depths, cfg.convnext_dims)

    # ------------------------------------------------------------------------------------------
    def forward(self, boxes=None, masks=None, positive_embeddings=None, scribbles=None, polygons=None,
                segs=None, points=None, objs: torch.Tensor | None = None, drop: DropFlags | None = None):
        if objs is not None:
            return objs
        return self.tokenize(boxes, masks, positive_embeddings, scribbles, polygons, segs, points, drop=drop)

    def tokenize(self, boxes, masks, positive_embeddings, scribbles, polygons, segs, points,
                 drop: DropFlags | None = None) -> torch.Tensor:
        drop = drop or self.drop
        drop_box, drop_point, drop_scribble, drop_mask = drop.as_tuple()
        if drop_box and drop_point and drop_scribble and drop_mask:
            drop_box = False  # official rule: never drop everything, keep the boxes
        dtype = self.null_positive_feature.dtype
        boxes, masks, text, scribbles, polygons, points = (
            t.to(dtype) for t in (boxes, masks, positive_embeddings, scribbles, polygons, points))
        m = masks.unsqueeze(-1)  # [B, N, 1]
        text = text * m + (1 - m) * self.null_positive_feature

        def location_tokens(idx: int, coords: torch.Tensor, null: torch.Tensor, keep: torch.Tensor | None):
            emb = self.fourier(coords)
            if keep is None:  # modality dropped: every slot uses the null feature
                emb = null.expand_as(emb)
            else:
                emb = emb * keep + (1 - keep) * null
            return self.linears_list[idx](torch.cat([text, emb], dim=-1))

        # Scribble / polygon presence is "coordinates or mask" (official): sum(coords) + mask > 0.
        scribble_keep = ((scribbles.sum(-1, keepdim=True) + m) > 0).to(dtype)
        polygon_keep = ((polygons.sum(-1, keepdim=True) + m) > 0).to(dtype)
        tokens = [
            location_tokens(0, boxes, self.null_position_feature, None if drop_box else m),
            location_tokens(1, points, self.null_point_feature, None if drop_point else m),
            location_tokens(2, scribbles, self.null_scribble_feature, None if drop_scribble else scribble_keep),
            location_tokens(3, polygons, self.null_polygon_feature, None if drop_mask else polygon_keep),
            self.seg_tokens(segs, drop_mask),
        ]
        return torch.cat(tokens, dim=1)

    def seg_tokens(self, segs: torch.Tensor, dropped: bool) -> torch.Tensor:
        """64 tokens from the raster masks. Presence is decided per *sample* (any pixel in any slot)."""
        B = segs.shape[0]
        dtype = self.null_seg_feature.dtype
        present = torch.zeros(B, 1, 1, dtype=dtype, device=segs.device)
        if not dropped:
            present = (segs.flatten(1) != 0).any(dim=1).to(dtype).view(B, 1, 1)
        if present.any():
            feat = self.seg_features(segs.to(dtype))
        else:  # skipping the backbone is exact: its output would be multiplied by 0
            feat = torch.zeros(B, self.cfg.n_seg_tokens, self.cfg.seg_feature_dim, dtype=dtype, device=segs.device)
        feat = feat * present + (1 - present) * self.null_seg_feature + self.pos_embedding
        return self.linears_list[4](feat)

    def seg_features(self, segs: torch.Tensor) -> torch.Tensor:
        size = self.cfg.seg_input_size
        if segs.shape[-2:] != (size, size):
            segs = F.interpolate(segs, size=(size, size), mode="nearest")
        feat = self.convnext_tiny_backbone(self.in_conv(segs))  # [B, C, s, s]
        # A raw memory reshape (not a patchify): token j, feature f, as in the official module.
        return feat.reshape(feat.shape[0], -1, self.cfg.n_seg_tokens).permute(0, 2, 1)

    # ------------------------------------------------------------------------------------------
    def null_grounding(self, batch: int, device=None, seg_size: int | None = None) -> dict[str, torch.Tensor]:
        """The all-zero grounding of the unconditional branch (every field zero, not just masks)."""
        cfg = self.cfg
        s = seg_size or cfg.seg_input_size
        z = lambda *shape: torch.zeros(batch, *shape, device=device)  # noqa: E731
        return {"boxes": z(cfg.n_slots, 4), "masks": z(cfg.n_slots), "positive_embeddings": z(cfg.n_slots, cfg.in_dim),
                "scribbles": z(cfg.n_slots, 2 * cfg.n_scribble_points),
                "polygons": z(cfg.n_slots, 2 * cfg.n_polygon_points), "segs": z(cfg.n_slots, s, s),
                "points": z(cfg.n_slots, 2)}
