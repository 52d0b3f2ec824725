"""Weights: building components, reading the official checkpoint, converting it, loading converted folders.

Three sources of a model:

1. ``build_components(cfg, seed)`` -- random init from a config (tests, benchmarks, untrained demos).
2. ``load_official(pth)`` -- the released ``instancediffusion_sd15.pth`` (13.6 GB torch pickle): memory-mapped,
   its ``ema`` weights (falling back to ``model``, like the official loader), VAE and text encoder, mapped from
   LDM names with the explicit tables of :mod:`instdiff_lib.weights.keymap` and loaded *strictly* with a coverage report.
3. ``load_converted(folder)`` -- the compact folder written by ``instdiff convert`` (safetensors + config +
   manifest with sha256 of every file), which loads in seconds.

Every failure names the file and the command that fixes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import types
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from instdiff_lib.model.config import PRESETS, ModelConfig, VAEConfig, get_config
from instdiff_lib.weights.keymap import (
    SCALEU_PREFIX,
    KeyMapError,
    UNetLayout,
    convert_text_encoder_state_dict,
    convert_unet_state_dict,
    convert_vae_state_dict,
    unet_key_table,
    vae_key_table,
)
from instdiff_lib.model.unet import InstanceUNet
from instdiff_lib.model.text import TextEncoder, text_model_config

FORMAT = "instdiff-v1"
OFFICIAL_REPO = "xudongw/InstanceDiffusion"
OFFICIAL_FILE = "instancediffusion_sd15.pth"
DOWNLOAD_HINT = "instdiff download --out weights/  (then: instdiff convert weights/instancediffusion_sd15.pth --out weights/instdiff-sd15)"


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message says what and how to fix it."""


@dataclass
class LoadReport:
    """Coverage of one strict load: every model tensor was filled from exactly one checkpoint tensor."""

    component: str
    source: str
    n_tensors: int
    n_params: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.component}: {self.n_tensors}/{self.n_tensors} tensors, {self.n_params:,} params from {self.source}{extra}"


@dataclass
class Components:
    cfg: ModelConfig
    unet: InstanceUNet
    vae: AutoencoderKL
    text: TextEncoder
    label: str  # where the weights came from, shown in every output and result
    reports: list[LoadReport] = field(default_factory=list)

    def to(self, device=None, dtype=None) -> "Components":
        for m in (self.unet, self.vae, self.text):
            m.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "Components":
        for m in (self.unet, self.vae, self.text):
            m.eval().requires_grad_(False)
        return self


# ---- building -----------------------------------------------------------------------------------
def build_vae(cfg: VAEConfig, image_size: int) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    if cfg.kind == "space_to_depth":
        from instdiff_lib.model.autoencoder import SpaceToDepthAE

        return SpaceToDepthAE(2 ** (n - 1), cfg.scaling_factor)
    if cfg.kind != "kl":
        raise ValueError(f"unknown vae kind {cfg.kind!r} (kl, space_to_depth)")
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.block_out_channels,
                         layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=cfg.norm_num_groups, sample_size=image_size,
                         scaling_factor=cfg.scaling_factor)


def build_components(cfg: ModelConfig | str, seed: int = 0, label: str | None = None) -> Components:
    """Random-init components from a config (seeded). Not a trained model: the label says so."""
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    torch.manual_seed(seed)
    unet = InstanceUNet(cfg)
    vae = build_vae(cfg.vae, cfg.image_size)
    text = TextEncoder(cfg.text)
    return Components(cfg, unet, vae, text, label or f"{cfg.name} (random init, seed {seed}; untrained)").eval()


# ---- strict loading -----------------------------------------------------------------------------
def load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], component: str, source: str,
                assign: bool = False, names: Mapping[str, str] | None = None) -> LoadReport:
    """Load ``sd`` into ``module`` strictly; on any gap raise a CheckpointError listing it.

    ``names`` (optional) maps keys of ``sd``/``module`` to the checkpoint's own names, shown in errors.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        def show(k):
            return f"{k} (checkpoint: {names[k]})" if names and names.get(k, k) != k else k

        def few(keys):
            return ", ".join(map(show, keys[:5])) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        shapes = [f"{show(k)}: {tuple(sd[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} in the model"
                  for k in mismatched]
        parts = [f"{len(missing)} missing [{few(missing)}]" if missing else "",
                 f"{len(unexpected)} unexpected [{few(unexpected)}]" if unexpected else "",
                 f"{len(mismatched)} shape mismatches [{', '.join(shapes[:5])}"
                 f"{f' (+{len(shapes) - 5} more)' if len(shapes) > 5 else ''}]" if mismatched else ""]
        raise CheckpointError(f"{component} from {source} does not match the model config: "
                              + "; ".join(p for p in parts if p))
    module.load_state_dict(sd, strict=True, assign=assign)
    return LoadReport(component, source, len(expected), sum(v.numel() for v in expected.values()))


def file_sha256(path: str | Path, progress: bool = True) -> str:
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=not progress,
                                     desc=f"sha256 {path.name}", leave=False) as bar:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


# ---- the official checkpoint --------------------------------------------------------------------
class _Stub:
    """Stand-in for classes we do not need to unpickle (the OmegaConf ``config_dict``)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith(("omegaconf", "ldm", "pytorch_lightning")):
            return _Stub
        return super().find_class(module, name)


_tolerant_pickle = types.ModuleType("instdiff_tolerant_pickle")
_tolerant_pickle.Unpickler = _TolerantUnpickler
_tolerant_pickle.load = lambda f, **kw: _TolerantUnpickler(f, **kw).load()
_tolerant_pickle.__dict__.update({k: getattr(pickle, k) for k in ("HIGHEST_PROTOCOL", "UnpicklingError")})


def read_official(path: str | Path, sha256: str | None = None) -> dict:
    """Memory-map the official ``.pth``. Needs no OmegaConf: its ``config_dict`` is replaced by a stub.

    ``sha256`` (optional) is checked before unpickling. The file is a trusted release, loaded with
    ``weights_only=False`` only after the checks above.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Get it with: {DOWNLOAD_HINT}")
    if sha256 is not None:
        got = file_sha256(path)
        if got != sha256.lower():
            raise CheckpointError(f"{path}: sha256 {got} does not match the expected {sha256} (corrupt or partial "
                                  f"download?). Re-download with: {DOWNLOAD_HINT}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch zip checkpoint (truncated or corrupt download?). "
                              f"Re-download with: {DOWNLOAD_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False, pickle_module=_tolerant_pickle)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken file
        raise CheckpointError(f"could not read {path}: {type(e).__name__}: {e}. Re-download with: {DOWNLOAD_HINT}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    return ckpt


UNET_ENTRIES = ("ema", "model")


def _unet_layout(cfg: ModelConfig) -> UNetLayout:
    return UNetLayout.from_ldm(cfg.unet.channel_mult, cfg.unet.num_res_blocks, cfg.unet.attention_resolutions)


def _config_match(ckpt: dict, cfg: ModelConfig) -> tuple[int, int]:
    """(matching, total) tensors of an official checkpoint vs. a config, by converted name and shape (meta only)."""
    with torch.device("meta"):
        unet = InstanceUNet(cfg).unet
        vae = build_vae(cfg.vae, cfg.image_size)
        from transformers import CLIPTextModel

        text = CLIPTextModel(text_model_config(cfg.text))
    layout = _unet_layout(cfg)
    table, _ = unet_key_table(layout)
    vae_table, _ = vae_key_table(cfg.vae)

    def unet_name(k):
        if k in table:
            return table[k]
        return SCALEU_PREFIX + k if k.startswith("scaleu_") else k  # position_net.* is verbatim

    def squeeze(shape):  # LDM VAE attention 1x1 convs are Linear weights in diffusers
        return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape

    matched = total = 0
    parts = [(next((ckpt[e] for e in UNET_ENTRIES if isinstance(ckpt.get(e), dict)), {}), unet, unet_name, tuple),
             (ckpt.get("autoencoder", {}), vae, lambda k: vae_table.get(k, k), squeeze),
             (ckpt.get("text_encoder", {}), text, lambda k: k.removeprefix("transformer.text_model."), tuple)]
    for sd, module, rename, norm in parts:
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        given = {rename(k): norm(tuple(v.shape)) for k, v in sd.items()
                 if isinstance(v, torch.Tensor) and not k.endswith("position_ids")}
        matched += sum(1 for k, s in given.items() if expected.get(k) == s)
        total += len(set(given) | set(expected))
    return matched, total


def infer_official_config(ckpt: dict) -> ModelConfig:
    """The preset (``sd15``, ``tiny``, ``parity-tiny``) whose tensor names and shapes best match the checkpoint.

    Only shapes are compared (on the meta device): cheap even for the 13.6 GB release. The strict load that
    follows reports any remaining difference against the chosen preset.
    """
    best, best_score = None, -1.0
    for name, make in PRESETS.items():  # sd15 first: it wins ties
        cfg = make()
        matched, total = _config_match(ckpt, cfg)
        score = matched / max(total, 1)
        if score > best_score:
            best, best_score = cfg, score
    return best


def load_official(path: str | Path, cfg: ModelConfig | None = None, sha256: str | None = None,
                  prefer: str = "ema", progress: bool = True) -> Components:
    """Components from the official checkpoint: ``ema`` (else ``model``) UNet, its VAE and text encoder.

    ``cfg=None`` picks the preset whose shapes match the checkpoint (``sd15`` for the release; see
    :func:`infer_official_config`). The other UNet entry is used only when the preferred one is *absent*
    (like the official loader); a preferred entry that is present but does not match raises.
    """
    if prefer not in UNET_ENTRIES:
        raise ValueError(f"prefer must be one of {UNET_ENTRIES}, got {prefer!r}")
    name = Path(path).name
    ckpt = read_official(path, sha256)
    for key in ("autoencoder", "text_encoder"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: no {key!r} entry (keys: {sorted(map(str, ckpt))}); "
                                  "is this the InstanceDiffusion checkpoint?")
    inferred = cfg is None
    cfg = cfg or infer_official_config(ckpt)
    order = [prefer] + [k for k in UNET_ENTRIES if k != prefer]
    entry = next((e for e in order if e in ckpt), None)
    if entry is None:
        raise CheckpointError(f"{path}: no UNet weights (neither {UNET_ENTRIES[0]!r} nor {UNET_ENTRIES[1]!r}; keys: "
                              f"{sorted(map(str, ckpt))}); is this the InstanceDiffusion checkpoint?")
    other = next(e for e in UNET_ENTRIES if e != entry)
    hint = f" (the {other!r} entry can be tried with: instdiff convert ... --entry {other})" if other in ckpt else ""

    def convert(what: str, fn, *args):
        try:
            return fn(*args)
        except (KeyMapError, ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{what} from {name} does not match the {cfg.name!r} model config: {e}"
                                  + (hint if what.startswith("unet") else "")) from e

    with torch.device("meta"):
        unet = InstanceUNet(cfg)
    source = f"{name}[{entry}]"
    layout = _unet_layout(cfg)
    sd = convert(f"unet [{entry}]", convert_unet_state_dict, ckpt[entry], layout)
    unet_names = {v: k for k, v in unet_key_table(layout)[0].items()}
    unet_names.update({SCALEU_PREFIX + k: k for k in ckpt[entry] if k.startswith("scaleu_")})
    try:
        report = load_strict(unet.unet, sd, "unet", source, assign=True, names=unet_names)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{hint}") from e
    if entry != prefer:
        report.notes.append(f"fell back to {entry!r}: no {prefer!r} entry")
    if inferred:
        report.notes.append(f"config {cfg.name!r} inferred from tensor shapes")
    vae = build_vae(cfg.vae, cfg.image_size)
    text = TextEncoder(cfg.text)
    vae_sd = convert("vae [autoencoder]", convert_vae_state_dict, ckpt["autoencoder"], cfg.vae)
    text_sd = convert("text_encoder [text_encoder]", convert_text_encoder_state_dict, ckpt["text_encoder"])
    reports = [report,
               load_strict(vae, vae_sd, "vae", f"{name}[autoencoder]",
                           names={v: k for k, v in vae_key_table(cfg.vae)[0].items()}),
               load_strict(text.model, text_sd, "text_encoder", f"{name}[text_encoder]",
                           names={k: "transformer.text_model." + k for k in {*text_sd, *text.model.state_dict()}})]
    return Components(cfg, unet, vae, text, f"official {name} [{entry}]", reports).eval()


# ---- the converted folder -----------------------------------------------------------------------
FILES = {"unet": "unet.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors"}


def save_converted(comp: Components, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                   source: dict | None = None) -> Path:
    """Write ``unet/vae/text_encoder.safetensors``, ``model_config.json`` and ``manifest.json`` (sha256 per file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = {"unet": comp.unet.unet, "vae": comp.vae, "text_encoder": comp.text.model}
    manifest = {"format": FORMAT, "label": comp.label, "dtype": str(dtype).replace("torch.", ""),
                "source": source or {}, "files": {}}
    for name, module in modules.items():
        sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
              for k, v in module.state_dict().items()}
        target = out / FILES[name]
        tmp = target.with_suffix(".tmp")
        save_file(sd, str(tmp), metadata={"format": FORMAT, "component": name})
        os.replace(tmp, target)  # atomic: no half-written file under the final name
        manifest["files"][FILES[name]] = {"sha256": file_sha256(target, progress=False), "bytes": target.stat().st_size,
                                          "n_tensors": len(sd)}
    comp.cfg.save(out / "model_config.json")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def load_converted(folder: str | Path, verify: bool = True, label: str | None = None) -> Components:
    """Load a folder written by :func:`save_converted` strictly; ``verify`` checks every file's sha256."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"{folder} is not a converted instdiff model (no manifest.json). Create one with: "
                              f"instdiff convert PATH/TO/{OFFICIAL_FILE} --out {folder}  (weights: {DOWNLOAD_HINT})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{manifest_path} is not readable ({e}); re-run instdiff convert") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{manifest_path}: unknown format {fmt!r} (expected {FORMAT}); re-run instdiff convert")
    missing_files = sorted(set(FILES.values()) - set(manifest["files"]))
    if missing_files:
        raise CheckpointError(f"{manifest_path} lists no {missing_files}; re-run instdiff convert")
    for fname, meta in manifest["files"].items():
        p = folder / fname
        if not p.exists():
            raise CheckpointError(f"{p} is missing; re-run instdiff convert")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{p} has {p.stat().st_size} bytes, the manifest says {meta['bytes']} "
                                  "(truncated or modified); re-run instdiff convert")
        if verify and file_sha256(p, progress=False) != meta["sha256"]:
            raise CheckpointError(f"{p}: sha256 does not match manifest.json (corrupt file); re-run instdiff convert")
    cfg = ModelConfig.load(folder / "model_config.json")

    def read(name):
        try:
            return load_file(str(folder / FILES[name]))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{folder / FILES[name]} is not readable ({e}); re-run instdiff convert") from e

    with torch.device("meta"):
        unet = InstanceUNet(cfg)
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    reports = [load_strict(unet.unet, read("unet"), "unet", str(folder / FILES["unet"]), assign=True)]
    vae = build_vae(cfg.vae, cfg.image_size)
    text = TextEncoder(cfg.text)
    reports.append(load_strict(vae, read("vae"), "vae", str(folder / FILES["vae"])))
    reports.append(load_strict(text.model, read("text_encoder"), "text_encoder", str(folder / FILES["text_encoder"])))
    comp = Components(cfg, unet, vae, text, label or manifest.get("label", str(folder)), reports)
    return comp.to(dtype=dtype).eval()


# ---- download -----------------------------------------------------------------------------------
def download_official(out_dir: str | Path, repo_id: str = OFFICIAL_REPO, filename: str = OFFICIAL_FILE) -> Path:
    """Fetch the released checkpoint with huggingface_hub (which verifies the LFS sha256); fail fast offline."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=str(out_dir)))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"cannot download {repo_id}/{filename}: offline (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}) "
                              f"and not in the cache. On a machine with internet run: instdiff download --out {out_dir}") from e
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise CheckpointError(f"cannot download {repo_id}/{filename}: {type(e).__name__}: {str(e)[:300]}. "
                              f"Check the network, or copy the file into {out_dir} by hand.") from e


def load_any(spec: str, seed: int = 0, verify: bool = True) -> Components:
    """A preset name (random init), a converted folder, or an official ``.pth``."""
    path = Path(spec)
    if path.is_dir():
        return load_converted(path, verify=verify)
    if path.suffix in {".pth", ".ckpt", ".pt"}:
        return load_official(path)
    try:
        return build_components(get_config(spec), seed=seed)
    except FileNotFoundError:
        raise CheckpointError(f"model {spec!r} is neither a preset, a converted folder nor a .pth file. "
                              f"For the released weights: {DOWNLOAD_HINT}") from None

