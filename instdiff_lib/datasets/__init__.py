"""The data of the two evaluation worlds: COCO val2017 (download, 512 frames, protocol items) and the procedural
Shapes world in COCO format.
May import ``layouts`` and the top-level ``fileio``."""
