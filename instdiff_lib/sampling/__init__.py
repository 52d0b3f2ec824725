"""Sampling: PLMS/DDIM with classifier-free guidance on null grounding, the alpha schedule and the Multi-Instance
Sampler; the pipeline (layout -> images) and the one-layout-file generator behind ``instdiff generate``.
May import ``model``, ``weights``, ``layouts`` and the top-level ``fileio``/``viz``."""

from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

__all__ = ["InstanceDiffusionPipeline"]
