"""Weights: building components, reading the official checkpoint, converting it, loading converted folders.

Three sources of a model:

1. ``build_components(cfg, seed)`` -- random init from a config (tests, benchmarks, untrained demos).
2. ``load_official(pth)`` -- the released ``instancediffusion_sd15.pth`` (13.6 GB torch pickle): memory-mapped,
   its ``ema`` weights (falling back to ``model``, like the official loader), VAE and text encoder, mapped from
   LDM names with the explicit tables of :mod:`instdiff_lib.keymap` and loaded *strictly* with a coverage report.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import ModelConfig, VAEConfig, get_config, sd15
from .keymap import KeyMapError, UNetLayout, convert_text_encoder_state_dict, convert_unet_state_dict, convert_vae_state_dict
from .model import InstanceUNet
from .text import TextEncoder

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
                assign: bool = False) -> LoadReport:
    """Load ``sd`` into ``module`` strictly; on any gap raise a CheckpointError listing it."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{len(missing)} missing [{few(missing)}]" if missing else "",
                 f"{len(unexpected)} unexpected [{few(unexpected)}]" if unexpected else "",
                 f"{len(mismatched)} shape mismatches [{few([f'{k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}' for k in mismatched])}]" if mismatched else ""]
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


def load_official(path: str | Path, cfg: ModelConfig | None = None, sha256: str | None = None,
                  prefer: str = "ema", progress: bool = True) -> Components:
    """Components from the official checkpoint: ``ema`` (else ``model``) UNet, its VAE and text encoder."""
    cfg = cfg or sd15()
    ckpt = read_official(path, sha256)
    for key in ("autoencoder", "text_encoder"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: no {key!r} entry (keys: {sorted(ckpt)}); is this the InstanceDiffusion checkpoint?")
    layout = UNetLayout.from_ldm(cfg.unet.channel_mult, cfg.unet.num_res_blocks, cfg.unet.attention_resolutions)
    with torch.device("meta"):
        unet = InstanceUNet(cfg)
    order = [prefer] + [k for k in ("ema", "model") if k != prefer]
    errors, report = [], None
    for entry in order:
        if entry not in ckpt:
            errors.append(f"no {entry!r} entry")
            continue
        try:
            sd = convert_unet_state_dict(ckpt[entry], layout)
            report = load_strict(unet.unet, sd, "unet", f"{Path(path).name}[{entry}]", assign=True)
            break
        except (KeyMapError, CheckpointError) as e:
            errors.append(f"{entry}: {e}")
    if report is None:
        raise CheckpointError(f"{path}: no loadable UNet entry: " + " | ".join(errors))
    if errors:
        report.notes.append("fell back: " + " | ".join(errors))
    vae = build_vae(cfg.vae, cfg.image_size)
    text = TextEncoder(cfg.text)
    reports = [report,
               load_strict(vae, convert_vae_state_dict(ckpt["autoencoder"], cfg.vae), "vae", f"{Path(path).name}[autoencoder]"),
               load_strict(text.model, convert_text_encoder_state_dict(ckpt["text_encoder"]), "text_encoder",
                           f"{Path(path).name}[text_encoder]")]
    return Components(cfg, unet, vae, text, f"official {Path(path).name} [{report.source.split('[')[-1][:-1]}]", reports).eval()


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
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
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

