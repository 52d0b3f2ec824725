"""Model configuration: one dataclass tree, YAML/JSON serialisable, with named presets.

Every switch an ablation needs is a field here (never a source edit):

* ``fusers``      -- UniFusion gated self-attention on (the method) or off (plain SD backbone).
* ``skip_mode``   -- "scaleu" (official), "freeu" (FreeU with the official b1/b2/s1/s2) or "none".
* ``drop``        -- which location modalities are fed (the official ``test_drop_*`` flags).
* ``fuser_attention`` -- "full" (the released code) or "instance_masked" (the paper's masked attention; models
                      trained from scratch), with ``point_region`` the half-width of a point's region.

Presets:

* ``sd15``         -- the released InstanceDiffusion model (SD1.5 backbone, 184 object tokens).
* ``parity-tiny``  -- the tiny UNet of the golden parity fixture (``shared/parity``), with a tiny VAE/CLIP.
* ``tiny``         -- a small, fast model for CPU demos/tests (the embedded default until a trained
                      mini model exists).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SKIP_MODES = ("scaleu", "freeu", "none")
FUSER_ATTENTION = ("full", "instance_masked")
BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclass
class UNetConfig:
    """LDM-style (official) UNet hyper-parameters. ``num_heads`` is the number of attention heads."""

    sample_size: int = 64  # latent side
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample factors with attention
    num_heads: int = 8
    context_dim: int = 768
    # Mini models trained from scratch only: append 2 fixed coordinate planes (x, y in [-1, 1]) to the UNet input,
    # so that visual tokens know where they are when a fuser matches them against box tokens (a pretrained SD
    # backbone has learnt this; a 30-minute CPU model has not). Official/SD configs: 0.
    coord_channels: int = 0

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def attn_levels(self) -> tuple[bool, ...]:
        return tuple(2**i in self.attention_resolutions for i in range(len(self.channel_mult)))

    @property
    def n_transformer_blocks(self) -> int:
        """Number of SpatialTransformers (hence fusers): 2 per attention level down, 3 up, 1 mid."""
        n_attn = sum(self.attn_levels)
        return n_attn * self.num_res_blocks + n_attn * (self.num_res_blocks + 1) + 1


@dataclass
class UniFusionConfig:
    """Instance tokenizer (``position_net``). Hard-wired official values are fields for tiny models."""

    in_dim: int = 768  # per-instance text embedding width (CLIP pooler_output)
    out_dim: int = 768  # object-token width (= UNet context_dim)
    mid_dim: int = 3072
    n_slots: int = 30
    n_scribble_points: int = 20
    n_polygon_points: int = 256
    fourier_freqs: int = 16
    fourier_temperature: float = 100.0
    seg_input_size: int = 512
    n_seg_tokens: int = 64
    convnext_depths: tuple[int, ...] = (3, 3, 9, 3)
    convnext_dims: tuple[int, ...] = (96, 192, 384, 768)

    @property
    def seg_feature_dim(self) -> int:
        side = self.seg_input_size // 32  # ConvNeXt strides 4 * 2 * 2 * 2
        return self.convnext_dims[-1] * side * side // self.n_seg_tokens

    @property
    def n_tokens(self) -> int:
        return 4 * self.n_slots + self.n_seg_tokens


@dataclass
class DropFlags:
    """Eval-time modality drops (official ``test_drop_*``). ``masks`` drops polygons *and* segs."""

    boxes: bool = False
    points: bool = False
    scribbles: bool = True
    masks: bool = False

    PRESETS = {  # name -> (boxes, points, scribbles, masks); official configs/test_*.yaml
        "all": (False, False, False, False),  # test_scribble.yaml
        "mask": (False, False, True, False),  # test_mask.yaml (inference.py default)
        "box": (False, False, True, True),  # test_box.yaml
        "point": (True, False, True, True),  # test_point.yaml
    }

    @classmethod
    def preset(cls, name: str) -> "DropFlags":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown drop preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(*cls.PRESETS[name])

    def as_tuple(self) -> tuple[bool, bool, bool, bool]:
        return (self.boxes, self.points, self.scribbles, self.masks)


@dataclass
class VAEConfig:
    """``kind`` "kl": diffusers AutoencoderKL (SD); "space_to_depth": the parameter-free fold of
    :mod:`instdiff_lib.model.autoencoder` with factor 2^(len(block_out_channels) - 1), for CPU-scale models."""

    kind: str = "kl"
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215


@dataclass
class TextConfig:
    """CLIP text tower (transformers ``CLIPTextConfig`` fields)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768


@dataclass
class ScheduleConfig:
    """The noise schedule. ``beta_schedule``: "scaled_linear" (LDM's "linear", diffusers' "scaled_linear": betas
    linear in sqrt space; SD1.5 and the official model) or "linear" (betas linear, DDPM's pixel-space schedule,
    e.g. ``beta_start=1e-4, beta_end=0.02``). With SD's betas a 64 px pixel-space image keeps sqrt(alphas_cumprod)
    = 0.085 of its signal at t = 961 (the first of 25 PLMS steps), enough for a model to read an image's mean colour
    there, which a sample started from pure noise does not have; DDPM's linear betas leave 0.009.

    ``prediction_type``: what the UNet outputs. "epsilon" (SD1.5 and the official model) or "v_prediction"
    (``v = sqrt(a) eps - sqrt(1 - a) x0``; the sampler turns it into eps, so PLMS/DDIM/MIS are unchanged). The
    Shapes mini model uses v: in pixel space an eps model's x0 estimate at high noise is its eps error times
    sqrt((1 - a) / a) (~10 at t = 900), which stalls a short from-scratch training at noise-like samples.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def betas(self) -> "torch.Tensor":
        """The T betas in float64."""
        import torch

        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)
        return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_train_timesteps,
                              dtype=torch.float64) ** 2


@dataclass
class ModelConfig:
    name: str = "sd15"
    unet: UNetConfig = field(default_factory=UNetConfig)
    unifusion: UniFusionConfig = field(default_factory=UniFusionConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    fusers: bool = True
    skip_mode: str = "scaleu"
    drop: DropFlags = field(default_factory=DropFlags)
    # "full": every visual token sees every object token (the released code: its masked attention never runs).
    # "instance_masked": an instance's location tokens are seen only from its region (model/fuser_mask.py).
    fuser_attention: str = "full"
    point_region: float = 0.1  # instance_masked: half-width (normalised) of the square region of a point-only instance

    def __post_init__(self) -> None:
        if self.skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {self.skip_mode!r}")
        if self.fuser_attention not in FUSER_ATTENTION:
            raise ValueError(f"fuser_attention must be one of {FUSER_ATTENTION}, got {self.fuser_attention!r}")
        if self.unifusion.out_dim != self.unet.context_dim:
            raise ValueError("unifusion.out_dim must equal unet.context_dim (object tokens enter the fusers)")

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.unet.sample_size * self.vae_scale

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        sub = {"unet": UNetConfig, "unifusion": UniFusionConfig, "vae": VAEConfig, "text": TextConfig,
               "schedule": ScheduleConfig, "drop": DropFlags}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sub:
                typ = sub[key]
                known = {f.name: f for f in dataclasses.fields(typ)}
                unknown = set(value) - set(known)
                if unknown:
                    raise ValueError(f"unknown {key} config field(s): {sorted(unknown)}")
                kwargs[key] = typ(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown model config field {key!r}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "ModelConfig":
        """Copy with top-level fields replaced, e.g. ``cfg.replace(skip_mode="none")``."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        text = Path(path).read_text()
        data = yaml.safe_load(text)  # JSON is YAML
        return cls.from_dict(data)


def sd15() -> ModelConfig:
    return ModelConfig(name="sd15")


def parity_tiny() -> ModelConfig:
    """The tiny UNet of ``shared/parity`` (see its README), plus a tiny VAE and CLIP text tower."""
    return ModelConfig(
        name="parity-tiny",
        unet=UNetConfig(sample_size=32, model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2,
                        attention_resolutions=(1, 2), num_heads=2, context_dim=64),
        unifusion=UniFusionConfig(in_dim=48, out_dim=64, mid_dim=16, convnext_depths=(1, 1, 1, 1),
                                  convnext_dims=(8, 16, 32, 64)),
        vae=VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32),
        text=TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=48),
    )


def tiny() -> ModelConfig:
    """Small and fast on a CPU: 128x128 images, 30 instance slots, 184 tokens like the real model."""
    return ModelConfig(
        name="tiny",
        unet=UNetConfig(sample_size=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(1, 2, 4), num_heads=2, context_dim=64),
        unifusion=UniFusionConfig(in_dim=64, out_dim=64, mid_dim=128, seg_input_size=128, n_seg_tokens=64,
                                  convnext_depths=(1, 1, 1, 1), convnext_dims=(8, 16, 32, 64)),
        vae=VAEConfig(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32),
        text=TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=64),
    )


def shapes_mini() -> ModelConfig:
    """The mini InstanceDiffusion of the Shapes world, trained from scratch on a CPU.

    64x64 RGB images folded 2x2 into a 12 x 32 x 32 "latent" (parameter-free space-to-depth, no VAE to
    train); v-prediction (see :class:`ScheduleConfig`); a small UNet with attention (hence fusers) only at 8x8 (one token per 8x8 pixels: attention at
    16x16 as well made a training step 1.8x slower on 2 CPU cores); the full
    UniFusion token layout (30 slots, 64 seg tokens = 184 object tokens) with a tiny ConvNeXt; a 2-layer
    CLIP text tower of width 64 (its 49,408-token vocabulary is the CLIP tokenizer's); instance-masked fuser
    attention (:mod:`instdiff_lib.model.fuser_mask`: a from-scratch model does not ground its layouts without it).
    """
    return ModelConfig(
        name="shapes-mini",
        unet=UNetConfig(sample_size=32, in_channels=12, out_channels=12, model_channels=32, channel_mult=(1, 2, 2),
                        num_res_blocks=1, attention_resolutions=(4,), num_heads=4, context_dim=64),
        unifusion=UniFusionConfig(in_dim=64, out_dim=64, mid_dim=64, seg_input_size=64, n_seg_tokens=64,
                                  convnext_depths=(1, 1, 1, 1), convnext_dims=(8, 16, 32, 64)),
        vae=VAEConfig(kind="space_to_depth", block_out_channels=(1, 1), scaling_factor=1.0),
        text=TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=64),
        schedule=ScheduleConfig(prediction_type="v_prediction"),
        fuser_attention="instance_masked",
    )


PRESETS = {"sd15": sd15, "parity-tiny": parity_tiny, "tiny": tiny, "shapes-mini": shapes_mini}


def get_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name (``sd15``, ``parity-tiny``, ``tiny``) or a path to a saved config."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]()
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"no model preset or config file {name_or_path!r}; presets: {sorted(PRESETS)}")
    return ModelConfig.load(path)
