"""Decoder skip-connection re-weighting: ScaleU (InstanceDiffusion), FreeU (for ablations), or none.

Both act where the UNet decoder concatenates its backbone feature ``h`` with the popped encoder skip
``s``: in diffusers that is the input ``cat([h, s], 1)`` of ``up_blocks[k // (L+1)].resnets[k % (L+1)]``,
so a forward-pre-hook there sees exactly the official pair (``h`` first, ``s`` second).

ScaleU (official, always on, conditional and unconditional pass alike), for decoder block k::

    h <- h * (tanh(scaleu_b_k) + 1)                       # per channel of h
    s <- FourierFilter(s, threshold=1, scale=tanh(scaleu_s_k) + 1)   # scaleu_s_k is ONE scalar

With all parameters zero both factors are 1 and ScaleU is the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def fourier_filter(x: torch.Tensor, threshold: int, scale: torch.Tensor | float) -> torch.Tensor:
    """Scale the low frequencies of ``x`` (NCHW): after fftshift, the block
    ``[H/2 - t : H/2 + t, W/2 - t : W/2 + t]`` (DC included) is multiplied by ``scale``.

    Computed in float32 and cast back, like the official code.
    """
    dtype = x.dtype
    H, W = x.shape[-2:]
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(H, W, device=x.device, dtype=torch.float32)
    ch, cw = H // 2, W // 2
    if isinstance(scale, torch.Tensor):
        scale = scale.float().reshape(())
        inside = torch.zeros(H, W, device=x.device, dtype=torch.bool)
        inside[ch - threshold:ch + threshold, cw - threshold:cw + threshold] = True
        mask = torch.where(inside, scale, mask)
    else:
        mask[ch - threshold:ch + threshold, cw - threshold:cw + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(dtype)


class ScaleU(nn.Module):
    """Holds ``scaleu_b_k`` (one factor per channel of h) and ``scaleu_s_k`` (shape [1]) for every decoder block."""

    def __init__(self, h_channels: list[int]):
        super().__init__()
        self.h_channels = list(h_channels)
        for k, c in enumerate(self.h_channels):
            self.register_parameter(f"scaleu_b_{k}", nn.Parameter(torch.zeros(c)))
            self.register_parameter(f"scaleu_s_{k}", nn.Parameter(torch.zeros(1)))

    def __len__(self) -> int:
        return len(self.h_channels)

    def apply(self, k: int, h: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = getattr(self, f"scaleu_b_{k}")
        sc = getattr(self, f"scaleu_s_{k}")
        h = h * (torch.tanh(b) + 1).to(h.dtype)[None, :, None, None]
        s = fourier_filter(s, threshold=1, scale=torch.tanh(sc) + 1)
        return h, s


class FreeU:
    """FreeU (Si et al., 2024) v1 rule with the official InstanceDiffusion constants (off by default there).

    Where h has the deepest decoder width C (1280 at SD1.5 size): the first C/2 channels of h are
    multiplied by b1 and the skip is Fourier-filtered with s1; where h has C/2 channels: b2 and s2.
    Other blocks are untouched.
    """

    def __init__(self, h_channels: list[int], b1: float = 1.2, b2: float = 1.4, s1: float = 0.9, s2: float = 0.2):
        self.h_channels = list(h_channels)
        self.top = max(self.h_channels)
        self.b1, self.b2, self.s1, self.s2 = b1, b2, s1, s2

    def apply(self, k: int, h: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = h.shape[1]
        if c == self.top:
            b, sc = self.b1, self.s1
        elif 2 * c == self.top:
            b, sc = self.b2, self.s2
        else:
            return h, s
        h = torch.cat([h[:, : c // 2] * b, h[:, c // 2:]], dim=1)
        return h, fourier_filter(s, threshold=1, scale=sc)


def decoder_resnets(unet: nn.Module) -> list[nn.Module]:
    """The decoder ResBlocks in official output-block order k = 0, 1, ..."""
    return [r for block in unet.up_blocks for r in block.resnets]


def attach_skip_hooks(unet: nn.Module, rule, h_channels: list[int]) -> list:
    """Register one forward-pre-hook per decoder ResBlock that applies ``rule.apply(k, h, s)``.

    Returns the hook handles (``handle.remove()`` detaches). The hook asserts the channel split.
    """
    handles = []
    for k, resnet in enumerate(decoder_resnets(unet)):
        c_h = h_channels[k]

        def hook(module, args, kwargs, k=k, c_h=c_h):
            x = args[0]
            if x.shape[1] <= c_h:
                raise RuntimeError(f"decoder block {k}: input has {x.shape[1]} channels, expected h ({c_h}) + skip")
            h, s = rule.apply(k, x[:, :c_h], x[:, c_h:])
            return (torch.cat([h, s], dim=1), *args[1:]), kwargs

        handles.append(resnet.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def decoder_h_channels(block_out_channels: tuple[int, ...], layers_per_block: int) -> list[int]:
    """Channels of h entering each decoder ResBlock (official ``scaleu_b_k`` sizes).

    Decoder level j (deepest first) has ``layers_per_block + 1`` ResBlocks. The first one receives the
    previous level's output (or the middle block's for j = 0); the others receive this level's width.
    """
    rev = list(reversed(block_out_channels))
    sizes = []
    for j, out_c in enumerate(rev):
        prev = rev[max(j - 1, 0)]
        sizes += [prev] + [out_c] * layers_per_block
    return sizes
