"""Evaluation: protocol generation (sharded, resumable manifests), scoring with the paper's metrics (``metrics``:
detection AP, mask IoU, PiM, CLIP attribute binding, FID, guards), experiments and the two evaluation worlds.
May import ``datasets``, ``sampling``, ``weights``, ``model``; ``metrics`` itself never imports the model."""
