"""Synthetic checkpoints in the official format: the tests' stand-in and the rehearsal's full-size one.

:func:`official_dict` lays out :class:`~instdiff_lib.weights.checkpoint.Components` the way the released
``instancediffusion_sd15.pth`` is laid out (shared/spec/instancediffusion_official.md §2): every top-level entry
(``model``, ``ema``, ``autoencoder``, ``text_encoder``, ``opt``, ``scheduler``, ``iters``, ``diffusion``, and an OmegaConf
``config_dict`` written by :func:`save_official`), UNets under LDM names through the inverse key maps, the LDM VAE,
the transformers-4 ``FrozenCLIPEmbedder`` names. Values are whatever ``comp`` holds (random for a fresh
``build_components``), so loading it exercises every name and shape of the real file, never its numbers.
"""

from __future__ import annotations

import sys
import types
import zipfile
from pathlib import Path

import torch

from instdiff_lib.model.config import ScheduleConfig
from instdiff_lib.weights.checkpoint import Components
from instdiff_lib.weights.keymap import UNetLayout, convert_unet_state_dict_to_ldm, convert_vae_state_dict_to_ldm
from instdiff_lib.weights.manifest import key_group

TEXT_PREFIX = "transformer.text_model."
FAKE_OMEGACONF = ("omegaconf", "omegaconf.dictconfig")
RELEASED_ENTRIES = ("model", "text_encoder", "autoencoder", "opt", "scheduler", "iters", "config_dict", "diffusion", "ema")


def make_fake_omegaconf():
    """A stand-in for ``omegaconf.dictconfig.DictConfig``, pickled by reference to that module (as the release's
    ``config_dict`` is); loading such a file needs either omegaconf or the tolerant unpickler."""
    pkg = types.ModuleType("omegaconf")
    sub = types.ModuleType("omegaconf.dictconfig")

    class DictConfig:
        def __init__(self, content, parent=None):
            self._content = content
            self._parent = parent

    DictConfig.__module__ = "omegaconf.dictconfig"
    DictConfig.__qualname__ = DictConfig.__name__ = "DictConfig"
    sub.DictConfig = DictConfig
    pkg.dictconfig = sub
    return {"omegaconf": pkg, "omegaconf.dictconfig": sub}, DictConfig


def official_config_content(comp: Components) -> dict:
    """The ``config_dict`` content: the model section of an official ``configs/test_*.yaml`` for this config."""
    u, g = comp.cfg.unet, comp.cfg.unifusion
    return {"model": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                      "params": {"image_size": u.sample_size, "model_channels": u.model_channels,
                                 "channel_mult": list(u.channel_mult), "num_res_blocks": u.num_res_blocks,
                                 "attention_resolutions": list(u.attention_resolutions), "num_heads": u.num_heads,
                                 "context_dim": u.context_dim,
                                 "grounding_tokenizer": {"target": "ldm.modules.diffusionmodules.text_grounding_net.UniFusion",
                                                         "params": {"in_dim": g.in_dim, "out_dim": g.out_dim,
                                                                    "mid_dim": g.mid_dim}}}},
            "autoencoder": {"target": "ldm.models.autoencoder.AutoencoderKL"},
            "text_encoder": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
            "diffusion": {"target": "ldm.models.diffusion.ldm.LatentDiffusion"}}


def save_official(ckpt: dict, path: str | Path, config_content: dict | None = None) -> Path:
    """``torch.save`` (zip format) with an OmegaConf-like ``config_dict``; the fake module exists only while saving."""
    path = Path(path)
    modules, DictConfig = make_fake_omegaconf()
    previous = {n: sys.modules[n] for n in FAKE_OMEGACONF if n in sys.modules}
    sys.modules.update(modules)
    try:
        cfg = DictConfig(dict(config_content or {"model": {"params": {}}}))
        cfg._parent = DictConfig({"nested": True})  # nested objects of the missing class too
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**ckpt, "config_dict": cfg}, tmp)
        tmp.replace(path)
    finally:
        for n in FAKE_OMEGACONF:
            sys.modules.pop(n, None)
        sys.modules.update(previous)
    assert zipfile.is_zipfile(path)
    return path


def ldm_schedule_buffers(cfg: ScheduleConfig | None = None) -> dict[str, torch.Tensor]:
    """The ``diffusion`` entry: the LDM DDPM buffers of the "linear" schedule (recomputable, never read by instdiff)."""
    cfg = cfg or ScheduleConfig()
    betas = cfg.betas()
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - prev) / (1 - ac)
    out = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": ac.sqrt(),
           "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
           "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
           "posterior_variance": post_var,
           "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
           "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
           "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac)}
    return {k: v.float() for k, v in out.items()}


def _adamw_state(sd: dict[str, torch.Tensor], step: int) -> dict:
    """An AdamW ``state_dict`` over the trainable tensors (fusers, UniFusion, ScaleU) with zero moments: stride-0 views
    of one zero, so the entry has the real structure and shapes at no storage cost."""
    trainable = [k for k in sd if key_group(k) != "sd"]
    zero = torch.zeros(())
    state = {i: {"step": torch.tensor(float(step)), "exp_avg": zero.expand(sd[k].shape),
                 "exp_avg_sq": zero.expand(sd[k].shape)} for i, k in enumerate(trainable)}
    group = {"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
             "params": list(range(len(trainable)))}
    return {"state": state, "param_groups": [group]}


def official_dict(comp: Components, model_seed: int | None = 123, iters: int = 5) -> dict:
    """The entries of an official checkpoint for ``comp`` (all but ``config_dict``, see :func:`save_official`):
    ``ema`` = comp's UNet; ``model`` = other values (``ema`` plus seeded noise), or with ``model_seed=None`` the very
    same tensors (one copy on disk: what the rehearsal writes for the 1.2 B-parameter UNet)."""
    cfg = comp.cfg
    layout = UNetLayout.from_ldm(cfg.unet.channel_mult, cfg.unet.num_res_blocks, cfg.unet.attention_resolutions)
    ema = {k: v.detach() for k, v in convert_unet_state_dict_to_ldm(comp.unet.unet.state_dict(), layout).items()}
    if model_seed is None:
        model = dict(ema)
    else:
        g = torch.Generator().manual_seed(model_seed)
        model = {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in ema.items()}
    vae = {k: v.detach() for k, v in convert_vae_state_dict_to_ldm(comp.vae.state_dict(), cfg.vae).items()}
    text = {TEXT_PREFIX + k: v.detach() for k, v in comp.text.model.state_dict().items()}
    text[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(cfg.text.max_position_embeddings)[None]
    scheduler = {"base_lrs": [5e-5], "last_epoch": iters, "_step_count": iters + 1, "_last_lr": [5e-5],
                 "lr_lambdas": [None]}
    return {"ema": ema, "model": model, "autoencoder": vae, "text_encoder": text, "opt": _adamw_state(model, iters),
            "scheduler": scheduler, "iters": iters, "diffusion": ldm_schedule_buffers(cfg.schedule)}
