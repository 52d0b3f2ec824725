"""A parameter-free "autoencoder" for CPU-scale models: space-to-depth.

``encode`` folds each f x f pixel block into channels (``pixel_unshuffle``); ``decode`` unfolds it. It is exact
and invertible, so a small UNet can denoise a 64x64 RGB image as a 32x32x12 tensor without training a VAE.
It mirrors the two things the pipeline uses of diffusers' ``AutoencoderKL``: ``config.scaling_factor`` and
``decode(z).sample``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class _Decoded:
    sample: torch.Tensor


class SpaceToDepthAE(nn.Module):
    def __init__(self, factor: int = 2, scaling_factor: float = 1.0):
        super().__init__()
        self.factor = factor
        self.config = SimpleNamespace(scaling_factor=scaling_factor, latent_channels=3 * factor * factor)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1], [B, 3, H, W] -> scaled latents [B, 3 f^2, H/f, W/f]."""
        return F.pixel_unshuffle(images, self.factor) * self.config.scaling_factor

    def decode(self, z: torch.Tensor) -> _Decoded:
        return _Decoded(F.pixel_shuffle(z, self.factor))
