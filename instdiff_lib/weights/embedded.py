"""Where the committed mini-scale weights live, and the embedded default model (the Shapes mini model).

``models/shapes-mini``, ``models/shapes-yolo`` and ``models/shapes-clip`` under the project root, or under
``$INSTDIFF_MODELS_DIR``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from instdiff_lib.results import project_root


def models_dir() -> Path:
    """The committed mini-scale weights (``models/shapes-mini``, ``models/shapes-yolo``, ``models/shapes-clip``)."""
    return Path(os.environ.get("INSTDIFF_MODELS_DIR", project_root() / "models"))


def default_model() -> str:
    """The embedded default model: the committed, CPU-trained Shapes mini model (``models/shapes-mini``)."""
    return str(models_dir() / "shapes-mini")


def recommended_negative_prompt(model: str) -> str | None:
    """"" for the Shapes mini model (trained with the empty prompt as its unconditional caption), else None (the
    caller's default: SD1.5's negative prompt)."""
    cfg = Path(model) / "model_config.json"
    if cfg.exists():
        if json.loads(cfg.read_text()).get("name") == "shapes-mini":
            return ""
    return None
