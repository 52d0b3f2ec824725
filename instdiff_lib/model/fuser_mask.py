"""Instance-masked fuser attention: the paper's masked attention, used by models trained from scratch.

The released InstanceDiffusion code has this mechanism behind ``--use_masked_att`` and never runs it (spec §1.2),
so the official and SD1.5 configs keep ``fuser_attention="full"``. A model trained from scratch cannot do without
it: its visual tokens carry no position, so nothing tells a fuser which instance's tokens concern a given cell.
The mask supplies that link (``../shared/spec/mini_scale_grounding.md``).

What a visual token (a cell of a fuser's grid) may attend to, with ``fuser_attention="instance_masked"``:

* every visual token (the official rule blocks visual <-> visual attention between different instances' boxes;
  we keep visual self-attention whole, the variant the grounding probe measured);
* the box, point, scribble and polygon tokens of instance ``i`` only if the cell lies in instance ``i``'s
  *region*; tokens of padded slots never;
* the 64 seg tokens always (a raster of all masks, as in the official rule).

An instance's region comes only from the modalities that are fed (the drop flags, after the official "never drop
everything, keep the boxes" rule), most precise first: its mask when masks are fed and the slot has one; else its
box when boxes are fed; else the bounding box of its scribble when scribbles are fed and it has one; else a square
of half-width ``point_region`` around its point when points are fed; else the whole image. A point-only layout
therefore never leaks a box into the mask. The official box rasteriser indexes ``[x1:x2, y1:y2]`` on a
``[row, col]`` grid (a transposition); here x is the column everywhere.

Regions are rasterised once per run and branch at the latent grid (:func:`instance_regions`, cells overlapping the
box, the scribble's bounding box, the point's square, or any pixel of the mask) and max-pooled to each fuser's grid:
a coarse cell belongs to a region when any latent cell under it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention import GatedSelfAttentionDense

from instdiff_lib.model.config import DropFlags
N_LOCATION_GROUPS = 4  # box, point, scribble, polygon tokens: one per slot each, then the seg tokens


def effective_drops(drop: DropFlags) -> tuple[bool, bool, bool, bool]:
    """(boxes, points, scribbles, masks) dropped, after the official rule that boxes stay if all are dropped."""
    drop_box, drop_point, drop_scribble, drop_mask = drop.as_tuple()
    if drop_box and drop_point and drop_scribble and drop_mask:
        drop_box = False
    return drop_box, drop_point, drop_scribble, drop_mask


def _rect_cells(x0: torch.Tensor, y0: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[..., H, W] bool: the cells of an H x W grid that overlap the normalised rectangle (at least one cell)."""

    def span(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
        lo = (a.clamp(0, 1) * n).floor().clamp(0, n - 1)
        hi = torch.maximum((b.clamp(0, 1) * n).ceil() - 1, lo).clamp(0, n - 1)
        idx = torch.arange(n, device=a.device, dtype=a.dtype)
        return (idx >= lo[..., None]) & (idx <= hi[..., None])  # [..., n]

    return span(y0, y1, H)[..., :, None] & span(x0, x1, W)[..., None, :]


def instance_regions(grounding: dict[str, torch.Tensor], drop: DropFlags, size: tuple[int, int],
                     point_region: float) -> torch.Tensor:
    """[B, N, H, W] bool: for each instance slot, the latent cells from which its location tokens are visible.

    ``grounding`` holds the UniFusion arrays (``boxes`` [B, N, 4] as (x0, y0, x1, y1), ``masks`` [B, N] presence,
    ``scribbles`` [B, N, 2P], ``segs`` [B, N, S, S], ``points`` [B, N, 2]; normalised, x = column). Padded slots
    (``masks == 0``) get an empty region."""
    H, W = int(size[0]), int(size[1])
    present = grounding["masks"] > 0
    B, N = present.shape
    device = present.device
    drop_box, drop_point, drop_scribble, drop_mask = effective_drops(drop)
    region = torch.zeros(B, N, H, W, dtype=torch.bool, device=device)
    decided = ~present  # padded slots stay empty

    def take(candidate: torch.Tensor, valid: torch.Tensor) -> None:
        nonlocal region, decided
        use = valid & ~decided
        region = torch.where(use[..., None, None], candidate, region)
        decided = decided | use

    if not drop_mask:
        segs = grounding["segs"].float()
        if segs.shape[-1] > 1:
            cells = F.adaptive_max_pool2d(segs.flatten(0, 1)[:, None], (H, W))[:, 0].view(B, N, H, W) > 0
            take(cells, cells.flatten(2).any(-1))
    if not drop_box:
        b = grounding["boxes"].float()
        take(_rect_cells(b[..., 0], b[..., 1], b[..., 2], b[..., 3], H, W), torch.ones_like(present))
    if not drop_scribble:
        s = grounding["scribbles"].float().view(B, N, -1, 2)
        lo, hi = s.min(dim=2).values, s.max(dim=2).values
        take(_rect_cells(lo[..., 0], lo[..., 1], hi[..., 0], hi[..., 1], H, W), s.flatten(2).sum(-1) > 0)
    if not drop_point:
        p = grounding["points"].float()
        r = float(point_region)
        take(_rect_cells(p[..., 0] - r, p[..., 1] - r, p[..., 0] + r, p[..., 1] + r, H, W), torch.ones_like(present))
    take(torch.ones(B, N, H, W, dtype=torch.bool, device=device), torch.ones_like(present))  # nothing fed: anywhere
    return region


@dataclass
class MaskedTokens:
    """What the instance-masked fusers receive instead of bare object tokens: the tokens [B, T, D] and the slots'
    regions [B, N, H, W] at the latent grid. Key masks are built once per grid size and UNet call."""

    tokens: torch.Tensor
    regions: torch.Tensor
    n_seg_tokens: int
    _masks: dict = field(default_factory=dict, repr=False)

    def key_mask(self, n_visual: int) -> torch.Tensor:
        """[B, n_visual, n_visual + T] bool (True = may attend) for a fuser grid of ``n_visual`` cells."""
        mask = self._masks.get(n_visual)
        if mask is None:
            B, N, H, W = self.regions.shape
            scale = (H * W / n_visual) ** 0.5
            h, w = round(H / scale), round(W / scale)
            if h * w != n_visual:
                raise ValueError(f"fuser grid of {n_visual} cells does not match the {H}x{W} region grid")
            cells = F.adaptive_max_pool2d(self.regions.float(), (h, w)) > 0  # [B, N, h, w]
            slot = cells.flatten(2).transpose(1, 2)  # [B, hw, N]
            n_other = self.tokens.shape[1] - N_LOCATION_GROUPS * N
            if n_other != self.n_seg_tokens:
                raise ValueError(f"{self.tokens.shape[1]} object tokens do not fit {N} slots + {self.n_seg_tokens} seg")
            ones = torch.ones(B, n_visual, n_visual, dtype=torch.bool, device=cells.device)
            seg = torch.ones(B, n_visual, n_other, dtype=torch.bool, device=cells.device)
            mask = self._masks[n_visual] = torch.cat([ones] + [slot] * N_LOCATION_GROUPS + [seg], dim=2)
        return mask


class InstanceMaskedFuser(GatedSelfAttentionDense):
    """diffusers' gated self-attention (same parameters and names) with the instance mask on its attention.

    Only the visual rows of the attention are computed: the official fuser drops the object-token rows of its
    output anyway (``[:, :n_visual]``)."""

    def forward(self, x: torch.Tensor, objs: MaskedTokens) -> torch.Tensor:  # type: ignore[override]
        if not self.enabled:
            return x
        if not isinstance(objs, MaskedTokens):
            raise TypeError("instance-masked fusers need MaskedTokens (tokens and regions), not bare tokens")
        B, n_visual, _ = x.shape
        h = self.norm1(torch.cat([x, self.linear(objs.tokens)], dim=1))
        a = self.attn
        heads = a.heads
        q, k, v = a.to_q(h[:, :n_visual]), a.to_k(h), a.to_v(h)
        q, k, v = (z.view(B, -1, heads, z.shape[-1] // heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=objs.key_mask(n_visual)[:, None], scale=a.scale)
        out = a.to_out[1](a.to_out[0](out.transpose(1, 2).reshape(B, n_visual, -1)))
        x = x + self.alpha_attn.tanh() * out
        return x + self.alpha_dense.tanh() * self.ff(self.norm2(x))
