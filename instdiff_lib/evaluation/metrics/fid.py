"""FID between generated and real image folders, with torchmetrics' ``FrechetInceptionDistance``.

The official repo has no FID script (shared/spec/instancediffusion_official.md §4.5: reference set, resolution and
image count of the paper's FID are unknown). Our choices, stated so they can be changed:

* every image (generated and real) is converted to RGB and resized to ``size`` x ``size`` with PIL bicubic, since the
  protocol works on 512² frames (the resized COCO GT); a generated 512² image is left untouched;
* features: by default the standard FID Inception-v3 (``torch-fidelity``'s ``inception-v3-compat``, 2048-d pool3,
  the TF-ported weights ``weights-inception-2015-12-05-6726825d.pth``), fed uint8 images; it resizes to 299
  internally (TF-compatible bilinear). Any ``nn.Module`` mapping a uint8 batch ``(B, 3, size, size)`` to ``(B, D)``
  can be passed as ``feature`` instead (tests use a tiny one);
* statistics and the Fréchet distance are torchmetrics' (float64 sums; ``sqrtm`` via eigenvalues of S1 S2).

Pins: torchmetrics==1.9.0, torch-fidelity==0.4.0 (pulls lightning-utilities==0.15.3).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from instdiff_lib.evaluation.metrics import MetricResult
from instdiff_lib.evaluation.metrics.clip_metrics import MetricWeightsError, offline_reason

__all__ = ["INCEPTION_URL", "INCEPTION_FILE", "MetricWeightsError", "fid", "inception_weights_path", "load_images"]

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch-fidelity's URL_INCEPTION_V3
INCEPTION_FILE = os.path.basename(INCEPTION_URL)


def inception_weights_path() -> Path:
    """Where torch.hub (hence torch-fidelity) caches the Inception weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _resolve_weights(weights_path: str | os.PathLike | None) -> str | None:
    """A local file for the default Inception, or None to let torch-fidelity download it; fails fast offline.

    "Offline" is the project's switch ``HF_HUB_OFFLINE`` (set in CI and notebooks, offline_setup.md §8), read at call
    time, or github.com not answering a 2 s TCP probe; either way no download is attempted.
    """
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise MetricWeightsError(f"FID Inception weights not found at {weights_path}; "
                                     f"download {INCEPTION_URL} there.")
        return os.fspath(weights_path)
    cached = inception_weights_path()
    if cached.is_file():
        return str(cached)
    why = offline_reason(INCEPTION_URL)
    if why:
        raise MetricWeightsError(
            f"FID needs the Inception-v3 weights {INCEPTION_FILE} (from {INCEPTION_URL}), which are not cached at "
            f"{cached} and cannot be downloaded ({why}). Download that file on a machine with network access and "
            f"either put it at {cached} (i.e. $TORCH_HOME/hub/checkpoints/) or pass weights_path='<file>'.")
    return None


class _Features(torch.nn.Module):
    """Wraps a feature extractor: flattens to (B, D) and returns float64 so torchmetrics keeps the result in float64."""

    def __init__(self, net: torch.nn.Module, num_features: int | None = None):
        super().__init__()
        self.net = net
        if num_features is not None:
            self.num_features = num_features  # spares torchmetrics its dummy forward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape[0], -1).double()  # (B, D)


def load_images(paths: Sequence[str | os.PathLike], size: int) -> tuple[torch.Tensor, list[tuple]]:
    """uint8 (N, 3, size, size) of the readable images (RGB, PIL bicubic resize) and ``(path, reason)`` of the rest."""
    arrays, skipped = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except (OSError, ValueError, ImportError) as e:  # ImportError: ultralytics' PIL.Image.open patch (pi-heif)
            skipped.append((os.fspath(p), f"{type(e).__name__}: {e}"))
    if not arrays:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), skipped
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), skipped  # (N, 3, S, S)


def fid(generated: Sequence[str | os.PathLike], real: Sequence[str | os.PathLike], *, size: int = 512,
        device: str | torch.device = "cpu", batch_size: int = 32, feature: torch.nn.Module | None = None,
        weights_path: str | os.PathLike | None = None, dims: int = 2048) -> MetricResult:
    """FID between ``generated`` and ``real`` image files (lower is better).

    ``values = {"FID": ...}``; ``n_evaluated`` = min(#generated, #real) scored; ``skipped`` = unreadable files as
    ``(path, reason)``; ``details`` has both counts, the size and the feature extractor.
    ``feature=None`` uses the standard Inception (weights from ``weights_path``, else torch.hub's cache, else a download
    when online; offline and uncached -> :class:`MetricWeightsError` at once, naming the file and where to put it).
    ``dims``: which Inception features (2048 = pool3, the standard FID; 64/192/768 = earlier blocks, like
    pytorch-fid's ``--dims``); ignored with a custom ``feature``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if feature is None:
        if dims not in (64, 192, 768, 2048):
            raise ValueError(f"dims must be one of 64, 192, 768, 2048 (Inception feature blocks), got {dims}")
        local = _resolve_weights(weights_path)
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(dims)],
                                 feature_extractor_weights_path=local)
        extractor = _Features(net, num_features=dims)
        feature_name = f"inception-v3-compat {dims}-d ({'pool3' if dims == 2048 else 'early block'}), {INCEPTION_FILE}"
    else:
        extractor, feature_name = _Features(feature), type(feature).__name__
    metric = FrechetInceptionDistance(feature=extractor.eval(), input_img_size=(3, size, size), normalize=False)
    metric = metric.to(device)

    skipped: list[tuple] = []
    counts = {}
    for name, paths, is_real in (("generated", list(generated), False), ("real", list(real), True)):
        n = 0
        with torch.no_grad():
            for i in range(0, len(paths), batch_size):
                batch, bad = load_images(paths[i:i + batch_size], size)
                skipped.extend(bad)
                if len(batch):
                    metric.update(batch.to(device), real=is_real)
                    n += len(batch)
        counts[name] = n
    if min(counts.values()) < 2:
        raise ValueError(f"FID needs at least 2 readable images per set, got {counts} ({len(skipped)} unreadable)")
    value = float(metric.compute())
    details = {"n_generated": counts["generated"], "n_real": counts["real"], "size": size, "resize": "PIL bicubic",
               "feature": feature_name, "library": "torchmetrics FrechetInceptionDistance"}
    return MetricResult(values={"FID": value}, n_evaluated=min(counts.values()), n_skipped=len(skipped),
                        skipped=skipped, details=details)
