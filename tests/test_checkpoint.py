"""Checkpoint IO: the official ``.pth`` loader, converted folders, ``instdiff convert/generate/download`` (CPU, fast).

The released checkpoint (13.6 GB) is not available here, so a *synthetic official checkpoint* is written
with the official layout: ``ema`` / ``model`` UNets under LDM names (via the inverse key maps), the LDM VAE
under ``autoencoder``, the transformers-4 ``FrozenCLIPEmbedder`` names under ``text_encoder``, an
OmegaConf ``config_dict`` (a class from a fake ``omegaconf.dictconfig`` module that is gone -- import
blocked -- when loading), ``opt`` and ``iters``. The full-size layout is checked on the meta device
against the manifest of the official architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest
import torch

from instdiff_lib.weights.checkpoint import (
    CheckpointError,
    Components,
    build_components,
    download_official,
    infer_official_config,
    load_any,
    load_converted,
    load_official,
    load_strict,
    read_official,
    save_converted,
)
from instdiff_lib.model.config import parity_tiny, sd15, tiny
from instdiff_lib.weights.keymap import (
    KeyMapError,
    UNetLayout,
    convert_unet_state_dict,
    convert_unet_state_dict_to_ldm,
    convert_vae_state_dict_to_ldm,
    unet_key_table,
)
from instdiff_lib.weights.manifest import SD15_OFFICIAL_CONFIG, key_group, manifest_numel, meta_state_dict, official_unet_manifest
from instdiff_lib.model.unet import InstanceUNet
from instdiff_lib.weights import synthetic
from instdiff_lib.weights.synthetic import FAKE_OMEGACONF, RELEASED_ENTRIES, TEXT_PREFIX, official_dict

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "layouts" / "boxes_kitchen_animals.json"
CONFIG_CONTENT = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                            "params": {"model_channels": 32, "grounding_tokenizer": {"params": {"in_dim": 64}}}}}


# ---- helpers ------------------------------------------------------------------------------------
def layout_of(cfg) -> UNetLayout:
    return UNetLayout.from_ldm(cfg.unet.channel_mult, cfg.unet.num_res_blocks, cfg.unet.attention_resolutions)


def module_sds(comp: Components) -> dict[str, dict[str, torch.Tensor]]:
    return {"unet": comp.unet.unet.state_dict(), "vae": comp.vae.state_dict(), "text_encoder": comp.text.model.state_dict()}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str = "") -> None:
    assert set(got) == set(want), f"{what}: key sets differ: {sorted(set(got) ^ set(want))[:5]}"
    for k, v in want.items():
        g = got[k]
        assert g.device.type == "cpu", f"{what}{k} is on {g.device}"
        assert g.dtype == v.dtype and g.shape == v.shape, f"{what}{k}: {g.dtype}{tuple(g.shape)} vs {v.dtype}{tuple(v.shape)}"
        assert torch.equal(g, v), f"{what}{k} differs"


def assert_components_equal(comp: Components, want: dict[str, dict[str, torch.Tensor]]) -> None:
    got = module_sds(comp)
    for name in want:
        assert_same_tensors(got[name], want[name], f"{name}: ")


def save_official(ckpt: dict, path: Path) -> Path:
    return synthetic.save_official(ckpt, path, CONFIG_CONTENT)


def model_entry_sd(official: dict, cfg) -> dict[str, torch.Tensor]:
    """The ``model`` entry in our (diffusers) names."""
    return convert_unet_state_dict(official["model"], layout_of(cfg))


def null_objs(comp: Components, batch: int) -> torch.Tensor:
    g = comp.unet.position_net.null_grounding(batch)
    return comp.unet.tokenize(g)


def unet_output(comp: Components, seed: int = 7) -> torch.Tensor:
    cfg = comp.cfg
    gen = torch.Generator().manual_seed(seed)
    s = cfg.unet.sample_size
    x = torch.randn(2, cfg.unet.in_channels, s, s, generator=gen)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=gen)
    with torch.no_grad():
        return comp.unet(x, t, context, null_objs(comp, 2))


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a small shared CPU the OpenMP
    workers of a 2-thread pool can stall each other (seconds per UNet call instead of ~0.2 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def comp() -> Components:
    """Random tiny components with every zero-initialised parameter (fuser gates, ScaleU) made non-zero,
    so that the UNet output depends on every tensor."""
    torch.manual_seed(0)
    c = build_components("tiny", seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in c.unet.parameters():
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return c


@pytest.fixture(scope="module")
def originals(comp) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {n: v.detach().clone() for n, v in sd.items()} for k, sd in module_sds(comp).items()}


@pytest.fixture(scope="module")
def official(comp) -> dict:
    return official_dict(comp)


@pytest.fixture(scope="module")
def fake_pth(official, tmp_path_factory) -> Path:
    return save_official(official, tmp_path_factory.mktemp("official") / "instancediffusion_tiny.pth")


@pytest.fixture(autouse=True)
def no_omegaconf(monkeypatch):
    """Make ``import omegaconf`` fail while loading: the tolerant unpickler must not need it."""
    for n in FAKE_OMEGACONF:
        monkeypatch.setitem(sys.modules, n, None)


def variant(official: dict, tmp_path: Path, name: str = "variant.pth", **changes) -> Path:
    """A copy of the official dict with entries replaced (``None`` removes one), saved under tmp_path."""
    ckpt = dict(official)
    for k, v in changes.items():
        if v is None:
            ckpt.pop(k)
        else:
            ckpt[k] = v
    return save_official(ckpt, tmp_path / name)


# ---- 1. synthetic official checkpoint round trip ------------------------------------------------
def test_fake_checkpoint_needs_omegaconf_for_a_plain_unpickler(fake_pth):
    """Negative control: the file really references ``omegaconf.dictconfig`` (a plain torch.load fails)."""
    with pytest.raises((ImportError, AttributeError, pickle.UnpicklingError)):
        torch.load(fake_pth, map_location="cpu", weights_only=False)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(fake_pth, map_location="cpu")  # weights_only=True refuses the foreign class


def test_read_official_stubs_the_config(fake_pth, official):
    ckpt = read_official(fake_pth)
    assert set(ckpt) == set(RELEASED_ENTRIES)  # the released file's entries (spec §2.1)
    assert ckpt["iters"] == 5
    assert ckpt["opt"]["param_groups"][0]["lr"] == 5e-5
    cfg = ckpt["config_dict"]
    assert type(cfg).__module__ == "instdiff_lib.weights.checkpoint"  # a stub, not the (absent) omegaconf class
    assert cfg.state["_content"] == CONFIG_CONTENT
    assert cfg.state["_parent"].state == {"_content": {"nested": True}, "_parent": None}
    assert torch.equal(ckpt["ema"]["out.2.weight"], official["ema"]["out.2.weight"])


def test_load_official_round_trip_uses_ema(fake_pth, official, originals, comp):
    loaded = load_official(fake_pth, cfg=tiny(), progress=False)
    assert_components_equal(loaded, originals)
    # the ema values, not the model ones
    model_sd = model_entry_sd(official, comp.cfg)
    got = loaded.unet.unet.state_dict()
    assert all(not torch.equal(got[k], model_sd[k]) for k in model_sd)
    # full coverage, per component
    assert [r.component for r in loaded.reports] == ["unet", "vae", "text_encoder"]
    for r, (name, sd) in zip(loaded.reports, originals.items()):
        assert r.n_tensors == len(sd), name
        assert r.n_params == sum(v.numel() for v in sd.values()), name
        assert r.notes == []
        assert f"{r.n_tensors}/{r.n_tensors} tensors" in str(r)
    assert loaded.reports[0].source == f"{fake_pth.name}[ema]"
    assert loaded.reports[1].source.endswith("[autoencoder]")
    assert "[ema]" in loaded.label and fake_pth.name in loaded.label
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert not loaded.unet.training


def test_load_official_infers_the_preset(fake_pth, originals):
    ckpt = read_official(fake_pth)
    assert infer_official_config(ckpt).name == "tiny"
    loaded = load_official(fake_pth, progress=False)  # no cfg: picked from the tensor shapes
    assert loaded.cfg.name == "tiny"
    assert any("inferred" in n for n in loaded.reports[0].notes)
    assert_same_tensors(loaded.unet.unet.state_dict(), originals["unet"])
    assert load_any(str(fake_pth)).cfg.name == "tiny"  # what `generate --model x.pth` uses


def test_load_official_falls_back_to_model_without_ema(official, comp, tmp_path):
    path = variant(official, tmp_path, ema=None)
    loaded = load_official(path, cfg=tiny(), progress=False)
    assert_same_tensors(loaded.unet.unet.state_dict(), model_entry_sd(official, comp.cfg), "unet: ")
    report = loaded.reports[0]
    assert report.source.endswith("[model]")
    assert any("fell back" in n and "ema" in n for n in report.notes), report.notes
    assert "fell back" in str(report)
    assert "[model]" in loaded.label


def test_load_official_prefer_model(fake_pth, official, comp, originals):
    loaded = load_official(fake_pth, cfg=tiny(), prefer="model", progress=False)
    assert_same_tensors(loaded.unet.unet.state_dict(), model_entry_sd(official, comp.cfg), "unet: ")
    assert loaded.reports[0].source.endswith("[model]") and loaded.reports[0].notes == []
    assert_same_tensors(loaded.vae.state_dict(), originals["vae"], "vae: ")


def test_no_unet_entry_at_all(official, tmp_path):
    path = variant(official, tmp_path, ema=None, model=None)
    with pytest.raises(CheckpointError, match="ema.*model"):
        load_official(path, cfg=tiny(), progress=False)


# ---- 2. strictness ------------------------------------------------------------------------------
FUSER = "input_blocks.1.1.transformer_blocks.0.fuser.linear.weight"


def _drop(sd, key):
    return {k: v for k, v in sd.items() if k != key}


def _extra(sd, key):
    return {**sd, key: torch.zeros(3)}


def _reshape(sd, key):
    v = sd[key]
    return {**sd, key: torch.zeros(v.shape[0], v.shape[1] + 1, *v.shape[2:])}


STRICT_CASES = {
    # name: (entry, mutation, key)
    "unet-missing-fuser": ("ema", _drop, FUSER),
    "unet-missing-position_net": ("ema", _drop, "position_net.linears_list.0.0.weight"),
    "unet-missing-scaleu": ("ema", _drop, "scaleu_b_0"),
    "unet-extra": ("ema", _extra, "input_blocks.1.1.transformer_blocks.0.fuser.extra.weight"),
    "unet-extra-position_net": ("ema", _extra, "position_net.not_a_param"),
    "unet-shape": ("ema", _reshape, FUSER),
    "unet-shape-position_net": ("ema", _reshape, "position_net.linears_list.0.0.weight"),
    "vae-missing": ("autoencoder", _drop, "decoder.mid.attn_1.q.weight"),
    "vae-extra": ("autoencoder", _extra, "decoder.mid.attn_1.extra.weight"),
    "vae-shape": ("autoencoder", _reshape, "encoder.conv_in.weight"),
    "text-missing": ("text_encoder", _drop, TEXT_PREFIX + "final_layer_norm.weight"),
    "text-extra": ("text_encoder", _extra, "cond_stage_model.logit_scale"),
    "text-shape": ("text_encoder", _reshape, TEXT_PREFIX + "encoder.layers.0.mlp.fc1.weight"),
}


@pytest.mark.parametrize("case", list(STRICT_CASES))
def test_strict_mismatch_names_the_key(case, official, comp, tmp_path):
    entry, mutate, key = STRICT_CASES[case]
    assert mutate is _extra or key in official[entry], f"test bug: {key} not in {entry}"
    broken = mutate(official[entry], key)
    path = variant(official, tmp_path, **{entry: broken})  # `model` stays intact: no silent fallback
    with pytest.raises(CheckpointError) as err:
        load_official(path, cfg=tiny(), progress=False)
    msg = str(err.value)
    assert key in msg, msg  # the official (LDM) name, even when the failure is on the converted name
    if mutate is _reshape:
        assert str(tuple(broken[key].shape)) in msg and str(tuple(official[entry][key].shape)) in msg, msg
    if entry == "ema":
        assert "--entry model" in msg, msg  # the intact other entry is offered, not silently used


def test_strict_load_rejects_a_different_preset(fake_pth):
    with pytest.raises(CheckpointError, match="parity-tiny"):
        load_official(fake_pth, cfg=parity_tiny(), progress=False)


# ---- 3. bad files -------------------------------------------------------------------------------
def test_missing_checkpoint_says_how_to_download(tmp_path):
    with pytest.raises(CheckpointError, match="instdiff download"):
        load_official(tmp_path / "nope.pth", cfg=tiny())


@pytest.mark.parametrize("kind", ["truncated-half", "truncated-tail", "text", "zip-not-torch", "empty"])
def test_corrupt_checkpoint_is_a_checkpoint_error(kind, fake_pth, tmp_path):
    path = tmp_path / "broken.pth"
    data = fake_pth.read_bytes()
    if kind == "truncated-half":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-tail":
        path.write_bytes(data[:-64])
    elif kind == "text":
        path.write_text("<html>Rate limit exceeded</html>\n")
    elif kind == "zip-not-torch":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "not a checkpoint")
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_official(path, cfg=tiny(), progress=False)
    assert str(path) in str(err.value) and "instdiff download" in str(err.value)


def test_sha256_is_checked_before_loading(fake_pth):
    digest = hashlib.sha256(fake_pth.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="sha256"):
        load_official(fake_pth, cfg=tiny(), sha256="0" * 64, progress=False)
    loaded = load_official(fake_pth, cfg=tiny(), sha256=digest.upper(), progress=False)  # case-insensitive
    assert loaded.reports[0].n_tensors > 0


# ---- 4. converted folder ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(comp, tmp_path_factory) -> Path:
    return save_converted(comp, tmp_path_factory.mktemp("conv") / "tiny-fp32", source={"note": "test"})


def test_converted_round_trip(converted, originals, comp):
    files = sorted(p.name for p in converted.iterdir())
    assert files == ["manifest.json", "model_config.json", "text_encoder.safetensors", "unet.safetensors",
                     "vae.safetensors"]  # no leftover temporary files
    manifest = json.loads((converted / "manifest.json").read_text())
    for fname, meta in manifest["files"].items():
        assert meta["sha256"] == hashlib.sha256((converted / fname).read_bytes()).hexdigest()
        assert meta["bytes"] == (converted / fname).stat().st_size
    assert manifest["source"] == {"note": "test"} and manifest["dtype"] == "float32"
    loaded = load_converted(converted)
    assert loaded.cfg == comp.cfg
    assert loaded.label == comp.label
    assert_components_equal(loaded, originals)
    assert [r.n_tensors for r in loaded.reports] == [len(sd) for sd in originals.values()]
    assert [r.n_tensors for r in loaded.reports] == [m["n_tensors"] for m in manifest["files"].values()]


def test_converted_model_gives_the_same_unet_output(converted, comp):
    loaded = load_converted(converted)
    want = unet_output(comp)
    got = unet_output(loaded)
    assert want.shape == (2, comp.cfg.unet.out_channels, comp.cfg.unet.sample_size, comp.cfg.unet.sample_size)
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)
    # the comparison is meaningful: other weights give another output
    other = build_components("tiny", seed=99)
    assert not torch.allclose(unet_output(other), want)


def test_converted_fp16(comp, originals, tmp_path):
    out = save_converted(comp, tmp_path / "fp16", dtype=torch.float16)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "float16"
    fp32_size = sum(v.numel() * 4 for v in originals["unet"].values())
    assert (out / "unet.safetensors").stat().st_size < 0.6 * fp32_size
    loaded = load_converted(out)
    half = {name: {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()} for name, sd in originals.items()}
    assert_components_equal(loaded, half)
    assert all(p.dtype == torch.float16 for p in loaded.unet.parameters())


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_converted_corrupt_byte_is_caught_by_sha256(converted, originals, tmp_path):
    folder = _copy_folder(converted, tmp_path / "flipped")
    f = folder / "unet.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data: the file still parses
    f.write_bytes(bytes(data))
    assert f.stat().st_size == (converted / "unet.safetensors").stat().st_size
    with pytest.raises(CheckpointError, match="sha256") as err:
        load_converted(folder)
    assert "unet.safetensors" in str(err.value) and "instdiff convert" in str(err.value)
    # without verification the file loads, with one wrong value: the check is what catches it
    loaded = load_converted(folder, verify=False)
    got = loaded.unet.unet.state_dict()
    assert sum(not torch.equal(got[k], v) for k, v in originals["unet"].items()) == 1


def test_converted_truncated_is_caught_by_size(converted, tmp_path):
    folder = _copy_folder(converted, tmp_path / "truncated")
    f = folder / "unet.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    for verify in (True, False):
        with pytest.raises(CheckpointError, match="bytes") as err:
            load_converted(folder, verify=verify)
        assert "unet.safetensors" in str(err.value)


def test_converted_missing_or_broken_manifest(converted, tmp_path):
    folder = _copy_folder(converted, tmp_path / "nomanifest")
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="instdiff convert"):
        load_converted(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json"):
        load_converted(folder)
    manifest = json.loads((converted / "manifest.json").read_text())
    del manifest["files"]["vae.safetensors"]  # an unlisted file would escape the sha256 check
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="vae.safetensors"):
        load_converted(folder)
    (folder / "vae.safetensors").unlink()
    (folder / "manifest.json").write_text((converted / "manifest.json").read_text())
    with pytest.raises(CheckpointError, match="vae.safetensors"):
        load_converted(folder)


# ---- 5. CLI end to end --------------------------------------------------------------------------
def test_cli_convert_and_generate(fake_pth, originals, tmp_path, capsys):
    from instdiff_lib.cli import main

    model_dir = tmp_path / "tiny-converted"
    assert main(["convert", str(fake_pth), "--out", str(model_dir), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "unet:" in printed and "vae:" in printed and "text_encoder:" in printed and "wrote" in printed
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(fake_pth.read_bytes()).hexdigest()
    assert manifest["source"]["entry"].endswith("[ema]")
    assert_components_equal(load_converted(model_dir), originals)

    out = tmp_path / "out"
    args = ["generate", str(LAYOUT), "--out", str(out), "--model", str(model_dir), "--steps", "2", "--mis", "0.36",
            "--device", "cpu"]
    assert main(args) == 0
    stem = LAYOUT.stem
    names = [f"{stem}__seed0__0.png", f"{stem}__seed0__overlay.png", f"{stem}__layout.png", f"{stem}__seed0.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # nothing else (no temporary files)
    paths = [out / n for n in names]
    meta = json.loads(paths[3].read_text())
    assert meta["seed"] == 0 and meta["steps"] == 2 and meta["mis"] == 0.36
    assert meta["images"] == [names[0]]
    assert "[ema]" in meta["model"]  # the label of the converted official checkpoint
    first = {p: p.read_bytes() for p in paths}

    # identical rerun: skipped, nothing rewritten
    old = 1_000_000_000
    for p in paths:
        os.utime(p, (old, old))
    capsys.readouterr()
    assert main(args) == 0
    assert "already generated" in capsys.readouterr().out
    assert all(p.stat().st_mtime == old for p in paths)

    # --overwrite regenerates, byte-identically (same seed)
    assert main(args + ["--overwrite"]) == 0
    assert all(p.stat().st_mtime != old for p in paths)
    for p in paths[:3]:
        assert p.read_bytes() == first[p], f"{p.name} changed between two runs with the same seed"

    # a different seed writes other files, with another image
    assert main(args + ["--seed", "1"]) == 0
    assert (out / f"{stem}__seed1__0.png").read_bytes() != first[paths[0]]

    # generating from the .pth directly gives the same image as from the converted folder
    out_pth = tmp_path / "out_pth"
    assert main(["generate", str(LAYOUT), "--out", str(out_pth), "--model", str(fake_pth), "--steps", "2",
                 "--mis", "0.36", "--device", "cpu"]) == 0
    assert (out_pth / names[0]).read_bytes() == first[paths[0]]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cli_convert_fp16_then_generate(fake_pth, tmp_path, dtype):
    """The README's released-weights path: ``convert --dtype fp16`` then ``generate`` (fp32 or fp16), with the tiny
    preset's real KL VAE (the Shapes model's parameter-free "VAE" would hide a dtype mismatch in decode)."""
    from PIL import Image

    from instdiff_lib.cli import main

    model_dir = tmp_path / "tiny-fp16"
    assert main(["convert", str(fake_pth), "--out", str(model_dir), "--dtype", "fp16"]) == 0
    assert json.loads((model_dir / "manifest.json").read_text())["dtype"] == "float16"
    assert load_converted(model_dir).vae.dtype == torch.float16  # stored in fp16: the pipeline must upcast it
    out = tmp_path / "out"
    assert main(["generate", str(LAYOUT), "--out", str(out), "--model", str(model_dir), "--steps", "1", "--mis", "0",
                 "--device", "cpu", "--dtype", dtype]) == 0
    with Image.open(out / f"{LAYOUT.stem}__seed0__0.png") as im:
        assert im.size == (128, 128)
    assert json.loads((out / f"{LAYOUT.stem}__seed0.json").read_text())["dtype"] == f"torch.float{dtype[2:]}"


def test_cli_generate_errors(tmp_path, capsys):
    from instdiff_lib.cli import main

    bad = tmp_path / "bad_layout.json"
    bad.write_text(json.dumps({"caption": "a cat", "width": 512, "height": 512,
                               "annos": [{"caption": "a cat", "bbox": [10, 10, 100]}]}))
    assert main(["generate", str(bad), "--out", str(tmp_path / "o1"), "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bad_layout.json" in err and "bbox" in err
    assert not (tmp_path / "o1").exists() or not any((tmp_path / "o1").iterdir())

    bad.write_text('{"caption": "a cat", "annos": [')
    assert main(["generate", str(bad), "--out", str(tmp_path / "o2"), "--steps", "2", "--device", "cpu"]) == 2
    assert "JSON" in capsys.readouterr().err

    assert main(["generate", str(LAYOUT), "--out", str(tmp_path / "o3"), "--model", "/nonexistent/folder",
                 "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/folder" in err and "Traceback" not in err


def test_cli_convert_errors(fake_pth, tmp_path, capsys):
    from instdiff_lib.cli import main

    broken = tmp_path / "broken.pth"
    broken.write_bytes(fake_pth.read_bytes()[:1000])
    assert main(["convert", str(broken), "--out", str(tmp_path / "c1")]) == 2
    assert "broken.pth" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "c2")]) == 2
    assert "instdiff download" in capsys.readouterr().err
    assert main(["convert", str(fake_pth), "--out", str(tmp_path / "c3"), "--sha256", "ab" * 32]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "c3").exists()


# ---- 6. download offline ------------------------------------------------------------------------
def test_download_offline_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the env var *and* the constant it became
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        download_official(tmp_path / "weights")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "offline" in msg and "instdiff download --out" in msg and str(tmp_path / "weights") in msg
    assert not list((tmp_path / "weights").glob("*.pth"))

    from instdiff_lib.cli import main

    assert main(["download", "--out", str(tmp_path / "w2")]) == 2


def test_download_offline_cli_subprocess(tmp_path):
    """What a user runs: ``HF_HUB_OFFLINE=1 instdiff download`` (env read at import, in a fresh process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "instdiff_lib.cli", "download", "--out", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "offline" in proc.stderr and "instdiff download --out" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- 7. the full-size layout on the meta device -------------------------------------------------
@pytest.fixture(scope="module")
def sd15_manifest():
    return official_unet_manifest(SD15_OFFICIAL_CONFIG)


def test_full_size_official_layout_loads_strictly_on_meta(sd15_manifest):
    cfg = sd15()
    assert len(sd15_manifest) == 1199
    assert manifest_numel(sd15_manifest) == 1_228_333_437
    sd = convert_unet_state_dict(meta_state_dict(sd15_manifest), layout_of(cfg))
    with torch.device("meta"):
        unet = InstanceUNet(cfg)
    report = load_strict(unet.unet, sd, "unet", "manifest", assign=True)
    assert report.n_tensors == 1199
    assert report.n_params == 1_228_333_437 == unet.n_params()
    # the model's own key groups match the official architecture's, group by group
    groups = {g: sum(key_group(k) == g for k in sd15_manifest) for g in ("sd", "fuser", "position_net", "scaleu")}
    ours = unet.unet.state_dict()
    assert sum(k.startswith("position_net.") for k in ours) == groups["position_net"]
    assert sum(k.startswith("scaleu.") for k in ours) == groups["scaleu"] == 2 * 12  # 12 output blocks
    assert sum(".fuser." in k for k in ours) == groups["fuser"]
    assert len(unet.fusers) == 16
    assert groups["fuser"] % 16 == 0


def test_full_size_layout_missing_fuser_key_fails(sd15_manifest):
    cfg = sd15()
    layout = layout_of(cfg)
    fuser_key = next(k for k in sd15_manifest if ".fuser." in k and k.startswith("output_blocks.11"))
    meta = _drop(meta_state_dict(sd15_manifest), fuser_key)
    with pytest.raises(KeyMapError) as err:  # the key conversion already notices
        convert_unet_state_dict(meta, layout)
    assert fuser_key in str(err.value) and err.value.missing == [fuser_key]

    # and the strict load names the converted key if a converted dict lacks it
    table, _ = unet_key_table(layout)
    sd = _drop(convert_unet_state_dict(meta_state_dict(sd15_manifest), layout), table[fuser_key])
    with torch.device("meta"):
        unet = InstanceUNet(cfg)
    with pytest.raises(CheckpointError) as err:
        load_strict(unet.unet, sd, "unet", "manifest", assign=True)
    assert table[fuser_key] in str(err.value) and "1 missing" in str(err.value)
