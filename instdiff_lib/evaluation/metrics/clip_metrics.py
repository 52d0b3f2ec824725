"""CLIP metrics: attribute binding (Acc and CLIP_local on GT-box crops) and the global CLIP score.

Attribute binding mirrors the official ``eval/eval_attribute_binding.py`` (shared/spec/instancediffusion_official.md
§4.4, prior_reproductions.md §1.9):

* the crops are the GT boxes (not detections): the first 30 annotations of each image, in the resized-GT frame,
  scaled to the generated image's size and cut with ``PIL.Image.crop`` (float box; PIL rounds it);
* CLIP is open_clip ``ViT-L-14`` / ``laion2b_s32b_b82k`` with its eval preprocess (shortest side to 224, bicubic,
  centre crop 224). Note: open_clip's config for this tag normalises with mean = std = (0.5, 0.5, 0.5)
  (``INCEPTION_MEAN/STD``), not the OpenAI CLIP statistics; :func:`load_clip` keeps the tag's values, also when the
  weights come from a local file (``preprocess_tag``);
* CLIP_local = raw cosine (L2-normalised features, no x100) between the crop and its instance phrase ("red person");
* accuracy = zero-shot argmax of the crop over the prompts ``"a {attribute} object"`` of the whole vocabulary
  (8 colours or 8 textures), correct when it picks the instance's attribute (official: the phrase's first word);
* aggregation: mean over the instances of an image, then mean over images. Crops that cannot be scored
  (zero-size box, attribute outside the vocabulary, missing image) are skipped, as the official ``try/except`` does,
  but here each one is counted in ``n_skipped`` with its reason.

Unlike the official loop (one crop and one phrase per CLIP call), crops of many images are encoded in batches and
the text features (vocabulary prompts, unique phrases) are computed once.

The CLIP model is passed around as a ``(model, preprocess, tokenizer)`` triple: :func:`load_clip` builds the real one
(weights from the Hugging Face cache or a local file, never a 47 s retry loop when offline), :func:`tiny_clip` a small
random one for tests and the Shapes mini world, and any hand-built triple with ``encode_image``/``encode_text`` works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from instdiff_lib.offline import hub_offline, offline_reason, reachable  # noqa: F401  (re-exported)
from instdiff_lib.evaluation.metrics import MetricResult

__all__ = [
    "COLORS", "TEXTURES", "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "MAX_INSTANCES", "TINY_CLIP_CONFIG",
    "MetricWeightsError", "Clip", "AttributeItem",
    "load_clip", "tiny_clip", "as_clip", "crop_instance", "attribute_binding", "clip_score",
    "hub_offline", "reachable", "offline_reason",
]

log = logging.getLogger(__name__)

# The official vocabularies (eval_attribute_binding.py); the attribute of annotation `id` is vocab[id % 8].
COLORS = ("black", "white", "red", "green", "yellow", "blue", "pink", "purple")
TEXTURES = ("rubber", "fluffy", "metallic", "wooden", "plastic", "fabric", "leather", "glass")
DEFAULT_MODEL = "ViT-L-14"
DEFAULT_PRETRAINED = "laion2b_s32b_b82k"  # written 'laion2b-s32b-b82k' in the official script (same tag)
MAX_INSTANCES = 30  # official max_objs: only the first 30 annotations of an image are scored
PROMPT = "a {} object"  # official zero-shot label prompt

# A tiny open_clip architecture (~3.4 M parameters, mostly the token embedding) for tests and smoke runs.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class MetricWeightsError(RuntimeError):
    """Weights a metric needs are not available (offline and not cached, or a missing file); says how to get them."""


class Clip(NamedTuple):
    model: torch.nn.Module  # has encode_image(B,3,H,W) and encode_text(B,L)
    preprocess: Callable[[Image.Image], torch.Tensor]  # PIL image -> (3, H, W)
    tokenizer: Callable[[list[str]], torch.Tensor]  # list of strings -> (B, L) token ids


@dataclass(frozen=True)
class AttributeItem:
    """One generated image's instances for attribute binding, in the (resized) GT frame.

    ``boxes`` are COCO ``[x, y, w, h]`` in a ``width`` x ``height`` frame (the 512² resized GT of the protocol);
    they are scaled to the generated image's actual size. ``attributes[k]`` is the attribute that instance k was
    generated with; ``None`` parses it as the first word of the phrase, like the official script.
    """

    image_id: Any
    width: float
    height: float
    boxes: Sequence[Sequence[float]]
    phrases: Sequence[str]
    attributes: Sequence[str] | None = None

    def __post_init__(self):
        if len(self.boxes) != len(self.phrases):
            raise ValueError(f"image {self.image_id}: {len(self.boxes)} boxes but {len(self.phrases)} phrases")
        if self.attributes is not None and len(self.attributes) != len(self.phrases):
            raise ValueError(f"image {self.image_id}: {len(self.attributes)} attributes, {len(self.phrases)} phrases")
        if not (self.width > 0 and self.height > 0):
            raise ValueError(f"image {self.image_id}: GT frame size must be positive, not {self.width}x{self.height}")

    def attribute(self, k: int) -> str:
        return self.attributes[k] if self.attributes is not None else self.phrases[k].split(" ")[0]


# ---- loading CLIP -----------------------------------------------------------------------------------
def _hub_cache_dirs(cache_dir: str | os.PathLike | None) -> list[str | None]:
    """Where a cached hub file may be: the explicit dir, else the cache the env names now, else huggingface_hub's."""
    if cache_dir is not None:
        return [str(cache_dir)]
    dirs: list[str | None] = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    dirs.append(None)  # huggingface_hub's default (resolved when it was imported)
    return dirs


def _hub_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """open_clip's ``'org/repo/filename'`` (or ``'org/repo/'``) -> repo id and the files it would try, in order."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    names = []
    if filename == HF_WEIGHTS_NAME:  # open_clip prefers a safetensors twin when one exists
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return repo_id, names + [filename]


def _cached_tag_file(cfg: dict, cache_dir) -> tuple[str | None, str]:
    """(local file holding the tag's weights or None, where it would come from)."""
    if cfg.get("file"):
        return (cfg["file"] if os.path.isfile(cfg["file"]) else None), cfg["file"]
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, names = _hub_candidates(cfg["hf_hub"])
        for d in _hub_cache_dirs(cache_dir):
            for name in names:
                hit = try_to_load_from_cache(repo_id, name, cache_dir=d)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit, f"https://huggingface.co/{repo_id}/resolve/main/{names[-1]}"
        return None, f"https://huggingface.co/{repo_id}/resolve/main/{names[-1]}"
    url = cfg.get("url", "")
    target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    return (target if os.path.isfile(target) else None), url


def _register_config(cfg: dict) -> str:
    """Register a model-config dict with open_clip (``add_model_config`` on a JSON file) and return its name."""
    import open_clip

    text = json.dumps(cfg, sort_keys=True)
    name = "instdiff-custom-" + hashlib.sha1(text.encode()).hexdigest()[:12]
    if name not in open_clip.list_models():
        folder = Path(tempfile.gettempdir()) / "instdiff_open_clip_configs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.json"
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        tmp.replace(path)
        open_clip.add_model_config(path)
    return name


def load_clip(model_name: str | dict = DEFAULT_MODEL, pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
              device: str | torch.device = "cpu", *, cache_dir: str | None = None,
              preprocess_tag: str | None = None, probe_timeout: float = 2.0) -> Clip:
    """An open_clip ``(model, eval preprocess, tokenizer)`` triple in eval mode.

    ``model_name``: an open_clip architecture name (or ``'local-dir:'``/``'hf-hub:'`` schema), or a model-config dict
    (``{"embed_dim", "vision_cfg", "text_cfg"}``, registered with ``open_clip.add_model_config``).
    ``pretrained``: an open_clip tag, a local checkpoint file, or None (random init).

    A tag is resolved here before open_clip sees it: if its file is in the Hugging Face cache (``cache_dir``, else
    ``$HF_HUB_CACHE`` / ``$HF_HOME/hub``, else huggingface_hub's default) it is loaded from that path with the tag's
    preprocessing, so no network request is made. If it is not cached and the process is offline (``HF_HUB_OFFLINE``
    truthy, read at call time) or the hub does not answer a TCP probe within ``probe_timeout`` s, a
    :class:`MetricWeightsError` is raised at once, instead of huggingface_hub's ~47 s retry loop. Only when the
    hub is reachable does open_clip download the weights.

    ``preprocess_tag``: apply that tag's preprocessing (mean/std/interpolation/resize mode) whatever the weights;
    e.g. ``preprocess_tag='laion2b_s32b_b82k'`` with a local copy of the protocol's weights.
    For ``'hf-hub:'`` names the cache check covers ``open_clip_config.json`` only; a cached repo with the hub
    unreachable and ``HF_HUB_OFFLINE`` unset still goes through huggingface_hub's retries.
    """
    import open_clip

    if isinstance(model_name, Mapping):
        model_name = _register_config(dict(model_name))
    kwargs: dict[str, Any] = {}

    def tag_preprocess(cfg: dict) -> dict:
        keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                "resize_mode": "image_resize_mode"}
        return {kw: cfg[k] for k, kw in keys.items() if cfg.get(k) is not None}

    schema = model_name.split(":", 1)[0] if ":" in model_name else None
    if schema == "hf-hub":
        from huggingface_hub import constants

        repo_id = model_name[len("hf-hub:"):]
        why = None if is_hub_model_cached(repo_id, cache_dir) else offline_reason(constants.ENDPOINT, probe_timeout)
        if why:
            raise MetricWeightsError(
                f"open_clip model {model_name!r} is not in the Hugging Face cache and cannot be downloaded ({why}). "
                f"Run load_clip({model_name!r}) once with network access, or download the repo {repo_id} and pass "
                f"model_name='local-dir:<folder>'.")
        checkpoint = None  # open_clip reads config and weights through huggingface_hub (from its cache if offline)
    elif pretrained is None or schema == "local-dir":
        checkpoint = None
    else:
        pretrained = os.fspath(pretrained)
        tag_cfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
        if tag_cfg:
            local, source = _cached_tag_file(tag_cfg, cache_dir)
            if local is not None:
                checkpoint = local
                kwargs.update(tag_preprocess(tag_cfg))
            else:
                from huggingface_hub import constants

                host = constants.ENDPOINT if tag_cfg.get("hf_hub") else source
                why = offline_reason(host, probe_timeout)
                if why:
                    raise MetricWeightsError(
                        f"open_clip weights {model_name!r} / {pretrained!r} are not cached and cannot be downloaded "
                        f"({why}). Either run load_clip({model_name!r}, {pretrained!r}) once on a machine with "
                        f"network access and copy its Hugging Face cache (HF_HOME / HF_HUB_CACHE) here, or download "
                        f"{source} and pass pretrained='<that file>', preprocess_tag={pretrained!r}.")
                checkpoint = pretrained  # reachable: let open_clip download it the normal way
        elif os.path.isfile(pretrained):
            checkpoint = pretrained
            if preprocess_tag is None:
                log.warning("load_clip: %s loaded from a file without preprocess_tag; using the architecture's default "
                            "normalisation (pass preprocess_tag=<tag> to use a tag's mean/std).", pretrained)
        elif os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors", ".ckpt")):
            raise MetricWeightsError(f"CLIP checkpoint file not found: {pretrained}")
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
            raise ValueError(f"{pretrained!r} is neither an open_clip tag of {model_name!r} {tags} nor a file")
    if preprocess_tag is not None:
        cfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), preprocess_tag)
        if not cfg:
            raise ValueError(f"preprocess_tag {preprocess_tag!r} is not an open_clip tag of {model_name!r}")
        kwargs.update(tag_preprocess(cfg))

    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=checkpoint, device=device, cache_dir=cache_dir, **kwargs)
    tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    return Clip(model.eval(), preprocess, tokenizer)


def is_hub_model_cached(repo_id: str, cache_dir=None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, "open_clip_config.json", cache_dir=d), str)
               for d in _hub_cache_dirs(cache_dir))


def tiny_clip(seed: int = 0, image_size: int = 32, device: str | torch.device = "cpu") -> Clip:
    """A small random open_clip model (:data:`TINY_CLIP_CONFIG`, builds in < 1 s) with the real BPE tokenizer."""
    cfg = json.loads(json.dumps(TINY_CLIP_CONFIG))
    cfg["vision_cfg"]["image_size"] = image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_clip(cfg, pretrained=None, device=device)


def as_clip(clip: Clip | Sequence) -> Clip:
    """Accept a :class:`Clip` or any ``(model, preprocess, tokenizer)`` triple; put the model in eval mode."""
    if not (isinstance(clip, Sequence) and len(clip) == 3):
        raise TypeError("clip must be a (model, preprocess, tokenizer) triple, e.g. load_clip() or tiny_clip()")
    model, preprocess, tokenizer = clip
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise TypeError("clip model must have encode_image and encode_text (an open_clip model)")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return Clip(model, preprocess, tokenizer)


# ---- encoding -------------------------------------------------------------------------------------
def _placement(model) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _l2(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / torch.linalg.norm(x, dim=-1, keepdim=True)  # official normalisation (no eps)


@torch.inference_mode()
def _encode_texts(clip: Clip, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """(N, D) L2-normalised text features on the CPU, in float32."""
    device, _ = _placement(clip.model)
    out = [_l2(clip.model.encode_text(clip.tokenizer(list(texts[i:i + batch_size])).to(device))).cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.inference_mode()
def _encode_images(clip: Clip, pixels: list[torch.Tensor]) -> torch.Tensor:
    """(N, D) L2-normalised image features of preprocessed (3, H, W) tensors, on the CPU in float32."""
    device, dtype = _placement(clip.model)
    return _l2(clip.model.encode_image(torch.stack(pixels).to(device=device, dtype=dtype))).cpu()


def _open(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    with Image.open(source) as im:
        return im.convert("RGB")


# ---- attribute binding ----------------------------------------------------------------------------
def crop_instance(image: Image.Image, box: Sequence[float], gt_width: float, gt_height: float) -> Image.Image:
    """The official crop: ``[x, y, w, h]`` in the GT frame -> fractions -> pixels of ``image``; PIL rounds the box."""
    x, y, w, h = (float(v) for v in box)
    x0, y0 = x / gt_width, y / gt_height
    x1, y1 = (x + w) / gt_width, (y + h) / gt_height
    return image.crop((x0 * image.width, y0 * image.height, x1 * image.width, y1 * image.height))


def attribute_binding(items: Sequence[AttributeItem], images: Mapping[Any, Any], clip: Clip | Sequence,
                      attribute_vocab: Sequence[str] = COLORS, *, batch_size: int = 64,
                      max_instances: int = MAX_INSTANCES, per_image: bool = False) -> MetricResult:
    """Attribute-binding accuracy and CLIP_local (spec §4.4) of generated ``images`` (id -> path or PIL image).

    ``values``: ``acc`` (fraction in [0, 1]; the paper's table shows x100) and ``clip_local`` (raw cosine), each a
    per-image mean over scored instances, then a mean over images that have at least one scored instance.
    ``n_evaluated`` / ``n_skipped`` count instances (crops), not images; ``skipped`` holds
    ``((image_id, instance_index), reason)``.
    ``details``: ``n_images`` (images averaged), ``n_images_without_instances``, ``acc_by_attribute`` (pooled over
    crops), the vocabulary, and with ``per_image=True`` the per-image means and ``per_crop`` (asked vs
    predicted attribute of every scored crop).
    """
    clip = as_clip(clip)
    vocab = list(attribute_vocab)
    if not vocab or len(set(vocab)) != len(vocab):
        raise ValueError(f"attribute_vocab must be non-empty and without duplicates, got {vocab}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    index = {a: i for i, a in enumerate(vocab)}

    prompt_feats = _encode_texts(clip, [PROMPT.format(a) for a in vocab], batch_size)  # (V, D)
    phrases = sorted({p for it in items for p in list(it.phrases)[:max_instances]})
    phrase_row = {p: i for i, p in enumerate(phrases)}
    phrase_feats = _encode_texts(clip, phrases, batch_size)  # (P, D)

    scores: list[list[tuple[float, int, int]]] = [[] for _ in items]  # per image: (cosine, correct, attribute)
    crops: list[dict] = []  # per scored crop (per_image=True): which attribute was asked, which one CLIP saw
    skipped: list[tuple] = []
    pending: list[tuple[int, int, int, torch.Tensor, int]] = []  # (item, phrase row, attribute, pixels, instance)
    n_without = 0

    def flush():
        if not pending:
            return
        feats = _encode_images(clip, [p[3] for p in pending])  # (B, D)
        rows = torch.tensor([p[1] for p in pending])
        cos = (feats * phrase_feats[rows]).sum(-1)  # (B,) CLIP_local
        pred = (feats @ prompt_feats.T).argmax(-1)  # (B,) zero-shot attribute
        for (i, _, a, _, k), c, p in zip(pending, cos.tolist(), pred.tolist()):
            scores[i].append((c, int(p == a), a))
            if per_image:
                crops.append({"image_id": items[i].image_id, "instance": k, "attribute": vocab[a],
                              "predicted": vocab[p], "clip_local": c})
        pending.clear()

    for i, item in enumerate(items):
        n = min(len(item.boxes), max_instances)
        if n == 0:
            n_without += 1
            continue
        try:
            image = _open(images[item.image_id])
        except (KeyError, OSError, ValueError, ImportError) as e:  # ImportError: ultralytics' PIL.Image.open patch
            reason = "no image" if isinstance(e, KeyError) else f"unreadable image: {type(e).__name__}: {e}"
            skipped.extend(((item.image_id, k), reason) for k in range(n))
            continue
        for k in range(n):
            attr = item.attribute(k)
            if attr not in index:
                skipped.append(((item.image_id, k), f"attribute {attr!r} not in the vocabulary"))
                continue
            try:
                crop = crop_instance(image, item.boxes[k], item.width, item.height)
                if crop.width == 0 or crop.height == 0:
                    reason = f"zero-size crop {crop.width}x{crop.height} of box {list(item.boxes[k])}"
                    skipped.append(((item.image_id, k), reason))
                    continue
                pixels = clip.preprocess(crop)
            except Exception as e:  # noqa: BLE001 - the official loop skips any crop that raises
                skipped.append(((item.image_id, k), f"crop failed: {type(e).__name__}: {e}"))
                continue
            pending.append((i, phrase_row[item.phrases[k]], index[attr], pixels, k))
            if len(pending) >= batch_size:
                flush()
    flush()

    # per image: (image id, mean cosine, mean accuracy, #instances); then the plain mean over images
    image_means = [(items[i].image_id, float(np.mean([t[0] for t in s])), float(np.mean([t[1] for t in s])), len(s))
                   for i, s in enumerate(scores) if s]
    nan = float("nan")
    values = {"acc": float(np.mean([m[2] for m in image_means])) if image_means else nan,
              "clip_local": float(np.mean([m[1] for m in image_means])) if image_means else nan}
    hits: dict[str, list[int]] = {a: [] for a in vocab}
    for _, ok, a in (t for s in scores for t in s):
        hits[vocab[a]].append(ok)
    details = {
        "n_images": len(image_means),
        "n_images_total": len(items),
        "n_images_without_instances": n_without,
        "attribute_vocab": vocab,
        "prompt": PROMPT,
        "max_instances": max_instances,
        "acc_by_attribute": {a: (float(np.mean(h)) if h else nan) for a, h in hits.items()},
        "n_by_attribute": {a: len(h) for a, h in hits.items()},
    }
    if per_image:
        details["per_image"] = [{"image_id": m[0], "clip_local": m[1], "acc": m[2], "n": m[3]} for m in image_means]
        details["per_crop"] = crops
    n_eval = sum(len(s) for s in scores)
    return MetricResult(values=values, n_evaluated=n_eval, n_skipped=len(skipped), skipped=skipped, details=details)


# ---- global CLIP score ----------------------------------------------------------------------------
def clip_score(images: Sequence[Any], prompts: Sequence[str], clip: Clip | Sequence,
               batch_size: int = 64) -> MetricResult:
    """Mean raw cosine between each whole image (path or PIL; CLIP eval preprocess) and its prompt.

    No official script exists (spec §4.5); this is the plain mean cosine on the same scale as CLIP_local (not
    x100, not the 2.5 * max(cos, 0) "CLIPScore"). Unreadable images are skipped as ``(index, reason)``.
    """
    clip = as_clip(clip)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    skipped: list[tuple] = []
    cosines: list[float] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush():
        if not pending:
            return
        img = _encode_images(clip, [p[1] for p in pending])
        txt = _encode_texts(clip, [prompts[i] for i, _ in pending], batch_size)
        cosines.extend((img * txt).sum(-1).tolist())
        pending.clear()

    for i, source in enumerate(images):
        try:
            pending.append((i, clip.preprocess(_open(source))))
        except Exception as e:  # noqa: BLE001 - one unreadable file must not end a 5k-image run
            skipped.append((i, f"{type(e).__name__}: {e}"))
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    value = float(np.mean(cosines)) if cosines else float("nan")
    return MetricResult(values={"clip_score": value}, n_evaluated=len(cosines), n_skipped=len(skipped),
                        skipped=skipped, details={"n_images_total": len(images)})
