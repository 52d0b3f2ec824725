"""CLIP metrics: attribute binding (crop placement, aggregation, skips, batching) and load_clip offline behaviour.

Known-answer cases use a tiny random open_clip model whose encoders are replaced by a deterministic fake: an
image's embedding is its mean RGB colour, a text's embedding is the one-hot colour its words name. So every cosine
and every zero-shot prediction can be worked out by hand.
"""

import re
import time

import numpy as np
import open_clip  # imported here so that the timed tests below do not time its import (~5 s)
import pytest
import torch
from PIL import Image

from instdiff_lib.evaluation.metrics import MetricResult
from instdiff_lib.evaluation.metrics import clip_metrics as cm
from instdiff_lib.evaluation.metrics.clip_metrics import AttributeItem, MetricWeightsError, attribute_binding, clip_score

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
VOCAB = ("red", "green", "blue")
ONE_HOT = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    return cm.tiny_clip(seed=0)


@pytest.fixture
def colour_clip():
    """A tiny open_clip model with fake encoders: image -> mean RGB in [0, 1]; text -> one-hot of its colour word."""
    model, preprocess, tokenizer = cm.tiny_clip(seed=0)
    norm = preprocess.transforms[-1]  # Normalize(mean, std): undone to read the crop's colour
    mean, std = torch.tensor(norm.mean).view(1, 3, 1, 1), torch.tensor(norm.std).view(1, 3, 1, 1)

    def encode_image(x):
        return (x * std + mean).mean(dim=(2, 3))  # (B, 3)

    def encode_text(tokens):
        out = []
        for ids in tokens.tolist():
            text = tokenizer.decode(ids[1:ids.index(49407)])  # between <start_of_text> and <end_of_text>
            words = [w for w in re.findall(r"[a-z]+", text) if w in ONE_HOT]
            out.append(ONE_HOT[words[0]] if words else [1.0, 1.0, 1.0])  # no colour word: equally far from all
        return torch.tensor(out)

    model.encode_image, model.encode_text = encode_image, encode_text
    return model, preprocess, tokenizer


def solid(colour, w=64, h=64):
    return Image.new("RGB", (w, h), RGB[colour])


def quadrants(w=64, h=48):
    """Top-left red, top-right blue, bottom-left green, bottom-right red."""
    im = Image.new("RGB", (w, h))
    for (x0, y0), c in {(0, 0): "red", (w // 2, 0): "blue", (0, h // 2): "green", (w // 2, h // 2): "red"}.items():
        im.paste(RGB[c], (x0, y0, x0 + w // 2, y0 + h // 2))
    return im


def test_crop_scales_gt_box_to_image():
    im = Image.new("RGB", (64, 32))
    crop = cm.crop_instance(im, [40, 20, 60, 24], gt_width=128, gt_height=64)  # x scale 1/2, y scale 1/2
    assert crop.size == (30, 12)
    im = Image.fromarray(np.arange(64 * 32 * 3, dtype=np.uint8).reshape(32, 64, 3) % 251)
    crop = cm.crop_instance(im, [16, 8, 32, 16], gt_width=128, gt_height=64)
    assert np.array_equal(np.asarray(crop), np.asarray(im)[4:12, 8:24])


def test_crops_come_from_the_right_place(colour_clip):
    # GT frame 256 x 96, image 64 x 48: x and y scale differ (1/4, 1/2), so swapped axes would land elsewhere.
    boxes = [[8, 4, 112, 40], [136, 4, 112, 40], [8, 52, 112, 40], [136, 52, 112, 40]]
    item = AttributeItem("q", 256, 96, boxes, ["red a", "blue b", "green c", "red d"])
    r = attribute_binding([item], {"q": quadrants()}, colour_clip, VOCAB, per_image=True)
    assert isinstance(r, MetricResult)
    assert r.values["acc"] == 1.0
    assert r.values["clip_local"] == pytest.approx(1.0, abs=1e-6)
    assert (r.n_evaluated, r.n_skipped) == (4, 0)
    # the same boxes with the phrases of the transposed layout are all wrong (blue and green swapped)
    item = AttributeItem("q", 256, 96, boxes, ["red a", "green b", "blue c", "red d"])
    r = attribute_binding([item], {"q": quadrants()}, colour_clip, VOCAB)
    assert r.values["acc"] == 0.5 and r.values["clip_local"] == pytest.approx(0.5, abs=1e-6)


def test_mixed_crop_cosine(colour_clip):
    # left half red, right half blue; a box 2/3 on red, 1/3 on blue -> mean colour ~(2/3, 0, 1/3)
    im = Image.new("RGB", (96, 96), RGB["blue"])
    im.paste(RGB["red"], (0, 0, 48, 96))
    item = AttributeItem(0, 96, 96, [[24, 0, 36, 96], [24, 0, 36, 96]], ["red x", "blue x"])
    r = attribute_binding([item], {0: im}, colour_clip, VOCAB, per_image=True)
    cos_red, cos_blue = 2 / np.sqrt(5), 1 / np.sqrt(5)  # (2/3, 0, 1/3) normalised, dotted with one-hots
    assert r.values["clip_local"] == pytest.approx((cos_red + cos_blue) / 2, abs=0.02)
    assert r.values["acc"] == 0.5  # both crops are predicted red


def test_aggregation_per_image_then_over_images(colour_clip):
    items = [
        # image A (half red | half blue), GT frame 128 x 128 for a 64 x 64 image
        AttributeItem("A", 128, 128, [[0, 0, 64, 128], [64, 0, 64, 128], [64, 0, 64, 128]],
                      ["red person", "blue car", "red bus"]),  # correct, correct, wrong (cos 1, 1, 0)
        AttributeItem("B", 64, 64, [[0, 0, 64, 64], [10, 10, 0, 5]], ["green cat", "green dog"]),  # correct; zero-size
        AttributeItem("C", 64, 64, [[0, 0, 64, 64]], ["blue dog"]),  # wrong on a red image (cos 0)
        AttributeItem("D", 64, 64, [], []),  # no instances: not averaged, not skipped
    ]
    a = Image.new("RGB", (64, 64), RGB["blue"])
    a.paste(RGB["red"], (0, 0, 32, 64))
    images = {"A": a, "B": solid("green"), "C": solid("red"), "D": solid("red")}
    r = attribute_binding(items, images, colour_clip, VOCAB, batch_size=2, per_image=True)
    # per image: A 2/3, B 1, C 0 -> mean 5/9 (pooled over crops it would be 3/5)
    assert r.values["acc"] == pytest.approx(5 / 9, abs=1e-12)
    assert r.values["clip_local"] == pytest.approx(5 / 9, abs=1e-6)
    assert (r.n_evaluated, r.n_skipped) == (5, 1)
    assert r.skipped[0][0] == ("B", 1) and "zero-size" in r.skipped[0][1]
    assert r.details["n_images"] == 3 and r.details["n_images_without_instances"] == 1
    assert [p["image_id"] for p in r.details["per_image"]] == ["A", "B", "C"]
    assert r.details["acc_by_attribute"]["red"] == 0.5  # pooled: A0 right, A2 wrong
    assert r.details["n_by_attribute"] == {"red": 2, "green": 1, "blue": 2}


def test_skips_and_first_30_instances(colour_clip):
    many = AttributeItem("M", 64, 64, [[0, 0, 64, 64]] * 32, ["red thing"] * 32)
    odd = AttributeItem("O", 64, 64, [[0, 0, 64, 64], [0, 0, 64, 64]], ["red a", "violet b"])  # violet: not in vocab
    explicit = AttributeItem("E", 64, 64, [[0, 0, 64, 64]], ["large red thing"], attributes=["red"])  # not 1st word
    lost = AttributeItem("L", 64, 64, [[0, 0, 8, 8]], ["red y"])  # no image given
    r = attribute_binding([many, odd, explicit, lost], {"M": solid("red"), "O": solid("red"), "E": solid("red")},
                          colour_clip, VOCAB)
    assert r.n_evaluated == 30 + 1 + 1
    reasons = dict(r.skipped)
    assert set(reasons) == {("O", 1), ("L", 0)}
    assert "not in the vocabulary" in reasons[("O", 1)] and reasons[("L", 0)] == "no image"
    assert r.values["acc"] == 1.0


def _reference(items, images, clip, vocab):
    """The official loop: one crop and one phrase per CLIP call, per-image means, then the mean over images."""
    model, preprocess, tokenizer = clip
    norm = lambda x: x / torch.linalg.norm(x, dim=-1, keepdim=True)  # noqa: E731
    with torch.no_grad():
        labels = torch.cat([norm(model.encode_text(tokenizer([f"a {a} object"]))) for a in vocab])
        scores, accs = [], []
        for it in items:
            s, a = [], []
            for box, phrase in list(zip(it.boxes, it.phrases))[:30]:
                crop = cm.crop_instance(images[it.image_id], box, it.width, it.height)
                img = norm(model.encode_image(preprocess(crop).unsqueeze(0)))
                s.append((img * norm(model.encode_text(tokenizer([phrase])))).sum(-1).item())
                a.append(int(np.argmax((img * labels).sum(-1).numpy()) == list(vocab).index(phrase.split(" ")[0])))
            scores.append(np.mean(s))
            accs.append(np.mean(a))
    return np.mean(accs), np.mean(scores)


def test_batched_equals_unbatched_and_official_loop(tiny):
    rng = np.random.default_rng(0)
    items, images = [], {}
    for i in range(3):
        images[i] = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        n = 2 + i
        boxes = [[float(v) for v in rng.uniform((0, 0, 8, 8), (60, 40, 60, 50))] for _ in range(n)]  # x, y, w, h
        phrases = [f"{cm.COLORS[int(rng.integers(8))]} {w}" for w in ("cat", "dog", "car", "bus", "cup", "man")[:n]]
        items.append(AttributeItem(i, 128, 96, boxes, phrases))
    results = [attribute_binding(items, images, tiny, cm.COLORS, batch_size=b) for b in (1, 4, 64)]
    for r in results[1:]:
        assert r.n_evaluated == results[0].n_evaluated == 2 + 3 + 4
        assert r.values["acc"] == pytest.approx(results[0].values["acc"], abs=1e-9)
        assert r.values["clip_local"] == pytest.approx(results[0].values["clip_local"], abs=1e-5)
    acc, score = _reference(items, images, tiny, cm.COLORS)
    assert results[-1].values["acc"] == pytest.approx(acc, abs=1e-9)
    assert results[-1].values["clip_local"] == pytest.approx(score, abs=1e-5)


def test_clip_score(colour_clip, tiny, tmp_path):
    path = tmp_path / "blue.png"
    solid("blue").save(path)
    images = [solid("red"), path, tmp_path / "missing.png"]
    r = clip_score(images, ["a red square", "a green square", "x red"], colour_clip)
    assert r.values["clip_score"] == pytest.approx(0.5, abs=1e-6)  # cos 1 and 0
    assert (r.n_evaluated, r.n_skipped) == (2, 1) and r.skipped[0][0] == 2
    rng = np.random.default_rng(1)
    ims = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(5)]
    prompts = [f"photo number {i}" for i in range(5)]
    a, b = clip_score(ims, prompts, tiny, batch_size=2), clip_score(ims, prompts, tiny, batch_size=64)
    assert a.values["clip_score"] == pytest.approx(b.values["clip_score"], abs=1e-6)


def test_load_clip_offline_tag_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(MetricWeightsError, match=r"ViT-L-14.*laion2b_s32b_b82k") as e:
        cm.load_clip("ViT-L-14", "laion2b_s32b_b82k", cache_dir=str(tmp_path))
    assert time.perf_counter() - t < 5
    assert "pretrained=" in str(e.value) and "huggingface.co/laion/CLIP-ViT-L-14-laion2B-s32B-b82K" in str(e.value)


def test_load_clip_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    # without the offline flag the decision comes from the TCP probe (here: forced to fail)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import instdiff_lib.offline as off

    monkeypatch.setattr(off, "hub_offline", lambda: False)
    monkeypatch.setattr(off, "reachable", lambda url, timeout=2.0: False)
    t = time.perf_counter()
    with pytest.raises(MetricWeightsError, match="did not answer"):
        cm.load_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - t < 5


def test_reachable_is_bounded():
    t = time.perf_counter()
    assert cm.reachable("https://no-such-host.invalid", timeout=1.0) is False
    assert time.perf_counter() - t < 3


def test_cached_tag_is_found_in_hf_cache_layout(tmp_path):
    snap = tmp_path / "models--org--repo" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--org--repo" / "refs").mkdir()
    (tmp_path / "models--org--repo" / "refs" / "main").write_text("abc123")
    cfg = {"hf_hub": "org/repo/"}
    assert cm._cached_tag_file(cfg, str(tmp_path))[0] is None
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert cm._cached_tag_file(cfg, str(tmp_path))[0] == str(snap / "open_clip_pytorch_model.bin")
    (snap / "open_clip_model.safetensors").write_bytes(b"x")  # open_clip prefers the safetensors twin
    assert cm._cached_tag_file(cfg, str(tmp_path))[0] == str(snap / "open_clip_model.safetensors")


def test_load_clip_cached_tag_uses_cache_and_tag_preprocess(tiny, tmp_path, monkeypatch):
    """A tag whose file is in the HF cache loads from it offline, with the tag's mean/std (here 0.5, like laion2b)."""
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("rev1")
    (repo / "snapshots" / "rev1").mkdir(parents=True)
    torch.save(tiny.model.state_dict(), repo / "snapshots" / "rev1" / "open_clip_pytorch_model.bin")
    tag_cfg = {"hf_hub": "org/tiny/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
               "resize_mode": "shortest"}
    real_cfg = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda m, t: tag_cfg if t == "tiny_tag" else real_cfg(m, t))
    t = time.perf_counter()
    model, preprocess, _ = cm.load_clip(cm.TINY_CLIP_CONFIG, "tiny_tag", cache_dir=str(tmp_path))
    assert time.perf_counter() - t < 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), tiny.model.encode_image(x))
    norm = preprocess.transforms[-1]
    assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.5, 0.5, 0.5)


def test_protocol_tag_normalises_with_half(tmp_path):
    """open_clip's config for the protocol's tag uses mean = std = 0.5 (not the OpenAI CLIP statistics)."""
    cfg = open_clip.get_pretrained_cfg(cm.DEFAULT_MODEL, cm.DEFAULT_PRETRAINED)
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic" and cfg["resize_mode"] == "shortest"


def test_load_clip_local_file_and_triple(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    model, preprocess, tokenizer = cm.load_clip(cm.TINY_CLIP_CONFIG, pretrained=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), tiny.model.encode_image(x))
    assert tokenizer(["a red object"]).shape == (1, 77)
    with pytest.raises(MetricWeightsError, match="not found"):
        cm.load_clip(cm.TINY_CLIP_CONFIG, pretrained=tmp_path / "missing.pt")
    with pytest.raises(TypeError):
        cm.as_clip((model, preprocess))
