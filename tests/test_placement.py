"""Tests for instdiff_lib.extension.placement: the one IoU (hand values and the seed's xywh trap), matching, evaluation with a
scripted detector, and the real Grounding DINO / OWLv2 forward + post-processing paths on tiny random models built
offline from config classes (no download)."""

import string
import time

import numpy as np
import pytest
import torch
from PIL import Image

from instdiff_lib.layouts.layout import Instance, Layout
from instdiff_lib.extension.placement import (
    BackendUnavailableError,
    CogVLMDetector,
    Detections,
    DetectorWeightsError,
    GroundingDinoDetector,
    Owlv2Detector,
    evaluate_placement,
    iou_xyxy,
    load_detector,
    match_instances,
    parse_cogvlm_boxes,
    xywh_to_xyxy,
)

# ---- IoU ------------------------------------------------------------------------------------------------------


def seed_iou_xywh(a, b):
    """The seed's iou.py formula (reads boxes as [x, y, w, h]); a NEGATIVE CONTROL, never to be used on corners."""
    xa, ya = max(a[0], b[0]), max(a[1], b[1])
    xb, yb = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, xb - xa) * max(0, yb - ya)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.parametrize("a, b, want", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),
    ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
    ([0, 0, 4, 2], [2, 0, 6, 2], 4 / 12),
    ([3, 3, 3, 3], [3, 3, 3, 3], 0.0),  # degenerate: zero union -> 0, not NaN
])
def test_iou_hand_values(a, b, want):
    assert iou_xyxy(a, b) == pytest.approx(want)
    assert iou_xyxy(b, a) == pytest.approx(want)


def test_iou_broadcasts_pairwise():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]])
    m = iou_xyxy(a[:, None], a[None])
    assert m.shape == (2, 2) and m == pytest.approx(np.array([[1, 1 / 7], [1 / 7, 1]]))
    with pytest.raises(ValueError, match="dimension of 4"):
        iou_xyxy([0, 0, 1], [0, 0, 1])


def test_seed_xywh_formula_on_corner_boxes_is_wrong():
    """The forklift of prior_reproductions.md §1.11: GPT box [100,350,250,500] (corners), the model was fed its xywh
    reading (x 100-350, y 350-512 after clipping), CogVLM found [105,162,500,501] (corners)."""
    gpt, cog = [100, 350, 250, 500], [105, 162, 500, 501]
    fed = [100, 350, 350, 512]
    right = iou_xyxy(gpt, cog)
    assert right == pytest.approx(21750 / 134655)  # 145 x 150 overlap; hand computed: 0.1615
    assert iou_xyxy(fed, cog) == pytest.approx(36995 / 137410)  # 245 x 151 overlap: 0.2692
    wrong = seed_iou_xywh(gpt, cog)  # the seed's formula on corner boxes
    assert wrong == pytest.approx(76685 / 298815)  # 0.2566: not the IoU of these boxes
    assert abs(wrong - right) > 0.09
    # the formula is only right for boxes that really are [x, y, w, h]
    a_xywh, b_xywh = [100, 350, 150, 150], [105, 162, 395, 339]
    assert seed_iou_xywh(a_xywh, b_xywh) == pytest.approx(iou_xyxy(xywh_to_xyxy(a_xywh), xywh_to_xyxy(b_xywh)))
    assert iou_xyxy(xywh_to_xyxy(a_xywh), xywh_to_xyxy(b_xywh)) == pytest.approx(right)


# ---- matching --------------------------------------------------------------------------------------------------


def dets():
    boxes = [[0, 0, 10, 10], [100, 100, 150, 200], [300, 300, 400, 400], [105, 95, 150, 195]]
    scores = [[0.9, 0.1], [0.6, 0.2], [0.2, 0.3], [0.5, 0.05]]  # columns: person, dog
    return Detections(boxes=boxes, scores=scores, queries=["person", "dog"])


def test_match_top_score():
    planned = [np.array([100, 100, 150, 200]), np.array([300, 300, 400, 400])]
    m = match_instances(planned, ["person", "dog"], dets(), threshold=0.35)
    assert m[0]["found"] and m[0]["detected_box"] == [0, 0, 10, 10] and m[0]["score"] == 0.9  # top score, wrong place
    assert not m[1]["found"] and m[1]["score"] == 0.3 and m[1]["detected_box"] is None  # below threshold
    m = match_instances(planned, ["person", "dog"], dets(), threshold=0.25)
    assert m[1]["found"] and m[1]["detected_box"] == [300, 300, 400, 400]


def test_match_one_to_one_for_repeated_labels():
    planned = [np.array([0, 0, 10, 10]), np.array([100, 100, 150, 200]), np.array([200, 0, 250, 50])]
    m = match_instances(planned, ["person"] * 3, dets(), threshold=0.35, assignment="one-to-one")
    assert [r["detected_box"] for r in m] == [[0, 0, 10, 10], [100, 100, 150, 200], None]  # NMS drops box 3
    assert [r["found"] for r in m] == [True, True, False]
    top = match_instances(planned, ["person"] * 3, dets(), threshold=0.35)
    assert all(r["detected_box"] == [0, 0, 10, 10] for r in top)  # top-score: all share the best person box


def test_match_without_detections_and_bad_query():
    empty = Detections(boxes=np.zeros((0, 4)), scores=np.zeros((0, 1)), queries=["cat"])
    assert match_instances([np.array([0, 0, 1, 1])], ["cat"], empty, threshold=0.1)[0]["found"] is False
    with pytest.raises(ValueError, match="not sent"):
        match_instances([np.array([0, 0, 1, 1])], ["dog"], empty, threshold=0.1)


# ---- evaluation with a scripted detector ----------------------------------------------------------------------


class ScriptedDetector:
    """Returns given boxes (pixel xyxy of the image) per query label with score 0.9, batching recorded."""

    name, threshold = "scripted", 0.5

    def __init__(self, found: dict[str, list[float]]):
        self.found, self.calls = found, []

    def settings(self):
        return {"backend": self.name}

    def detect(self, images, queries):
        self.calls.append([len(images), [list(q) for q in queries]])
        out = []
        for qs in queries:
            boxes = [self.found[q] for q in qs if q in self.found]
            scores = [[0.9 if q == qq else 0.0 for qq in qs] for q in qs if q in self.found]
            out.append(Detections(boxes=np.array(boxes).reshape(-1, 4), scores=np.array(scores).reshape(-1, len(qs)),
                                  queries=list(qs)))
        return out


def layout_512():
    insts = [Instance("a dog", box=(0.1, 0.1, 0.5, 0.5), category="dog"),
             Instance("a cat", box=(0.5, 0.5, 0.9, 0.9), category="cat"),
             Instance("a kite", box=(0.0, 0.0, 0.2, 0.2), category="kite")]
    return Layout(caption="a dog and a cat", width=512, height=512, instances=insts)


def test_evaluate_placement_intended_vs_fed(tmp_path):
    plan = layout_512()
    # the fed JSON misreads the dog box as the seed did: corners fed as [x, y, w, h] -> x 51.2-307.2, y 51.2-307.2
    fed = plan.to_json()
    fed["annos"][0]["bbox"] = [51.2, 51.2, 256, 256]
    fed_path = tmp_path / "fed.json"
    import json

    fed_path.write_text(json.dumps(fed))
    # images are 256 px: layout boxes are scaled by 0.5; the dog is found where the fed box said
    det = ScriptedDetector({"dog": [25.6, 25.6, 153.6, 153.6], "cat": [128, 128, 230.4, 230.4]})
    img = Image.new("RGB", (256, 256))
    r = evaluate_placement([img, img], [plan, plan], det, fed=[fed_path, fed_path], batch_size=1)
    assert r.n_evaluated == 2 and r.n_skipped == 0 and len(det.calls) == 2
    dog = r.details["instances"][0]
    assert dog["planned_box"] == [25.6, 25.6, 128, 128] and dog["fed_box"] == [25.6, 25.6, 153.6, 153.6]
    assert dog["iou"] == pytest.approx(102.4 ** 2 / 128 ** 2) and dog["iou_fed"] == pytest.approx(1.0)
    cat, kite = r.details["instances"][1:3]
    assert cat["iou"] == pytest.approx(1.0) and cat["iou_fed"] == pytest.approx(1.0)
    assert not kite["found"] and kite["iou"] == 0.0
    assert r["found_rate"] == pytest.approx(2 / 3) and r["found_rate_fed"] == pytest.approx(2 / 3)
    assert r["mean_iou"] == pytest.approx((0.64 + 1 + 0) / 3)
    assert r["mean_iou_found"] == pytest.approx((0.64 + 1) / 2)
    assert r["mean_iou_fed"] == pytest.approx(2 / 3) and r["recall_at_50"] == pytest.approx(2 / 3)
    assert r["n_instances"] == 6 and "xyxy" in r.details["box_convention"]
    assert any("clip_score skipped" in n for n in r.details["notes"])


def test_evaluate_placement_skips_and_notes(tmp_path):
    plan = layout_512()
    det = ScriptedDetector({"dog": [0, 0, 10, 10]})
    short = Layout(caption="x", width=512, height=512, instances=plan.instances[:1])
    r = evaluate_placement([Image.new("RGB", (64, 64)), tmp_path / "missing.png", Image.new("RGB", (64, 64))],
                           [plan, plan, plan], det, fed=[plan, plan, short], image_ids=["a", "b", "c"], batch_size=8)
    assert r.n_evaluated == 1 and r.n_skipped == 2
    reasons = dict(r.skipped)
    assert "FileNotFoundError" in reasons["b"] and "do not line up" in reasons["c"]
    assert len(det.calls) == 1 and det.calls[0][0] == 1  # one batched call with the readable image only
    r = evaluate_placement([Image.new("RGB", (64, 64))], [plan], det)
    assert "mean_iou_fed" not in r.values and any("fed layouts not given" in n for n in r.details["notes"])
    with pytest.raises(ValueError, match="2 images but 1 planned"):
        evaluate_placement([1, 2], [plan], det)


class ColourClip(torch.nn.Module):
    """A CLIP triple member with known embeddings: an image's is its mean RGB, a text's the one-hot of the first
    colour word it names (all ones if none), so every cosine is known by hand."""

    WORDS = ("red", "green", "blue")

    def encode_image(self, x):
        return x.mean(dim=(2, 3))

    def encode_text(self, ids):
        return ids.float()

    @classmethod
    def tokenizer(cls, texts):
        rows = []
        for t in texts:
            hit = [w for w in t.split() if w in cls.WORDS]
            rows.append([float(w == hit[0]) for w in cls.WORDS] if hit else [1.0, 1.0, 1.0])
        return torch.tensor(rows)


def test_evaluate_placement_with_clip_score():
    pytest.importorskip("instdiff_lib.evaluation.metrics.clip_metrics")

    def preprocess(im):
        return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)

    det = ScriptedDetector({"dog": [0, 0, 10, 10]})
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue"), Image.new("RGB", (64, 64), "red")]
    r = evaluate_placement(images, [layout_512()] * 3, det, clip=(ColourClip(), preprocess, ColourClip.tokenizer),
                           prompts=["a red square", "a red dog", "a dog"])
    # cosines: red image vs "red" 1, blue image vs "red" 0, red image vs no colour word 1/sqrt(3)
    assert r["clip_score"] == pytest.approx((1 + 0 + 1 / np.sqrt(3)) / 3, abs=1e-6)
    assert r.details["clip"]["n_evaluated"] == 3
    assert not any("clip_score skipped" in n for n in r.details["notes"])


# ---- CogVLM (optional backend) ---------------------------------------------------------------------------------


def test_cogvlm_backend_is_optional_and_parses_grid_boxes():
    with pytest.raises(BackendUnavailableError, match="optional backend") as e:
        load_detector("cogvlm")
    assert isinstance(e.value, NotImplementedError)
    assert parse_cogvlm_boxes("a forklift [[205,316,976,978]] and [[0,0,10,5];[1,1,2,2]] [[5,5,1,1]]", 512, 512) == [
        pytest.approx([104.96, 161.792, 499.712, 500.736]), [0, 0, 5.12, 2.56], [0.512, 0.512, 1.024, 1.024]]
    det = CogVLMDetector(lambda image, question: "[[100,100,500,500]]" if "dog" in question else "no box")
    r = evaluate_placement([Image.new("RGB", (512, 512))], [layout_512()], det)
    dog = r.details["instances"][0]
    assert dog["found"] and dog["detected_box"] == pytest.approx([51.2, 51.2, 256, 256])
    assert dog["iou"] == pytest.approx(1.0) and not r.details["instances"][1]["found"]


# ---- loading ---------------------------------------------------------------------------------------------------


def test_load_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(DetectorWeightsError, match="HF_HUB_OFFLINE is set"):
        load_detector("grounding-dino", cache_dir=str(tmp_path))
    with pytest.raises(DetectorWeightsError, match="owlv2-base-patch16-ensemble"):
        load_detector("owlv2", cache_dir=str(tmp_path))
    assert time.monotonic() - t0 < 5
    with pytest.raises(DetectorWeightsError, match="folder not found"):
        load_detector("owlv2", model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown backend"):
        load_detector("yolo")


# ---- tiny random Grounding DINO and OWLv2 (offline) ----------------------------------------------------------

WORDS = ["a", "dog", "cat", "person", "red", "car", "traffic", "light", "kite"]


def tiny_bert_tokenizer():
    from transformers import BertTokenizer

    vocab = {"[PAD]": 0, **{f"[unused{i}]": i for i in range(1, 100)}, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102,
             "[MASK]": 103}
    for w in WORDS:
        vocab[w] = len(vocab)
    while len(vocab) < 1012:
        vocab[f"[unused{len(vocab)}]"] = len(vocab)
    vocab["."] = 1012  # the real BERT ids Grounding DINO treats as delimiters: 101, 102, 1012, 1029
    while len(vocab) < 1029:
        vocab[f"[unused{len(vocab)}]"] = len(vocab)
    vocab["?"] = 1029
    return BertTokenizer(vocab=vocab)


@pytest.fixture(scope="module")
def tiny_gdino():
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    swin = SwinConfig(image_size=128, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=2, out_indices=[2, 3, 4])
    bert = BertConfig(vocab_size=1100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    cfg = GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=32, num_queries=12, encoder_layers=1,
                              decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_n_points=1, decoder_n_points=1, max_text_len=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GroundingDinoForObjectDetection(cfg).eval()
    ip = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 160})
    return model, GroundingDinoProcessor(image_processor=ip, tokenizer=tiny_bert_tokenizer())


@pytest.fixture(scope="module")
def tiny_owlv2():
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    # id 0 must not be <|startoftext|>: OWLv2 treats a query whose first token is 0 as padding (masked out)
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for c in string.ascii_lowercase + string.digits + ".,'-":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Owlv2ForObjectDetection(cfg).eval()
    return model, Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)


def test_grounding_dino_text_spans():
    text, spans = GroundingDinoDetector.build_text(["Traffic  Light", "dog"])
    assert text == "traffic light. dog." and [text[a:b] for a, b in spans] == ["traffic light", "dog"]


def test_tiny_grounding_dino_forward_and_postprocess(tiny_gdino):
    model, processor = tiny_gdino
    det = GroundingDinoDetector(model, processor, threshold=0.0)
    images = [Image.new("RGB", (160, 128), "white"), Image.new("RGB", (128, 128), "gray")]
    queries = [["dog", "traffic light"], ["a red car"]]
    out = det.detect(images, queries)
    assert [o.scores.shape for o in out] == [(12, 2), (12, 1)] and out[0].queries == ["dog", "traffic light"]
    for o, img in zip(out, images):
        w, h = img.size
        assert (o.boxes >= 0).all() and (o.boxes[:, [0, 2]] <= w).all() and (o.boxes[:, [1, 3]] <= h).all()
    # the same forward through the processor and transformers' own post-processing gives the same boxes
    inputs = processor(images=images[:1], text="dog. traffic light.", return_tensors="pt")
    with torch.inference_mode():
        raw = model(**inputs)
    # each query's score is the max sigmoid over its own tokens (known positions), not the "." or the specials
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert tokens == ["[CLS]", "dog", ".", "traffic", "light", ".", "[SEP]"]
    probs = raw.logits[0].float().sigmoid().numpy()
    assert out[0].scores[:, 0] == pytest.approx(probs[:, 1], abs=1e-5)
    assert out[0].scores[:, 1] == pytest.approx(probs[:, [3, 4]].max(1), abs=1e-5)
    assert not np.allclose(probs[:, 3], probs[:, 4], atol=1e-3)  # the max over two tokens is not either one alone
    ref = processor.post_process_grounded_object_detection(raw, inputs["input_ids"], threshold=0.0,
                                                           text_threshold=0.0, target_sizes=[(128, 160)])[0]
    assert np.clip(ref["boxes"].numpy(), 0, [160, 128, 160, 128]) == pytest.approx(out[0].boxes, abs=1e-4)
    # our per-phrase score is a max over a subset of the tokens transformers maxes over
    assert (out[0].scores.max(1) <= ref["scores"].numpy() + 1e-6).all()
    # through the evaluation, batched
    lay = Layout(caption="a dog", width=512, height=512, instances=[Instance("a dog", box=(0, 0, 0.5, 0.5),
                                                                             category="dog")])
    r = evaluate_placement(images, [lay, lay], det, batch_size=2)
    assert r.n_evaluated == 2 and r["found_rate"] == 1.0
    # mean IoU by hand: each image's top-scoring "dog" box against the planned top-left quarter of that image
    ious = []
    for o, img in zip(det.detect(images, [["dog"], ["dog"]]), images):
        w, h = img.size
        x0, y0, x1, y1 = o.boxes[int(np.argmax(o.scores[:, 0]))]
        inter = max(0.0, min(x1, w / 2) - max(x0, 0.0)) * max(0.0, min(y1, h / 2) - max(y0, 0.0))
        ious.append(inter / ((x1 - x0) * (y1 - y0) + w * h / 4 - inter))
    assert 0 < max(ious) < 1  # not a trivial 0 or 1 (the non-square image's box overlaps the quarter)
    assert r["mean_iou"] == pytest.approx(np.mean(ious), abs=1e-6)


def test_tiny_owlv2_forward_and_postprocess(tiny_owlv2):
    model, processor = tiny_owlv2
    det = Owlv2Detector(model, processor)
    images = [Image.new("RGB", (48, 32), "white"), Image.new("RGB", (32, 32), "black")]
    out = det.detect(images, [["dog", "a red car"], ["kite"]])
    assert [o.scores.shape for o in out] == [(16, 2), (16, 1)]
    assert all((o.scores > 0).all() for o in out)  # no query was masked out as padding
    for o, img in zip(out, images):
        w, h = img.size
        assert (o.boxes >= 0).all() and (o.boxes[:, [0, 2]] <= w).all() and (o.boxes[:, [1, 3]] <= h).all()
    inputs = processor(text=[["dog", "a red car"]], images=images[:1], return_tensors="pt", padding="max_length",
                       max_length=16, truncation=True)
    with torch.inference_mode():
        raw = model(**inputs)
    ref = processor.post_process_grounded_object_detection(raw, threshold=0.0, target_sizes=[(32, 48)])[0]
    assert np.clip(ref["boxes"].numpy(), 0, [48, 32, 48, 32]) == pytest.approx(out[0].boxes, abs=1e-4)
    assert out[0].scores.max(1) == pytest.approx(ref["scores"].numpy(), abs=1e-5)
    assert (out[0].scores.argmax(1) == ref["labels"].numpy()).all()


def test_load_detector_from_local_folder(tiny_gdino, tiny_owlv2, tmp_path):
    for backend, (model, processor) in (("grounding-dino", tiny_gdino), ("owlv2", tiny_owlv2)):
        folder = tmp_path / backend
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        det = load_detector(backend, model=folder, threshold=0.2)
        assert det.name == backend and det.threshold == 0.2 and det.settings()["model"] == str(folder)
        assert det.detect([Image.new("RGB", (40, 40))], [["dog"]])[0].scores.shape[1] == 1


def test_queries_use_mapped_labels():
    lay = Layout(caption="x", width=100, height=100, instances=[
        Instance("a puppy", box=(0, 0, 0.5, 0.5), category="puppy"),
        Instance("a tractor", box=(0.5, 0.5, 1, 1), category="tractor"),
        Instance("a small puppy", box=(0, 0.5, 0.5, 1), category="Puppy")])
    det = ScriptedDetector({"dog": [0, 0, 50, 50]})
    r = evaluate_placement([Image.new("RGB", (100, 100))], [lay], det)
    assert det.calls[0][1] == [["dog", "tractor"]]  # one query per distinct mapped label
    assert [i["query"] for i in r.details["instances"]] == ["dog", "tractor", "dog"]
    r = evaluate_placement([Image.new("RGB", (100, 100))], [lay], det, map_labels=False)
    assert det.calls[1][1] == [["puppy", "tractor", "Puppy"]]
    r = evaluate_placement([Image.new("RGB", (100, 100))], [lay], det, query="caption")
    assert det.calls[2][1] == [["a puppy", "a tractor", "a small puppy"]]
