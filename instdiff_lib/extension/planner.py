"""Layout planning: a text prompt -> a validated :class:`~instdiff_lib.layouts.layout.Layout` for the extension.

Two planners share one interface, ``planner.plan(prompt=None, *, seed=None, scene_type=None) -> PlannedLayout``:

* :class:`LLMPlanner` asks any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, ...) through the
  ``openai`` client. Base URL, model and key come from the arguments or from ``INSTDIFF_LLM_BASE_URL``,
  ``INSTDIFF_LLM_MODEL`` and ``INSTDIFF_LLM_API_KEY`` (falling back to ``OPENAI_API_KEY``).
* :class:`OfflinePlanner` is a deterministic template planner (no network) for smoke runs. Everything it produces is
  labelled ``planner: "offline-template"`` so that it is never mistaken for an LLM's layout.

Box conventions (the seed reproduction got this wrong twice, see spec prior_reproductions.md §1.10-1.11):

* the LLM is asked for ONE convention only: ``"box_xyxy": [x0, y0, x1, y1]`` = left, top, right, bottom edges in
  pixels of a ``width`` x ``height`` canvas (origin top-left, x to the right, y down);
* an answer with ``x1 <= x0`` or ``y1 <= y0`` is a schema violation (it often means the model answered
  ``[x, y, w, h]``) and is retried;
* a box that sticks out of the canvas is clipped when at least half of its area lies on the canvas (counted in
  ``PlanReport.n_repaired``), otherwise the instance is dropped (``n_rejected``);
* inside a :class:`Layout` boxes are normalised ``(x0 / W, y0 / H, x1 / W, y1 / H)``;
* the files written by :func:`plan_many` are the official InstanceDiffusion demo format, whose ``bbox`` is
  ``[x, y, w, h]`` in pixels: ``[x0, y0, x1 - x0, y1 - y0]`` (done by ``Layout.to_json``), which the official
  ``inference.py`` reads correctly.

Retries: one request per attempt, at most ``max_retries + 1`` attempts; an attempt is retried on HTTP 408/409/429/5xx,
timeouts, connection errors, malformed JSON and schema violations, after an exponential backoff
(``backoff_base * 2**k`` s, capped at ``backoff_max``, at least the server's ``Retry-After`` when it sends one, also
capped). The ``openai`` client's own retries are switched off so the count is ours. Other HTTP errors (400, 401, 403,
404, ...) fail at once: retrying cannot fix them. Every attempt is recorded in the :class:`PlanReport`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instdiff_lib.layouts.layout import N_SLOTS, Instance, Layout, LayoutError

__all__ = [
    "OFFLINE_LABEL", "SCENE_TYPES", "COCO_CLASSES", "SYNONYMS", "ENV_BASE_URL", "ENV_MODEL", "ENV_API_KEY",
    "PlannerError", "PlanSchemaError", "CategoryMatch", "PlanReport", "PlannedLayout",
    "map_category", "response_schema", "build_messages", "parse_plan", "repair_box",
    "LLMPlanner", "OfflinePlanner", "plan_many",
]

OFFLINE_LABEL = "offline-template"
ENV_BASE_URL = "INSTDIFF_LLM_BASE_URL"
ENV_MODEL = "INSTDIFF_LLM_MODEL"
ENV_API_KEY = "INSTDIFF_LLM_API_KEY"
OPENAI_URL = "https://api.openai.com/v1"
MIN_CANVAS_OVERLAP = 0.5  # a box with at least this share of its area on the canvas is clipped, else rejected

# The seed's nine scene types (chatgpt_generate_input.py).
SCENE_TYPES = ("indoor", "outdoor", "nature", "commercial", "industrial", "transport", "recreational",
               "special event", "agricultural")

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
_COCO_SET = frozenset(COCO_CLASSES)

_SYNONYM_GROUPS = {
    "person": "girl boy man woman child kid baby lady gentleman guy pedestrian player skier surfer rider cyclist "
              "chef cook farmer worker tourist student teenager toddler adult human policeman athlete runner "
              "soldier|police officer|construction worker|tennis player|baseball player|soccer player",
    "bicycle": "bike cycle|mountain bike",
    "car": "automobile taxi cab sedan suv jeep|sports car|police car",
    "motorcycle": "motorbike scooter moped",
    "airplane": "plane aeroplane airliner jet aircraft",
    "train": "locomotive tram",
    "truck": "lorry|pickup truck|fire truck|fire engine",
    "boat": "ship sailboat yacht canoe kayak ferry",
    "traffic light": "stoplight|traffic signal|stop light",
    "fire hydrant": "hydrant",
    "bird": "parrot pigeon seagull gull duck sparrow eagle owl chicken hen rooster crow swan goose",
    "cat": "kitten kitty",
    "dog": "puppy pup doggy retriever labrador poodle terrier bulldog dachshund",
    "horse": "pony foal stallion",
    "sheep": "lamb goat ram",
    "cow": "cattle calf bull ox",
    "backpack": "rucksack knapsack",
    "umbrella": "parasol",
    "handbag": "purse bag",
    "tie": "necktie",
    "suitcase": "luggage",
    "skis": "ski",
    "sports ball": "ball football basketball baseball volleyball|soccer ball|tennis ball|beach ball",
    "baseball glove": "mitt",
    "surfboard": "|surf board",
    "tennis racket": "racket racquet|tennis racquet",
    "cup": "mug teacup|coffee cup",
    "donut": "doughnut",
    "hot dog": "hotdog",
    "couch": "sofa settee",
    "potted plant": "houseplant plant flowerpot|house plant|flower pot",
    "dining table": "table|kitchen table|dinner table",
    "tv": "television|tv set|tv monitor",
    "laptop": "|notebook computer|laptop computer",
    "mouse": "|computer mouse",
    "remote": "|remote control",
    "cell phone": "phone smartphone cellphone|mobile phone",
    "microwave": "|microwave oven",
    "oven": "stove",
    "refrigerator": "fridge",
    "teddy bear": "teddy",
    "hair drier": "hairdryer|hair dryer|blow dryer",
}
# synonym -> COCO class; single words are space-separated, multi-word synonyms are '|'-separated
SYNONYMS: dict[str, str] = {}
for _coco, _spec in _SYNONYM_GROUPS.items():
    _single, *_multi = _spec.split("|")
    for _s in _single.split() + _multi:
        if _s:
            SYNONYMS[_s] = _coco
del _coco, _spec, _single, _multi, _s

_IRREGULAR_PLURALS = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
                      "geese": "goose", "knives": "knife", "oxen": "ox", "teeth": "tooth", "feet": "foot",
                      "cattle": "cattle", "sheep": "sheep", "skis": "skis", "scissors": "scissors"}
_ARTICLES = ("a", "an", "the", "some", "one", "two", "three", "several", "many")


# -----------------------------------------------------------------------------
# errors and records


class PlannerError(RuntimeError):
    """Planning failed after the allowed attempts (or on a non-retryable error); ``report`` has every attempt."""

    def __init__(self, message: str, report: PlanReport | None = None):
        super().__init__(message)
        self.report = report


class PlanSchemaError(ValueError):
    """An answer that is valid JSON but does not follow the requested schema (the message says where)."""


@dataclass(frozen=True)
class CategoryMatch:
    """A category name mapped to COCO: ``label`` (COCO class, or the cleaned free text), ``is_coco``, ``how``
    (``"coco"`` exact, ``"synonym"``, ``"head-noun"`` = via the last word, ``"free-text"``), ``source`` (as given)."""

    label: str
    is_coco: bool
    how: str
    source: str


@dataclass
class PlanReport:
    """What it took to get a layout: requests, retries, repairs and rejections, and the raw answers."""

    n_requests: int = 0
    n_retries: int = 0
    n_repaired: int = 0
    n_rejected: int = 0
    raw_responses: list[str] = field(default_factory=list)  # every answer body received (content or error text)
    errors: list[str] = field(default_factory=list)  # one line per failed attempt: "attempt k: <kind>: <message>"
    repaired: list[dict] = field(default_factory=list)  # {"instance", "category", "box_xyxy", "clipped_to", "overlap"}
    rejected: list[dict] = field(default_factory=list)  # {"instance", "category", "box_xyxy", "overlap", "reason"}
    categories: list[dict] = field(default_factory=list)  # asdict(CategoryMatch) per kept instance
    wait_s: float = 0.0  # total backoff sleep

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def total(reports: Sequence[PlanReport]) -> dict:
        """Sums of the counters over many reports (for plan_report.json)."""
        keys = ("n_requests", "n_retries", "n_repaired", "n_rejected")
        out: dict[str, Any] = {k: int(sum(getattr(r, k) for r in reports)) for k in keys}
        out["wait_s"] = float(sum(r.wait_s for r in reports))
        out["n_instances_coco"] = int(sum(c["is_coco"] for r in reports for c in r.categories))
        out["n_instances_free_text"] = int(sum(not c["is_coco"] for r in reports for c in r.categories))
        return out


@dataclass
class PlannedLayout:
    """A planned layout and its provenance. ``planner_label`` is ``"offline-template"`` or ``"llm:<model>"``;
    ``raw`` is the accepted answer text (LLM) or the template record (offline)."""

    layout: Layout
    planner_label: str
    report: PlanReport
    raw: Any
    prompt: str | None = None
    scene_type: str | None = None
    seed: int | None = None

    @property
    def is_coco(self) -> list[bool]:
        return [c["is_coco"] for c in self.report.categories]

    def boxes_xyxy_px(self) -> list[list[float]]:
        """The planned boxes as pixel [x0, y0, x1, y1] of the layout canvas (after repair)."""
        w, h = self.layout.width, self.layout.height
        return [[b[0] * w, b[1] * h, b[2] * w, b[3] * h] for b in (inst.box for inst in self.layout.instances)]

    def to_json(self) -> dict:
        """The official demo-format dict (``bbox`` = pixel [x, y, w, h]) plus provenance keys the official code
        ignores: top-level ``planner``, ``prompt``, ``scene_type``, ``seed`` and per instance ``is_coco``."""
        doc = self.layout.to_json()
        for anno, cat in zip(doc["annos"], self.report.categories):
            anno["is_coco"] = bool(cat["is_coco"])
        doc["planner"] = self.planner_label
        doc["prompt"] = self.prompt
        doc["scene_type"] = self.scene_type
        doc["seed"] = self.seed
        return doc


# -----------------------------------------------------------------------------
# categories


def _clean(name: str, strip_articles: bool = True) -> str:
    s = re.sub(r"[^a-z0-9 ]+", " ", name.lower().replace("-", " "))
    words = s.split()
    while strip_articles and len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def _singulars(word: str) -> list[str]:
    if word in _IRREGULAR_PLURALS:
        return [_IRREGULAR_PLURALS[word]]
    out = []
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith(("ches", "shes", "xes", "sses", "oes")):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        out.append(word[:-1])
    return out


def _lookup(phrase: str) -> tuple[str, str] | None:
    if phrase in _COCO_SET:
        return phrase, "coco"
    if phrase in SYNONYMS:
        return SYNONYMS[phrase], "synonym"
    return None


def map_category(name: str) -> CategoryMatch:
    """Map a category name to a COCO class where possible (exact, synonym table, plural, then the head noun =
    last word), else keep the cleaned name as free text (``is_coco=False``)."""
    source = name
    s = _clean(name)
    if not s:
        return CategoryMatch(label=name.strip(), is_coco=False, how="free-text", source=source)
    words = s.split()
    candidates = [s]
    candidates += [" ".join(words[:-1] + [w]) for w in _singulars(words[-1])]
    for c in candidates:
        hit = _lookup(c)
        if hit:
            return CategoryMatch(label=hit[0], is_coco=True, how=hit[1], source=source)
    if len(words) > 1:
        for c in [words[-1], *_singulars(words[-1])]:
            hit = _lookup(c)
            if hit:
                return CategoryMatch(label=hit[0], is_coco=True, how="head-noun", source=source)
    return CategoryMatch(label=s, is_coco=False, how="free-text", source=source)


# -----------------------------------------------------------------------------
# prompt and parsing


def _count_range(n_instances: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    if isinstance(n_instances, (int, np.integer)) and not isinstance(n_instances, bool):
        lo = hi = int(n_instances)
    elif isinstance(n_instances, Sequence) and len(n_instances) == 2:
        lo, hi = (int(v) for v in n_instances)
    else:
        raise ValueError(f"n_instances must be an int or a (min, max) pair, got {n_instances!r}")
    if not 1 <= lo <= hi <= N_SLOTS:
        raise ValueError(f"n_instances must satisfy 1 <= min <= max <= {N_SLOTS} (the model's instance slots), "
                         f"got {n_instances!r}")
    return lo, hi


def response_schema(n_instances: int | tuple[int, int], width: int, height: int) -> dict:
    """The JSON schema of an answer (shown to the model; :func:`parse_plan` checks it by hand)."""
    lo, hi = _count_range(n_instances)
    return {
        "type": "object",
        "required": ["caption", "instances"],
        "properties": {
            "caption": {"type": "string", "minLength": 1, "description": "one sentence describing the whole image"},
            "instances": {
                "type": "array", "minItems": lo, "maxItems": hi,
                "items": {
                    "type": "object",
                    "required": ["category", "caption", "box_xyxy"],
                    "properties": {
                        "category": {"type": "string", "minLength": 1,
                                     "description": "object class, a COCO class name when one fits"},
                        "caption": {"type": "string", "minLength": 1,
                                    "description": "short description of this object only"},
                        "box_xyxy": {
                            "type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                            "description": f"[x0, y0, x1, y1]: left, top, right, bottom edges in pixels, "
                                           f"0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height}",
                        },
                    },
                },
            },
        },
    }


SYSTEM_PROMPT = ("You design layouts for a layout-conditioned text-to-image model. You answer with one JSON object "
                 "and nothing else: no prose, no markdown.")


def build_messages(prompt: str | None, *, width: int, height: int, n_instances: int | tuple[int, int],
                   scene_type: str | None = None) -> list[dict]:
    """Chat messages asking for one layout (for ``prompt``, or an invented scene of ``scene_type``)."""
    lo, hi = _count_range(n_instances)
    count = f"exactly {lo}" if lo == hi else f"between {lo} and {hi}"
    if prompt:
        task = f"Plan the layout of an image for this description: {prompt!r}."
    else:
        task = (f"Invent a realistic {scene_type or 'everyday'} scene and plan the layout of an image of it.")
    schema = json.dumps(response_schema((lo, hi), width, height))
    example_w, example_h = width // 4, height // 3
    user = (
        f"{task}\n"
        f"The canvas is {width} pixels wide and {height} pixels high; the origin is the top-left corner, x grows to "
        f"the right and y grows downwards.\n"
        f"List {count} object instances. Give every instance a category (use one of the COCO class names when one "
        f"fits: {', '.join(COCO_CLASSES)}; otherwise a short noun), a short caption describing that object with its "
        f"attributes, and its bounding box.\n"
        f"BOX CONVENTION: \"box_xyxy\" is [x0, y0, x1, y1] = [left, top, right, bottom] in pixels, with "
        f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}. It is NOT [x, y, width, height]. For example an "
        f"object {example_w} px wide and {example_h} px high whose top-left corner is at (10, 20) has "
        f"\"box_xyxy\": [10, 20, {10 + example_w}, {20 + example_h}].\n"
        f"Use realistic sizes, positions and perspective.\n"
        f"Answer with a JSON object that follows this JSON schema:\n{schema}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S | re.I)


def _loads(text: str) -> Any:
    """json.loads, tolerating one surrounding ```json fence (some servers add it despite json mode)."""
    m = _FENCE.match(text)
    return json.loads(m.group(1) if m else text)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def repair_box(box: Sequence[float], width: int, height: int,
               min_overlap: float = MIN_CANVAS_OVERLAP) -> tuple[str, tuple[float, ...] | None, float]:
    """(status, box, overlap) for a pixel xyxy box with x0 < x1, y0 < y1.

    ``overlap`` = share of the box's area on the canvas. status ``"ok"`` (inside, box unchanged), ``"repaired"``
    (clipped to the canvas; overlap >= min_overlap) or ``"rejected"`` (box None).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    area = (x1 - x0) * (y1 - y0)
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    inter = max(cx1 - cx0, 0.0) * max(cy1 - cy0, 0.0)
    overlap = inter / area if area > 0 else 0.0
    if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
        return "ok", (x0, y0, x1, y1), 1.0
    if overlap >= min_overlap:
        return "repaired", (cx0, cy0, cx1, cy1), overlap
    return "rejected", None, overlap


def parse_plan(data: Any, *, width: int, height: int, n_instances: int | tuple[int, int],
               report: PlanReport | None = None, min_overlap: float = MIN_CANVAS_OVERLAP) -> Layout:
    """A decoded answer -> validated Layout (normalised xyxy). Raises PlanSchemaError naming the problem.

    Boxes off the canvas are repaired or rejected (recorded in ``report``); if no instance survives, that is a
    PlanSchemaError too. The layout is then checked by ``Layout.validate``.
    """
    report = report if report is not None else PlanReport()
    lo, hi = _count_range(n_instances)
    if not isinstance(data, dict):
        raise PlanSchemaError(f"the answer must be a JSON object, got {type(data).__name__}")
    caption = data.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise PlanSchemaError("'caption' (global) must be a non-empty string")
    items = data.get("instances")
    if not isinstance(items, list):
        raise PlanSchemaError(f"'instances' must be a list, got {type(items).__name__}")
    if not lo <= len(items) <= hi:
        want = f"{lo}" if lo == hi else f"{lo}-{hi}"
        raise PlanSchemaError(f"'instances' must have {want} entries, got {len(items)}")
    checked = []
    for i, item in enumerate(items):
        where = f"instances[{i}]"
        if not isinstance(item, dict):
            raise PlanSchemaError(f"{where} must be an object, got {type(item).__name__}")
        for key in ("category", "caption"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise PlanSchemaError(f"{where}: '{key}' must be a non-empty string, got {item.get(key)!r}")
        box = item.get("box_xyxy")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_num(v) for v in box)):
            raise PlanSchemaError(f"{where} ({item['category']!r}): 'box_xyxy' must be 4 finite numbers "
                                  f"[x0, y0, x1, y1], got {box!r}")
        if not (box[2] > box[0] and box[3] > box[1]):
            raise PlanSchemaError(f"{where} ({item['category']!r}): 'box_xyxy' {box} needs x0 < x1 and y0 < y1 "
                                  f"(corners [left, top, right, bottom], not [x, y, width, height])")
        checked.append((item, box))

    instances = []
    for i, (item, box) in enumerate(checked):
        status, fixed, overlap = repair_box(box, width, height, min_overlap)
        if status == "rejected":
            report.n_rejected += 1
            report.rejected.append({"instance": i, "category": item["category"], "box_xyxy": list(box),
                                    "overlap": round(overlap, 6),
                                    "reason": f"only {overlap:.0%} of the box lies on the {width}x{height} canvas "
                                              f"(< {min_overlap:.0%})"})
            continue
        if status == "repaired":
            report.n_repaired += 1
            report.repaired.append({"instance": i, "category": item["category"], "box_xyxy": list(box),
                                    "clipped_to": list(fixed), "overlap": round(overlap, 6)})
        match = map_category(item["category"])
        report.categories.append(asdict(match))
        x0, y0, x1, y1 = fixed
        instances.append(Instance(caption=item["caption"].strip(), box=(x0 / width, y0 / height, x1 / width,
                                                                        y1 / height), category=match.label))
    if not instances:
        raise PlanSchemaError(f"no usable instance: all {len(checked)} boxes lie mostly outside the "
                              f"{width}x{height} canvas")
    try:
        return Layout(caption=caption.strip(), width=width, height=height, instances=instances).validate()
    except LayoutError as e:
        raise PlanSchemaError(str(e)) from None


# -----------------------------------------------------------------------------
# planners


def _resolve_seed(seed: int | None, default: int | None) -> int | None:
    return default if seed is None else int(seed)


class LLMPlanner:
    """Plans layouts through an OpenAI-compatible chat-completions endpoint (see the module doc).

    ``base_url`` / ``model`` / ``api_key`` default to the environment (``INSTDIFF_LLM_BASE_URL``,
    ``INSTDIFF_LLM_MODEL``, ``INSTDIFF_LLM_API_KEY`` or ``OPENAI_API_KEY``); without a base URL the client talks
    to OpenAI. A local server (vLLM: ``http://host:8000/v1``, Ollama: ``http://localhost:11434/v1``) needs no key.
    ``response_format``: ``"json_object"`` (default), ``"json_schema"`` (structured outputs, where supported) or
    None (plain text; the schema is still in the prompt and still checked).
    """

    def __init__(self, model: str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                 width: int = 512, height: int = 512, n_instances: int | tuple[int, int] = (3, 8),
                 scene_types: Sequence[str] = SCENE_TYPES, temperature: float | None = 0.7,
                 seed: int | None = 0, max_retries: int = 4, timeout: float = 60.0, backoff_base: float = 1.0,
                 backoff_max: float = 30.0, response_format: str | None = "json_object",
                 max_tokens: int | None = 2048, min_overlap: float = MIN_CANVAS_OVERLAP, client: Any = None):
        self.base_url = base_url or os.environ.get(ENV_BASE_URL) or None
        self.model = model or os.environ.get(ENV_MODEL)
        if not self.model:
            raise PlannerError(f"no model name: pass model=... or set {ENV_MODEL} (e.g. 'gpt-4o' for OpenAI, the "
                               f"served model name for vLLM/Ollama)")
        key = api_key or os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.base_url is None or "api.openai.com" in self.base_url:
                raise PlannerError(f"no API key for OpenAI: pass api_key=... or set {ENV_API_KEY} or OPENAI_API_KEY "
                                   f"(or point {ENV_BASE_URL} at a local server)")
            key = "not-needed"  # local servers ignore it; the client insists on one
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise ValueError(f"canvas width/height must be positive ints, got {width!r} x {height!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if response_format not in ("json_object", "json_schema", None):
            raise ValueError(f"response_format must be 'json_object', 'json_schema' or None, got {response_format!r}")
        if not scene_types:
            raise ValueError("scene_types must not be empty")
        self.width, self.height = width, height
        self.n_range = _count_range(n_instances)
        self.scene_types = tuple(scene_types)
        self.temperature, self.seed = temperature, seed
        self.max_retries, self.timeout = int(max_retries), float(timeout)
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self.response_format, self.max_tokens, self.min_overlap = response_format, max_tokens, min_overlap
        if client is None:
            import openai

            client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=0)
        self.client = client
        self.label = f"llm:{self.model}"

    def settings(self) -> dict:
        """Everything that shapes the answers (never the key), for provenance."""
        return {"planner": self.label, "model": self.model, "base_url": self.base_url or OPENAI_URL,
                "canvas": [self.width, self.height], "n_instances": list(self.n_range),
                "scene_types": list(self.scene_types), "temperature": self.temperature, "seed": self.seed,
                "max_retries": self.max_retries, "timeout_s": self.timeout, "backoff_base_s": self.backoff_base,
                "backoff_max_s": self.backoff_max, "response_format": self.response_format,
                "max_tokens": self.max_tokens, "min_canvas_overlap": self.min_overlap,
                "box_convention": "box_xyxy = [x0, y0, x1, y1] pixels of the canvas"}

    def _request_kwargs(self, messages: list[dict], seed: int | None) -> dict:
        kw: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        if seed is not None:
            kw["seed"] = seed
        if self.max_tokens is not None:
            kw["max_tokens"] = self.max_tokens
        if self.response_format == "json_object":
            kw["response_format"] = {"type": "json_object"}
        elif self.response_format == "json_schema":
            kw["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "layout", "schema": response_schema(self.n_range, self.width, self.height)}}
        return kw

    def _backoff(self, k: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** k)
        if retry_after is not None:
            delay = min(self.backoff_max, max(delay, retry_after))
        return max(delay, 0.0)

    def plan(self, prompt: str | None = None, *, seed: int | None = None,
             scene_type: str | None = None) -> PlannedLayout:
        """One layout for ``prompt`` (or, without one, an invented scene of ``scene_type``, by default drawn from
        ``scene_types`` with ``seed``). Raises PlannerError after ``max_retries`` retries or on a fatal error."""
        import openai

        seed = _resolve_seed(seed, self.seed)
        if prompt is None and scene_type is None:
            scene_type = self.scene_types[int(np.random.default_rng(seed).integers(len(self.scene_types)))]
        base = build_messages(prompt, width=self.width, height=self.height, n_instances=self.n_range,
                              scene_type=scene_type)
        messages = base
        report = PlanReport()
        for attempt in range(self.max_retries + 1):
            report.n_requests += 1
            retry_after = None
            try:
                resp = self.client.chat.completions.create(**self._request_kwargs(messages, seed))
            except openai.APITimeoutError as e:
                kind, msg = "timeout", f"no answer within {self.timeout:g} s ({e})"
            except openai.APIConnectionError as e:
                kind, msg = "connection error", str(e)
            except openai.APIStatusError as e:
                body = _error_text(e)
                report.raw_responses.append(body)
                status = e.status_code
                if not (status in (408, 409, 429) or status >= 500):
                    report.errors.append(f"attempt {attempt + 1}: HTTP {status}: {body}")
                    raise PlannerError(f"{self.label} at {self.base_url or OPENAI_URL}: HTTP {status} (not retried): "
                                       f"{body}", report) from None
                kind, msg = f"HTTP {status}", body
                retry_after = _retry_after(e)
            except (openai.OpenAIError, ValueError) as e:  # a 200 whose body is not a chat completion (bad JSON, ...)
                kind, msg = "bad response", f"{type(e).__name__}: {e}"
            else:
                content, envelope_error = _content(resp)
                if envelope_error:
                    kind, msg = "bad response", envelope_error
                    report.raw_responses.append(content or "")
                else:
                    report.raw_responses.append(content)
                    try:
                        data = _loads(content)
                    except json.JSONDecodeError as e:
                        kind, msg = "malformed JSON", f"{e}; answer starts {content[:120]!r}"
                    else:
                        try:
                            layout = parse_plan(data, width=self.width, height=self.height, n_instances=self.n_range,
                                                report=report, min_overlap=self.min_overlap)
                        except PlanSchemaError as e:
                            kind, msg = "schema violation", str(e)
                            _reset_instance_records(report)
                        else:
                            report.n_retries = report.n_requests - 1
                            return PlannedLayout(layout=layout, planner_label=self.label, report=report, raw=content,
                                                 prompt=prompt, scene_type=scene_type, seed=seed)
                    # tell the model what was wrong (replacing any earlier correction, so messages stay bounded)
                    messages = base + [{"role": "assistant", "content": content},
                                       {"role": "user", "content": f"That answer is invalid ({kind}: {msg}). Answer "
                                                                   f"again with one JSON object that follows the "
                                                                   f"schema and the box convention exactly."}]
            report.errors.append(f"attempt {attempt + 1}: {kind}: {msg}")
            if attempt < self.max_retries:
                delay = self._backoff(attempt, retry_after)
                report.wait_s += delay
                time.sleep(delay)
        report.n_retries = report.n_requests - 1
        raise PlannerError(f"{self.label} at {self.base_url or OPENAI_URL}: no valid layout after {report.n_requests} "
                           f"attempts (max_retries={self.max_retries}); last error: {report.errors[-1]}", report)


def _reset_instance_records(report: PlanReport) -> None:
    """Repairs/rejections of an answer that was then refused as a whole do not count."""
    report.n_repaired = report.n_rejected = 0
    report.repaired.clear()
    report.rejected.clear()
    report.categories.clear()


def _content(resp: Any) -> tuple[str | None, str | None]:
    """(message content, None) or (whatever text there is, a description of what is wrong with the envelope)."""
    try:
        choice = resp.choices[0]
        content = choice.message.content
    except (AttributeError, IndexError, TypeError, KeyError):
        return None, "the response has no choices[0].message (not a chat-completions answer)"
    if not isinstance(content, str) or not content.strip():
        return content, f"empty message content (finish_reason={getattr(choice, 'finish_reason', None)!r})"
    if getattr(choice, "finish_reason", None) == "length":
        return content, "the answer was cut off (finish_reason='length'); raise max_tokens"
    return content, None


def _error_text(e: Exception) -> str:
    try:
        text = e.response.text[:500]
    except Exception:  # noqa: BLE001
        text = str(e)[:500]
    return text if text.strip() else "(empty body)"


def _retry_after(e: Exception) -> float | None:
    try:
        v = e.response.headers.get("retry-after")
        return float(v) if v is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


# -----------------------------------------------------------------------------
# offline template planner

# rough (width, height) as fractions of the canvas, for plausible template boxes
_SIZE_PRIOR = {
    "person": (0.18, 0.5), "dog": (0.25, 0.2), "cat": (0.18, 0.18), "horse": (0.35, 0.32), "sheep": (0.22, 0.18),
    "cow": (0.32, 0.26), "bird": (0.08, 0.07), "car": (0.38, 0.2), "bus": (0.5, 0.3), "truck": (0.45, 0.3),
    "bicycle": (0.26, 0.18), "motorcycle": (0.28, 0.2), "bench": (0.35, 0.15), "chair": (0.15, 0.22),
    "couch": (0.45, 0.22), "dining table": (0.4, 0.2), "bed": (0.5, 0.3), "tv": (0.25, 0.18),
    "potted plant": (0.12, 0.2), "umbrella": (0.25, 0.2), "traffic light": (0.06, 0.16), "cup": (0.06, 0.07),
    "bottle": (0.05, 0.12), "laptop": (0.2, 0.14), "airplane": (0.45, 0.18), "boat": (0.35, 0.18),
    "elephant": (0.4, 0.38), "giraffe": (0.22, 0.55), "zebra": (0.3, 0.25), "bear": (0.3, 0.28),
}
_SCENE_TEMPLATES = {
    "indoor": ("couch", "tv", "potted plant", "cat", "chair", "dining table", "cup"),
    "outdoor": ("person", "dog", "bench", "bicycle", "tree", "car", "umbrella"),
    "nature": ("tree", "bird", "horse", "sheep", "cow", "mountain", "person"),
    "commercial": ("person", "handbag", "car", "bench", "potted plant", "umbrella", "cup"),
    "industrial": ("truck", "person", "forklift", "crane", "car", "barrel", "traffic light"),
    "transport": ("bus", "car", "person", "traffic light", "bicycle", "truck", "motorcycle"),
    "recreational": ("person", "frisbee", "dog", "kite", "bench", "sports ball", "bicycle"),
    "special event": ("person", "balloon", "cake", "chair", "dining table", "cup", "wine glass"),
    "agricultural": ("tractor", "cow", "sheep", "person", "horse", "dog", "truck"),
}
_NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "pair": 2, "couple": 2,
            **{str(k): k for k in range(2, 10)}}
_ADJECTIVES = frozenset("red green blue yellow white black brown orange pink purple gray grey golden silver small big "
                        "large little tall old young wooden fluffy striped spotted shiny".split())


def _nouns(prompt: str) -> list[tuple[str, str]]:
    """(category label, caption) for every COCO class / synonym named in the prompt, in order, with counts."""
    words = _clean(prompt, strip_articles=False).split() if prompt else []
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        hit = None
        for n in (3, 2, 1):  # longest match first ("traffic light", "teddy bear")
            if i + n > len(words):
                continue
            phrase = words[i:i + n]
            for cand in [" ".join(phrase)] + [" ".join(phrase[:-1] + [s]) for s in _singulars(phrase[-1])]:
                found = _lookup(cand)
                if found:
                    hit = (found[0], " ".join(phrase), n)
                    break
            if hit:
                break
        if hit is None:
            i += 1
            continue
        label, text, n = hit
        count = _NUMBERS.get(words[i - 1], 1) if i > 0 else 1
        adjective = words[i - 1] if i > 0 and words[i - 1] in _ADJECTIVES else None
        if adjective is None and i > 1 and words[i - 1] in _NUMBERS and words[i - 2] in _ADJECTIVES:
            adjective = words[i - 2]
        head = text.split()
        if count > 1:
            head[-1] = next((s for s in _singulars(head[-1]) if _lookup(" ".join(head[:-1] + [s]))), head[-1])
        singular = " ".join(head)
        caption = f"a {adjective + ' ' if adjective else ''}{singular}"
        out += [(label, caption)] * count
        i += n
    return out


class OfflinePlanner:
    """A deterministic template planner (no network) for smoke runs: instances from the COCO nouns (and synonyms,
    counts like "two dogs", a colour/size adjective) named in the prompt, topped up from a scene template; boxes
    from rough per-class size priors placed by a seeded RNG. The same (prompt, seed) always gives the same layout.

    Its layouts are NOT an LLM's: ``planner_label``, ``PlannedLayout.to_json()['planner']`` and plan_report.json
    all say ``"offline-template"``.
    """

    label = OFFLINE_LABEL

    def __init__(self, *, width: int = 512, height: int = 512, n_instances: int | tuple[int, int] = (3, 8),
                 scene_types: Sequence[str] = SCENE_TYPES, seed: int = 0):
        if not scene_types:
            raise ValueError("scene_types must not be empty")
        self.width, self.height = int(width), int(height)
        self.n_range = _count_range(n_instances)
        self.scene_types = tuple(scene_types)
        self.seed = int(seed)

    def settings(self) -> dict:
        return {"planner": self.label, "canvas": [self.width, self.height], "n_instances": list(self.n_range),
                "scene_types": list(self.scene_types), "seed": self.seed,
                "note": "deterministic template layouts for smoke runs; not produced by a language model"}

    def plan(self, prompt: str | None = None, *, seed: int | None = None,
             scene_type: str | None = None) -> PlannedLayout:
        seed = _resolve_seed(seed, self.seed)
        rng = np.random.default_rng([seed, _stable_hash(prompt or "")])
        if scene_type is None:
            scene_type = self.scene_types[int(rng.integers(len(self.scene_types)))]
        lo, hi = self.n_range
        items = _nouns(prompt or "")[:hi]
        template = _SCENE_TEMPLATES.get(scene_type, _SCENE_TEMPLATES["outdoor"])
        target = max(lo, len(items)) if items else int(rng.integers(lo, hi + 1))
        start = int(rng.integers(len(template)))
        while len(items) < target:
            name = template[(start + len(items)) % len(template)]
            items.append((map_category(name).label, f"a {name}"))
        caption = prompt or f"a {scene_type} scene with " + ", ".join(c for _, c in items)
        report = PlanReport()
        instances = []
        w_px, h_px = self.width, self.height
        for label, inst_caption in items:
            bw, bh = _SIZE_PRIOR.get(label, (0.2, 0.2))
            scale = float(rng.uniform(0.75, 1.25))
            bw, bh = min(bw * scale, 0.95), min(bh * scale, 0.95)
            x0 = float(rng.uniform(0.0, 1.0 - bw))
            y0 = float(rng.uniform(max(0.0, 0.55 - bh), 1.0 - bh))  # objects stand in the lower part of the frame
            box = tuple(round(v, 4) for v in (x0 * w_px, y0 * h_px, (x0 + bw) * w_px, (y0 + bh) * h_px))
            match = map_category(label)
            report.categories.append(asdict(match))
            instances.append(Instance(caption=inst_caption, box=(box[0] / w_px, box[1] / h_px, box[2] / w_px,
                                                                 box[3] / h_px), category=match.label))
        layout = Layout(caption=caption, width=w_px, height=h_px, instances=instances).validate()
        raw = {"planner": self.label, "prompt": prompt, "scene_type": scene_type, "seed": seed,
               "instances": [{"category": label, "caption": c} for label, c in items]}
        return PlannedLayout(layout=layout, planner_label=self.label, report=report, raw=raw, prompt=prompt,
                             scene_type=scene_type, seed=seed)


def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


# -----------------------------------------------------------------------------
# batches


def plan_many(prompts_or_n: int | str | Sequence[str], planner: LLMPlanner | OfflinePlanner,
              out_dir: str | os.PathLike, *, n_per_prompt: int = 1, seed: int | None = None,
              on_error: str = "record") -> dict:
    """Plan many layouts and write them to ``out_dir``; returns the plan report (also written as plan_report.json).

    ``prompts_or_n``: an int n (n invented scenes, scene types drawn by the seed), one prompt, or a list of
    prompts; each prompt is planned ``n_per_prompt`` times. Layout k gets seed ``seed + k`` (``seed`` defaults to the
    planner's; None = unseeded). Files: ``layout_0000.json``, ... in the official InstanceDiffusion demo format, i.e.
    ``bbox = [x, y, w, h]`` in pixels of ``width`` x ``height``, converted from the planned corner boxes as
    ``[x0, y0, x1 - x0, y1 - y0]``; plus provenance keys the official code ignores (``planner``, ``prompt``,
    ``scene_type``, ``seed``, per instance ``is_coco``). ``Layout.from_json(file)`` reads them back.

    ``on_error``: ``"record"`` (a layout that fails after its retries is listed under ``failed`` with the
    error and its attempts, and the batch goes on) or ``"raise"``.
    """
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    if isinstance(prompts_or_n, (int, np.integer)) and not isinstance(prompts_or_n, bool):
        if prompts_or_n < 1:
            raise ValueError(f"need at least one layout, got n={prompts_or_n}")
        jobs: list[str | None] = [None] * int(prompts_or_n)
    elif isinstance(prompts_or_n, str):
        jobs = [prompts_or_n] * n_per_prompt
    else:
        jobs = [p for p in prompts_or_n for _ in range(n_per_prompt)]
        if not jobs:
            raise ValueError("no prompts given")
    base_seed = seed if seed is not None else planner.seed  # None: no seed is sent (an LLM planner with seed=None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries, failed, reports = [], [], []
    for k, prompt in enumerate(jobs):
        s = None if base_seed is None else int(base_seed) + k
        try:
            planned = planner.plan(prompt, seed=s)
        except PlannerError as e:
            if on_error == "raise":
                raise
            rep = e.report or PlanReport()
            reports.append(rep)
            failed.append({"index": k, "prompt": prompt, "seed": s, "error": str(e), "report": rep.to_dict()})
            continue
        reports.append(planned.report)
        name = f"layout_{k:04d}.json"
        (out / name).write_text(json.dumps(planned.to_json(), indent=1) + "\n")
        entries.append({"index": k, "file": name, "prompt": prompt, "scene_type": planned.scene_type, "seed": s,
                        "planner": planned.planner_label, "caption": planned.layout.caption,
                        "boxes_xyxy_px": [[round(v, 4) for v in b] for b in planned.boxes_xyxy_px()],
                        "report": planned.report.to_dict(),
                        "raw": planned.raw})
    doc = {
        "planner": planner.label,
        "settings": planner.settings(),
        "box_conventions": {
            "planner_answer": "box_xyxy = [x0, y0, x1, y1] (left, top, right, bottom) in pixels of the canvas",
            "layout_files": "official InstanceDiffusion format: bbox = [x, y, w, h] in pixels = "
                            "[x0, y0, x1 - x0, y1 - y0]",
            "this_report": "boxes_xyxy_px = the planned boxes after repair, [x0, y0, x1, y1] pixels",
        },
        "n_requested": len(jobs), "n_written": len(entries), "n_failed": len(failed),
        "totals": PlanReport.total(reports),
        "layouts": entries, "failed": failed,
    }
    (out / "plan_report.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc
