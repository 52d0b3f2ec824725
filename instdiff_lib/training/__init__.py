"""Training from scratch in the Shapes world: the mini InstanceDiffusion (``diffusion``) and its evaluators, the
Shapes YOLO-seg and CLIP (``evaluators``).
May import ``evaluation``, ``sampling``, ``weights``, ``model``, ``datasets``, ``layouts``."""
