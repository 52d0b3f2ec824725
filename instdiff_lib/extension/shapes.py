"""The extension in the Shapes world: a template planner (no language model) and the Shapes detector behind the
placement API, so that planning, generation and the placement check run end to end on the mini model."""

from __future__ import annotations

import numpy as np

from instdiff_lib.datasets.shapes import COLORS, SHAPES, TEXTURES
from instdiff_lib.evaluation.shapes_evaluators import YOLO_IMGSZ

SHAPES_PLANNER_LABEL = "offline-shapes-template"


class ShapesPlanner:
    """A deterministic planner for the Shapes world (no language model): the shapes named in the prompt, each
    with the colour / texture words just before it ("a red striped circle and a blue square"), the rest drawn by
    the seed, topped up to ``n_instances``; boxes are squares of 14-30 px placed by the seed on the canvas. Its
    layouts say ``offline-shapes-template`` wherever they go (``PlannedLayout.planner_label``)."""

    label = SHAPES_PLANNER_LABEL

    def __init__(self, *, size: int = 64, n_instances: tuple[int, int] = (2, 4), seed: int = 0):
        self.size, self.n_range, self.seed = int(size), tuple(n_instances), int(seed)

    def settings(self) -> dict:
        return {"planner": self.label, "canvas": [self.size, self.size], "n_instances": list(self.n_range),
                "seed": self.seed, "note": "template layouts of the Shapes world; not produced by a language model"}

    def plan(self, prompt: str | None = None, *, seed: int | None = None, scene_type: str | None = None):
        import zlib

        from instdiff_lib.layouts.layout import Instance, Layout
        from instdiff_lib.extension.planner import PlannedLayout, PlanReport
        from instdiff_lib.datasets.shapes import TEXTURE_ADJECTIVE, global_caption

        seed = self.seed if seed is None else int(seed)
        rng = np.random.default_rng([seed, zlib.crc32((prompt or "").encode())])
        adjective_of = {adj: tex for tex, adj in TEXTURE_ADJECTIVE.items() if adj}
        words = (prompt or "").lower().replace(",", " ").split()
        wanted = []
        for k, w in enumerate(words):
            shape = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
            if shape in SHAPES:
                before = words[max(0, k - 3):k]
                color = next((b for b in before if b in COLORS), None)
                texture = next((adjective_of.get(b, b) for b in before if b in adjective_of or b in TEXTURES), None)
                wanted.append((shape, color, texture))
        lo, hi = self.n_range
        target = max(len(wanted), int(rng.integers(lo, hi + 1)))
        while len(wanted) < target:
            wanted.append((None, None, None))
        instances, report = [], PlanReport()
        for shape, color, texture in wanted[:8]:
            shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
            color = color or COLORS[int(rng.integers(len(COLORS)))]
            texture = texture or TEXTURES[int(rng.integers(len(TEXTURES)))]
            side = int(rng.integers(14, 31))
            x0, y0 = (int(v) for v in rng.integers(0, self.size - side + 1, 2))
            adj = TEXTURE_ADJECTIVE[texture]
            caption = f"a {color} {adj} {shape}" if adj else f"a {color} {shape}"
            instances.append(Instance(caption=" ".join(caption.split()), category=shape,
                                      box=(x0 / self.size, y0 / self.size, (x0 + side) / self.size,
                                           (y0 + side) / self.size)))
            report.categories.append({"name": shape, "label": shape, "is_coco": False, "how": "shapes vocabulary"})
        caption = global_caption([i.caption for i in instances])
        layout = Layout(caption=caption, width=self.size, height=self.size, instances=instances).validate()
        return PlannedLayout(layout=layout, planner_label=self.label, report=report, raw={"prompt": prompt},
                             prompt=prompt or caption, scene_type="shapes", seed=seed)


class ShapesYoloDetector:
    """The Shapes detector behind the placement API (``detect(images, queries) -> [Detections]``): a box's score
    for a query is its confidence when its class name is the query, else 0 (closed vocabulary: the six shapes)."""

    def __init__(self, yolo, threshold: float = 0.25, imgsz: int = YOLO_IMGSZ):
        self.yolo, self.threshold, self.imgsz = yolo, float(threshold), int(imgsz)

    def settings(self) -> dict:
        return {"backend": "shapes-yolo", "model": "models/shapes-yolo", "imgsz": self.imgsz}

    def detect(self, images, queries):
        from instdiff_lib.extension.placement import Detections

        out = []
        for img, qs in zip(images, queries):
            res = self.yolo.predict(img, imgsz=self.imgsz, conf=0.01, verbose=False, device="cpu")[0]
            boxes = res.boxes.xyxy.cpu().numpy() if len(res.boxes) else np.zeros((0, 4))
            names = [res.names[int(c)] for c in res.boxes.cls.tolist()] if len(res.boxes) else []
            conf = res.boxes.conf.cpu().numpy() if len(res.boxes) else np.zeros(0)
            scores = np.array([[conf[i] if names[i] == q else 0.0 for q in qs] for i in range(len(names))])
            out.append(Detections(boxes, scores.reshape(len(names), len(qs)), list(qs)))
        return out
