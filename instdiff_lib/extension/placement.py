"""Placement evaluation: did each planned instance end up where its box said?

For every generated image, an open-vocabulary grounding model looks for each planned instance by its label (the
category mapped to COCO where possible, see ``planner.map_category``); the instance's highest-scoring detection is
compared with its planned box. Detection runs batched over images.

ONE box convention throughout this module: ``[x0, y0, x1, y1]`` (left, top, right, bottom) in pixels of the
generated image. Layout boxes (normalised xyxy, see ``instdiff_lib.layouts.layout``) are scaled by the image's width and
height; detector outputs (normalised centre-size boxes) are converted once, in the detector classes. :func:`iou_xyxy`
is the only IoU. (The seed's ``iou.py`` applied an ``[x, y, w, h]`` formula to corner boxes: see the tests.)

Backends (all return :class:`Detections`: boxes plus one score per text query, nothing thresholded):

* :class:`GroundingDinoDetector` (default, ``IDEA-Research/grounding-dino-tiny``): all queries of an image go in one
  text ``"label a. label b."``; the score of a box for a query is the max sigmoid logit over that query's tokens
  (found from the tokenizer's character offsets), so labels never depend on decoding token fragments.
* :class:`Owlv2Detector` (``google/owlv2-base-patch16-ensemble``): one text embedding per query; scores are the
  sigmoid class logits; boxes are relative to the square-padded image, i.e. scaled by max(width, height).
* :class:`CogVLMDetector`: an optional backend to compare with the seed. CogVLM
  (``THUDM/cogvlm-grounding-generalist-hf``) needs ``trust_remote_code``, xformers and a ~40 GB GPU and is not a
  dependency of this project; pass your own ``generate(image, question) -> answer text`` callable (e.g. wrapping the
  model card's example) and the answers' ``[[x0,y0,x1,y1]]`` boxes on CogVLM's 0-1000 grid are parsed and scaled.
  Without it, :class:`BackendUnavailableError` (a NotImplementedError).

Weights load from a local folder or the Hugging Face hub (:func:`load_detector`); when they are not cached and the hub
is unreachable or ``HF_HUB_OFFLINE`` is set, :class:`DetectorWeightsError` is raised at once with what to do.

Matching (:func:`match_instances`), per image and per planned instance with a box:

* ``assignment="top-score"`` (default): the detection with the highest score for the instance's query; the instance is
  *found* if that score >= the detector's ``threshold``; IoU is 0 when not found. Instances sharing a label share
  that detection (the seed's "best per (image, label)" rule, pessimistic for repeated labels).
* ``assignment="one-to-one"``: per label, the detections above threshold (after NMS at IoU 0.5) are assigned to that
  label's planned boxes greedily by IoU; unassigned instances are not found.

Numbers (:func:`evaluate_placement`): ``mean_iou`` (all instances, 0 if not found), ``mean_iou_found`` (found only:
the seed's 0.42 / 0.23 / 0.66 are of this kind, over the instances CogVLM named), ``recall_at_50`` (share with IoU >=
0.5), ``found_rate``; the same with suffix ``_fed`` against the boxes of the layout JSONs that were actually given to
the generator (read from those files, not assumed equal to the plan); and the global ``clip_score`` of image vs
prompt when a CLIP model is given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from instdiff_lib.layouts.layout import Layout
from instdiff_lib.evaluation.metrics import MetricResult
from instdiff_lib.offline import hub_offline, reachable

__all__ = [
    "BACKENDS", "DetectorWeightsError", "BackendUnavailableError", "Detections",
    "iou_xyxy", "xywh_to_xyxy", "layout_boxes_px", "match_instances",
    "GroundingDinoDetector", "Owlv2Detector", "CogVLMDetector", "parse_cogvlm_boxes",
    "load_detector", "evaluate_placement",
]

BACKENDS = {
    "grounding-dino": "IDEA-Research/grounding-dino-tiny",
    "owlv2": "google/owlv2-base-patch16-ensemble",
    "cogvlm": "THUDM/cogvlm-grounding-generalist-hf",
}
HUB_ENDPOINT = "https://huggingface.co"


class DetectorWeightsError(RuntimeError):
    """The grounding model cannot be loaded (offline and not cached, missing folder, ...); says how to get it."""


class BackendUnavailableError(NotImplementedError):
    """An optional backend (CogVLM) that is not set up in this environment."""


# -----------------------------------------------------------------------------
# boxes


def iou_xyxy(a: Any, b: Any) -> np.ndarray | float:
    """Intersection over union of boxes ``[x0, y0, x1, y1]`` (corners, same frame), broadcasting over leading axes.

    ``a`` (..., 4) and ``b`` (..., 4) broadcast against each other (use ``a[:, None]`` and ``b[None]`` for a pairwise
    matrix). Disjoint boxes give 0; a pair with zero union (two degenerate boxes) gives 0. Returns a float for two
    single boxes.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"boxes must end in a dimension of 4 (x0, y0, x1, y1), got {a.shape} and {b.shape}")
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    out = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float(out) if out.ndim == 0 else out


def xywh_to_xyxy(box: Any) -> np.ndarray:
    """``[x, y, w, h]`` -> ``[x0, y0, x1, y1]`` (the official layout JSON / COCO convention -> this module's)."""
    b = np.asarray(box, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:4]], axis=-1)


def layout_boxes_px(layout: Layout, image_width: int, image_height: int) -> list[np.ndarray | None]:
    """Each instance's normalised box scaled to pixel xyxy of a ``image_width`` x ``image_height`` image (None
    for an instance without a box). A layout frame that differs from the image is stretched, as the generator does."""
    scale = np.array([image_width, image_height, image_width, image_height], dtype=np.float64)
    return [None if inst.box is None else np.asarray(inst.box, dtype=np.float64) * scale for inst in layout.instances]


# -----------------------------------------------------------------------------
# detections and matching


@dataclass
class Detections:
    """Candidate boxes of one image: ``boxes`` (N, 4) pixel xyxy, ``scores`` (N, Q) one column per ``queries``."""

    boxes: np.ndarray
    scores: np.ndarray
    queries: list[str]

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(len(self.boxes), len(self.queries))


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for i in order:
        if all(iou_xyxy(boxes[i], boxes[j]) <= iou_threshold for j in keep):
            keep.append(int(i))
    return np.array(keep, dtype=int)


def match_instances(planned: Sequence[np.ndarray | None], queries: Sequence[str], det: Detections, *,
                    threshold: float, assignment: str = "top-score") -> list[dict]:
    """For each planned box (pixel xyxy, or None) and its query text, the matched detection.

    Returns one dict per instance: ``query``, ``found`` (bool), ``score`` (the matched/top score, NaN without
    candidates), ``detected_box`` (list or None), ``det_index`` (int or None). IoU is left to the caller so that
    the same detection is compared with several box sets (planned and fed).
    """
    if assignment not in ("top-score", "one-to-one"):
        raise ValueError(f"assignment must be 'top-score' or 'one-to-one', got {assignment!r}")
    col = {q: j for j, q in enumerate(det.queries)}
    out: list[dict] = []
    for box, q in zip(planned, queries):
        if q not in col:
            raise ValueError(f"query {q!r} was not sent to the detector (queries: {det.queries})")
        out.append({"query": q, "found": False, "score": float("nan"), "detected_box": None, "det_index": None})
    if len(det.boxes) == 0:
        return out
    if assignment == "top-score":
        for rec in out:
            s = det.scores[:, col[rec["query"]]]
            i = int(np.argmax(s))
            rec["score"] = float(s[i])
            if s[i] >= threshold:
                rec.update(found=True, detected_box=det.boxes[i].tolist(), det_index=i)
        return out
    # one-to-one: per label, greedy by IoU between planned boxes and the detections above threshold (after NMS)
    for q in dict.fromkeys(queries):
        members = [k for k, qq in enumerate(queries) if qq == q and planned[k] is not None]
        s = det.scores[:, col[q]]
        cand = np.flatnonzero(s >= threshold)
        for k in members:
            out[k]["score"] = float(s.max())
        if not len(cand) or not members:
            continue
        cand = cand[_nms(det.boxes[cand], s[cand], 0.5)]
        ious = iou_xyxy(np.stack([planned[k] for k in members])[:, None], det.boxes[cand][None])
        pairs = sorted(((ious[m, c], -s[cand[c]], m, c) for m in range(len(members)) for c in range(len(cand))),
                       key=lambda t: (-t[0], t[1]))
        used_m, used_c = set(), set()
        for _, _, m, c in pairs:
            if m in used_m or c in used_c:
                continue
            used_m.add(m)
            used_c.add(c)
            i = int(cand[c])
            out[members[m]].update(found=True, score=float(s[i]), detected_box=det.boxes[i].tolist(), det_index=i)
    return out


# -----------------------------------------------------------------------------
# detectors


def _torch():
    import torch

    return torch


def _to_model(model, tensors: dict) -> dict:
    """Move inputs to the model's device; floating inputs (pixels) also to its dtype (e.g. a float16 model)."""
    p = next(iter(model.parameters()), None)
    device, dtype = (p.device, p.dtype) if p is not None else ("cpu", None)
    return {k: v.to(device=device, dtype=dtype) if (dtype is not None and v.is_floating_point()) else v.to(device)
            for k, v in tensors.items()}


def _cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return _torch().stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


class _TransformersDetector:
    """A transformers detection model + processor; subclasses set ``name``, ``default_threshold``, ``score_rule``."""

    name = ""
    default_threshold = 0.0
    score_rule = ""

    def __init__(self, model, processor, *, threshold: float | None = None, source: str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.threshold = float(self.default_threshold if threshold is None else threshold)
        self.source = source

    def settings(self) -> dict:
        return {"backend": self.name, "model": self.source, "threshold": self.threshold, "score": self.score_rule}


class GroundingDinoDetector(_TransformersDetector):
    """Grounding DINO through transformers (``GroundingDinoForObjectDetection`` + its processor).

    ``threshold`` (default 0.35, the Grounding DINO demo's box threshold) applies to the per-query score.
    """

    name = "grounding-dino"
    default_threshold = 0.35
    score_rule = "max sigmoid logit over the query's tokens"

    @staticmethod
    def build_text(queries: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        """``"a cat. a dog."`` and the character span of each query in it."""
        parts, spans, pos = [], [], 0
        for q in queries:
            q = " ".join(q.lower().split()).replace(".", " ").strip()
            if not q:
                raise ValueError("empty detection query")
            spans.append((pos, pos + len(q)))
            parts.append(q + ".")
            pos += len(q) + 2  # "q." + " "
        return " ".join(parts), spans

    def detect(self, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[Detections]:
        torch = _torch()
        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images but {len(queries)} query lists")
        texts, spans = zip(*(self.build_text(q) for q in queries))
        tok = self.processor.tokenizer
        enc = tok(list(texts), padding="longest", return_tensors="pt", return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")
        max_len = getattr(self.model.config, "max_text_len", 256)
        if enc["input_ids"].shape[1] > max_len:
            raise ValueError(f"the detection text has {enc['input_ids'].shape[1]} tokens, more than Grounding DINO's "
                             f"{max_len}; use fewer or shorter queries (query='category' instead of 'caption')")
        pix = self.processor.image_processor(list(images), return_tensors="pt")
        inputs = _to_model(self.model, {**enc, **pix})
        if "token_type_ids" not in inputs:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        with torch.inference_mode():
            out = self.model(**inputs)
        probs = out.logits.float().sigmoid().cpu()  # (B, n_boxes, max_text_len)
        boxes = _cxcywh_to_xyxy(out.pred_boxes.float().cpu())  # normalised to each (unpadded) image
        results = []
        for b, (img, qs) in enumerate(zip(images, queries)):
            w, h = img.size
            box_px = (boxes[b] * torch.tensor([w, h, w, h], dtype=torch.float32)).numpy()
            off = offsets[b].tolist()
            scores = np.zeros((box_px.shape[0], len(qs)))
            for j, (s0, s1) in enumerate(spans[b]):
                tokens = [t for t, (a, z) in enumerate(off) if z > a and a >= s0 and z <= s1]
                if not tokens:
                    raise ValueError(f"query {qs[j]!r} has no tokens in {texts[b]!r}")
                scores[:, j] = probs[b][:, tokens].max(dim=-1).values.numpy()
            results.append(Detections(boxes=np.clip(box_px, 0, [w, h, w, h]), scores=scores, queries=list(qs)))
        return results


class Owlv2Detector(_TransformersDetector):
    """OWLv2 through transformers (``Owlv2ForObjectDetection`` + its processor). ``threshold`` default 0.1 (the
    transformers examples' value) on the sigmoid class score."""

    name = "owlv2"
    default_threshold = 0.1
    score_rule = "sigmoid class logit per query"

    def detect(self, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[Detections]:
        torch = _torch()
        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images but {len(queries)} query lists")
        n_q = max(len(q) for q in queries)
        flat = [q for qs in queries for q in list(qs) + [" "] * (n_q - len(qs))]
        max_len = self.model.config.text_config.max_position_embeddings
        enc = self.processor.tokenizer(flat, padding="max_length", truncation=True, max_length=max_len,
                                       return_tensors="pt")
        pix = self.processor.image_processor(list(images), return_tensors="pt")
        inputs = _to_model(self.model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                        "pixel_values": pix["pixel_values"]})
        with torch.inference_mode():
            out = self.model(**inputs)
        probs = out.logits.float().sigmoid().cpu()  # (B, n_patches, n_q)
        boxes = _cxcywh_to_xyxy(out.pred_boxes.float().cpu())  # normalised to the square-padded image
        results = []
        for b, (img, qs) in enumerate(zip(images, queries)):
            w, h = img.size
            box_px = (boxes[b] * float(max(w, h))).numpy()  # padding is at the bottom/right: no offset
            results.append(Detections(boxes=np.clip(box_px, 0, [w, h, w, h]), scores=probs[b, :, :len(qs)].numpy(),
                                      queries=list(qs)))
        return results


def parse_cogvlm_boxes(text: str, width: int, height: int, grid: int = 1000) -> list[list[float]]:
    """Boxes ``[[x0,y0,x1,y1]]`` (also ``[[x0,y0,x1,y1];[...]]``) of a CogVLM grounding answer, on its 0-``grid``
    grid, -> pixel xyxy of a ``width`` x ``height`` image. Boxes with x1 <= x0 or y1 <= y0 are dropped."""
    out = []
    for m in re.finditer(r"\[\[([\d\s,;\[\]]+?)\]\]", text):
        for quad in re.findall(r"(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)", m.group(1)):
            x0, y0, x1, y1 = (int(v) for v in quad)
            if x1 > x0 and y1 > y0:
                out.append([x0 / grid * width, y0 / grid * height, x1 / grid * width, y1 / grid * height])
    return out


class CogVLMDetector:
    """CogVLM grounding as an optional backend (see the module doc). ``generate(image, question) -> str`` must be
    supplied; each query is asked as ``question_template.format(query)`` and every box in the answer becomes a
    detection with score 1.0 for that query (CogVLM gives no confidence), so ``threshold`` is 0.5."""

    name = "cogvlm"

    def __init__(self, generate: Callable[[Any, str], str] | None = None, *,
                 question_template: str = "Where is the {}? Answer in [[x0,y0,x1,y1]] format.", grid: int = 1000,
                 source: str | None = BACKENDS["cogvlm"]):
        if generate is None:
            raise BackendUnavailableError(
                "CogVLM grounding is an optional backend and is not installed with instdiff: the model "
                f"({BACKENDS['cogvlm']}) needs trust_remote_code, xformers and a ~40 GB GPU. Load it yourself (see its "
                "model card) and pass CogVLMDetector(generate=lambda image, question: <the model's answer text>), or "
                "use load_detector('grounding-dino') / load_detector('owlv2').")
        self.generate = generate
        self.template, self.grid, self.source = question_template, int(grid), source
        self.threshold = 0.5

    def settings(self) -> dict:
        return {"backend": self.name, "model": self.source, "question_template": self.template, "grid": self.grid,
                "threshold": self.threshold, "score": "1.0 for every box CogVLM returns for the query"}

    def detect(self, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[Detections]:
        results = []
        for img, qs in zip(images, queries):
            boxes, rows = [], []
            for j, q in enumerate(qs):
                for box in parse_cogvlm_boxes(self.generate(img, self.template.format(q)), *img.size, grid=self.grid):
                    boxes.append(box)
                    row = np.zeros(len(qs))
                    row[j] = 1.0
                    rows.append(row)
            results.append(Detections(boxes=np.array(boxes).reshape(-1, 4), scores=np.array(rows).reshape(-1, len(qs)),
                                      queries=list(qs)))
        return results


# -----------------------------------------------------------------------------
# loading


def _resolve(model: str, cache_dir, probe_timeout: float) -> tuple[str, bool]:
    """(where to load from, local_files_only) or DetectorWeightsError."""
    if os.path.isdir(model):
        return model, True
    if model.startswith((".", "/", "~")) or os.sep in model.replace("/", "", 1) or Path(model).suffix:
        raise DetectorWeightsError(f"detector folder not found: {model}")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model, "config.json", cache_dir=cache_dir), str)
    offline = hub_offline()
    if cached:
        return model, offline
    endpoint = getattr(constants, "ENDPOINT", HUB_ENDPOINT)
    if offline or not reachable(endpoint, probe_timeout):
        why = "HF_HUB_OFFLINE is set" if offline else f"{urlparse(endpoint).hostname} is unreachable"
        raise DetectorWeightsError(
            f"grounding model {model!r} is not in the Hugging Face cache and cannot be downloaded ({why}). Run "
            f"load_detector(model={model!r}) once with network access (or `huggingface-cli download {model}`) and "
            f"copy the cache (HF_HOME / HF_HUB_CACHE) here, or pass model='<local folder with config.json, weights "
            f"and processor files>'.")
    return model, False


def load_detector(backend: str = "grounding-dino", model: str | os.PathLike | None = None, *, device: str = "cpu",
                  threshold: float | None = None, cache_dir: str | None = None, probe_timeout: float = 2.0,
                  torch_dtype: Any = None, generate: Callable | None = None):
    """A ready detector: ``backend`` in ``BACKENDS``; ``model`` a local folder or a hub id (default per backend).

    Fails fast (:class:`DetectorWeightsError`) when the weights are neither local nor cached and the hub cannot be
    reached or ``HF_HUB_OFFLINE`` is set. ``generate`` is only for ``backend='cogvlm'`` (see :class:`CogVLMDetector`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    if backend == "cogvlm":
        return CogVLMDetector(generate, source=str(model) if model else BACKENDS["cogvlm"])
    model = os.fspath(model) if model is not None else BACKENDS[backend]
    source, local_only = _resolve(model, cache_dir, probe_timeout)
    from transformers import AutoProcessor

    if backend == "grounding-dino":
        from transformers import GroundingDinoForObjectDetection as cls
        wrapper = GroundingDinoDetector
    else:
        from transformers import Owlv2ForObjectDetection as cls
        wrapper = Owlv2Detector
    kw: dict[str, Any] = {"local_files_only": local_only, "cache_dir": cache_dir}
    try:
        processor = AutoProcessor.from_pretrained(source, **kw)
        net = cls.from_pretrained(source, **kw, **({"dtype": torch_dtype} if torch_dtype is not None else {}))
    except (OSError, ValueError) as e:
        raise DetectorWeightsError(f"cannot load {backend} from {source!r}: {e}") from None
    return wrapper(net.to(device), processor, threshold=threshold, source=source)


# -----------------------------------------------------------------------------
# evaluation


def _as_layout(obj: Any) -> Layout:
    if isinstance(obj, Layout):
        return obj
    if hasattr(obj, "layout") and isinstance(obj.layout, Layout):  # PlannedLayout
        return obj.layout
    return Layout.from_json(obj if isinstance(obj, dict) else os.fspath(obj))


def _open_image(src: Any):
    from PIL import Image

    if isinstance(src, Image.Image):
        return src.convert("RGB")
    with Image.open(src) as im:
        return im.convert("RGB")


def _category_query(inst, map_labels: bool) -> str:
    if not inst.category:
        return inst.caption
    if map_labels:
        from instdiff_lib.extension.planner import map_category

        return map_category(inst.category).label
    return inst.category


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _summary(records: list[dict], key: str, iou_threshold: float) -> dict[str, float]:
    ious = [r[key] for r in records]
    found = [r[key] for r in records if r["found"]]
    return {"mean_iou": _mean(ious), "mean_iou_found": _mean(found),
            "recall_at_50": _mean([float(v >= iou_threshold) for v in ious]),
            "found_rate": _mean([float(r["found"]) for r in records])}


def evaluate_placement(images: Sequence[Any], planned: Sequence[Any], detector, *, fed: Sequence[Any] | None = None,
                       prompts: Sequence[str] | None = None, clip: Any = None, query: str = "category",
                       assignment: str = "top-score", iou_threshold: float = 0.5, threshold: float | None = None,
                       batch_size: int = 4, image_ids: Sequence[Any] | None = None,
                       map_labels: bool = True) -> MetricResult:
    """Detect every planned instance in its generated image and score the placement (see the module doc).

    images: paths or PIL images. planned: the intended layouts (``PlannedLayout``, ``Layout``, layout JSON path or
    dict), one per image. fed: the layout JSONs (paths/dicts/Layouts) that were actually given to the generator; the
    ``*_fed`` numbers are computed from them, and are absent (with a note) when ``fed`` is None. query:
    ``"category"`` (the instance's category mapped to COCO by ``planner.map_category`` when ``map_labels``, e.g.
    "puppy" -> "dog", free text kept; the caption when an instance has no category) or ``"caption"``. prompts: for
    the CLIP score (default: each layout's global caption); clip: a CLIP triple for ``metrics.clip_metrics.clip_score``
    (skipped with a note when None). Unreadable images and layouts that do not line up are skipped with a reason.
    """
    if len(images) != len(planned):
        raise ValueError(f"{len(images)} images but {len(planned)} planned layouts")
    if fed is not None and len(fed) != len(images):
        raise ValueError(f"{len(images)} images but {len(fed)} fed layouts")
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if query not in ("category", "caption"):
        raise ValueError(f"query must be 'category' or 'caption', got {query!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ids = list(image_ids) if image_ids is not None else list(range(len(images)))
    thr = float(detector.threshold if threshold is None else threshold)
    notes: list[str] = []
    skipped: list[tuple[Any, str]] = []
    records: list[dict] = []
    per_image: list[dict] = []
    clip_inputs: list[tuple[Any, str]] = []

    # prepare everything that can fail per image before running the detector
    ready = []
    for k in range(len(images)):
        try:
            lay = _as_layout(planned[k])
            fed_lay = _as_layout(fed[k]) if fed is not None else None
        except Exception as e:  # noqa: BLE001 - one bad layout must not end a run; it is reported
            skipped.append((ids[k], f"layout: {type(e).__name__}: {e}"))
            continue
        if fed_lay is not None and len(fed_lay.instances) != len(lay.instances):
            skipped.append((ids[k], f"the fed layout has {len(fed_lay.instances)} instances, the plan "
                                    f"{len(lay.instances)}: they do not line up"))
            continue
        ready.append((k, lay, fed_lay))

    for start in range(0, len(ready), batch_size):
        chunk, imgs = [], []
        for k, lay, fed_lay in ready[start:start + batch_size]:
            try:
                imgs.append(_open_image(images[k]))
            except Exception as e:  # noqa: BLE001
                skipped.append((ids[k], f"image: {type(e).__name__}: {e}"))
                continue
            chunk.append((k, lay, fed_lay))
        if not chunk:
            continue
        query_lists, inst_queries = [], []
        for _, lay, _ in chunk:
            qs = [_category_query(inst, map_labels) if query == "category" else inst.caption for inst in lay.instances]
            qs = [" ".join(q.split()) for q in qs]
            inst_queries.append(qs)
            query_lists.append(list(dict.fromkeys(q for q, inst in zip(qs, lay.instances) if inst.box is not None)))
        todo = [i for i, ql in enumerate(query_lists) if ql]
        dets = detector.detect([imgs[i] for i in todo], [query_lists[i] for i in todo]) if todo else []
        det_of = dict(zip(todo, dets))
        for i, (k, lay, fed_lay) in enumerate(chunk):
            w, h = imgs[i].size
            boxes = layout_boxes_px(lay, w, h)
            fed_boxes = layout_boxes_px(fed_lay, w, h) if fed_lay is not None else None
            with_box = [j for j, b in enumerate(boxes) if b is not None]
            if not with_box:
                skipped.append((ids[k], "no planned instance has a box"))
                continue
            matches = match_instances([boxes[j] for j in with_box], [inst_queries[i][j] for j in with_box],
                                      det_of[i], threshold=thr, assignment=assignment)
            image_records = []
            for j, m in zip(with_box, matches):
                det_box = np.asarray(m["detected_box"]) if m["found"] else None
                rec = {"image": ids[k], "instance": j, "label": lay.instances[j].category,
                       "caption": lay.instances[j].caption, "query": m["query"], "found": m["found"],
                       "score": m["score"], "planned_box": boxes[j].round(3).tolist(),
                       "detected_box": None if det_box is None else det_box.round(3).tolist(),
                       "iou": iou_xyxy(boxes[j], det_box) if det_box is not None else 0.0}
                if fed_boxes is not None:
                    fb = fed_boxes[j]
                    rec["fed_box"] = None if fb is None else fb.round(3).tolist()
                    rec["iou_fed"] = iou_xyxy(fb, det_box) if (det_box is not None and fb is not None) else 0.0
                image_records.append(rec)
            n_no_box = len(boxes) - len(with_box)
            per_image.append({"image": ids[k], "n_instances": len(image_records), "n_without_box": n_no_box,
                              **_summary(image_records, "iou", iou_threshold)})
            records.extend(image_records)
            clip_inputs.append((imgs[i], prompts[k] if prompts is not None else lay.caption))

    values: dict[str, float] = {}
    if records:
        values.update(_summary(records, "iou", iou_threshold))
        if fed is not None:
            values.update({f"{key}_fed": v for key, v in _summary(records, "iou_fed", iou_threshold).items()})
    else:
        notes.append("no instance could be evaluated")
    if fed is None:
        notes.append("fed layouts not given: the *_fed numbers (against the boxes given to the generator) were not "
                     "computed")
    values["n_instances"] = float(len(records))

    clip_details = None
    if clip is None:
        notes.append("clip_score skipped: no CLIP model given (clip=load_clip() or tiny_clip())")
    elif not clip_inputs:
        notes.append("clip_score skipped: no evaluated image")
    else:
        try:
            from instdiff_lib.evaluation.metrics.clip_metrics import clip_score
        except ImportError as e:
            notes.append(f"clip_score skipped: instdiff_lib.evaluation.metrics.clip_metrics unavailable ({e})")
        else:
            res = clip_score([c[0] for c in clip_inputs], [c[1] for c in clip_inputs], clip)
            values["clip_score"] = res.values["clip_score"]
            clip_details = {"n_evaluated": res.n_evaluated, "skipped": res.skipped, **res.details}

    details = {
        "box_convention": "xyxy = [x0, y0, x1, y1] in pixels of the generated image; layout boxes scaled by image size",
        "settings": {**detector.settings(), "threshold": thr, "query": query, "assignment": assignment,
                     "iou_threshold": iou_threshold, "batch_size": batch_size, "map_labels": map_labels},
        "instances": records, "per_image": per_image, "notes": notes,
        "n_instances_without_box": int(sum(p["n_without_box"] for p in per_image)),
    }
    if clip_details is not None:
        details["clip"] = clip_details
    return MetricResult(values=values, n_evaluated=len(per_image), n_skipped=len(skipped), skipped=skipped,
                        details=details)
