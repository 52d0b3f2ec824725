"""Weights: the official checkpoint's LDM->diffusers key maps, strict loading with coverage, converted folders with
sha256 manifests, the full-size key manifest, the download, and the embedded default (committed) models.
May import ``model`` and the top-level ``results``."""
