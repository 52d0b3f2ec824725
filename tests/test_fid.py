"""FID: known answers with a tiny feature module, an independent numpy/scipy reference, and offline weight errors."""

import time

import numpy as np
import pytest
import scipy.linalg
import torch
import torchmetrics.image.fid  # noqa: F401 - imported up front so the timed test does not time its import
from PIL import Image

from instdiff_lib.evaluation.metrics import MetricResult
from instdiff_lib.evaluation.metrics import fid as fid_mod
from instdiff_lib.evaluation.metrics.clip_metrics import MetricWeightsError
from instdiff_lib.evaluation.metrics.fid import fid


class TinyFeatures(torch.nn.Module):
    """uint8 (B, 3, H, W) -> per-channel mean, std and mean of a 2x2-pooled gradient: (B, 9). Records input shapes."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((tuple(x.shape), x.dtype))
        x = x.float() / 255
        grad = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(2, 3))
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), grad], dim=1)


def make_set(folder, n, shift=0, seed=0, size=24):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = rng.integers(0, 200, (1, 1, 3)) + rng.integers(0, 56, (size, size, 3))
        im = np.clip(base + shift, 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(im).save(paths[-1])
    return paths


def reference_fid(a_paths, b_paths, feature, size):
    """Fréchet distance of Gaussians fitted to features, with numpy/scipy (sqrtm), from the same resized images."""
    def feats(paths):
        ims = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths]
        x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return feature(x).double().numpy()
    fa, fb = feats(a_paths), feats(b_paths)
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    s_a, s_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty torch.hub cache


def test_identical_sets_give_zero(tmp_path):
    paths = make_set(tmp_path / "a", 16)
    feature = TinyFeatures()
    r = fid(paths, paths, size=32, batch_size=5, feature=feature)
    assert isinstance(r, MetricResult)
    assert abs(r.values["FID"]) < 1e-3
    assert (r.n_evaluated, r.n_skipped) == (16, 0)
    assert r.details["n_generated"] == r.details["n_real"] == 16
    # every image reached the feature module as uint8 at size x size, in batches of at most 5
    shapes = {s for s, _ in feature.seen}
    assert {s[1:] for s in shapes} == {(3, 32, 32)} and max(s[0] for s in shapes) <= 5
    assert {d for _, d in feature.seen} == {torch.uint8}


def test_shifted_set_matches_reference(tmp_path):
    real = make_set(tmp_path / "real", 16, seed=0)
    gen = make_set(tmp_path / "gen", 12, seed=1, shift=40)
    r = fid(gen, real, size=32, batch_size=8, feature=TinyFeatures())
    ref = reference_fid(gen, real, TinyFeatures(), 32)
    assert r.values["FID"] > 0.01
    assert r.values["FID"] == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert r.n_evaluated == 12 and (r.details["n_generated"], r.details["n_real"]) == (12, 16)


def test_unreadable_files_are_skipped(tmp_path):
    paths = make_set(tmp_path / "a", 6)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    r = fid(paths + [bad, tmp_path / "missing.png"], paths, size=24, feature=TinyFeatures())
    assert r.n_skipped == 2 and {s[0] for s in r.skipped} == {str(bad), str(tmp_path / "missing.png")}
    assert r.details["n_generated"] == 6
    with pytest.raises(ValueError, match="at least 2"):
        fid(paths[:1], paths, size=24, feature=TinyFeatures())


def test_missing_inception_weights_offline_fails_fast(tmp_path):
    paths = make_set(tmp_path / "a", 3)
    t = time.perf_counter()
    with pytest.raises(MetricWeightsError) as e:
        fid(paths, paths, size=32)
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    assert fid_mod.INCEPTION_FILE in msg and fid_mod.INCEPTION_URL in msg
    assert str(tmp_path / "torch_home") in msg and "weights_path" in msg
    with pytest.raises(MetricWeightsError, match="not found"):
        fid(paths, paths, size=32, weights_path=tmp_path / "nope.pth")


def test_inception_url_is_torch_fidelitys():
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    assert fid_mod.INCEPTION_URL == fe.URL_INCEPTION_V3


def test_default_inception_path_with_local_weights(tmp_path, monkeypatch):
    """The default extractor wiring (torch-fidelity Inception, uint8 input, 2048-d) with random weights from a file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:  # build one random Inception without downloading, to save its weights
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / fid_mod.INCEPTION_FILE
    torch.save(net.state_dict(), weights)
    a, b = make_set(tmp_path / "a", 2, seed=0), make_set(tmp_path / "b", 2, seed=1, shift=60)
    # dims=64 keeps the 2048x2048 eigen-decomposition (seconds on a busy CPU) out of the test; Inception resizes to 299
    r = fid(a, b, size=32, weights_path=weights, dims=64)
    assert np.isfinite(r.values["FID"]) and r.values["FID"] > 0
    assert r.details["feature"].startswith("inception-v3-compat 64-d")
