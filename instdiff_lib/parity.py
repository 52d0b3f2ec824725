"""Parity against the golden fixture computed with the official implementation (``shared/parity``).

The fixture holds a tiny InstanceDiffusion UNet with random weights (official LDM key names), inputs and
the official outputs: object tokens, eps for every modality-drop variant, the null grounding, gates at
zero, every UNet block's output, and 8-step PLMS runs with and without MIS (with a per-step trace).
Everything here goes through the *same* converter and model classes as the real checkpoint.

``run_parity()`` returns one :class:`Check` per compared tensor; the tests assert each is within the
fixture README's tolerance, and the report notebook prints the same table.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from instdiff_lib.model.config import DropFlags, parity_tiny
from instdiff_lib.weights.keymap import UNetLayout, convert_unet_state_dict
from instdiff_lib.model.unet import InstanceUNet
from instdiff_lib.sampling.sampler import Branch, Sampler, SamplerStats

# Acceptance thresholds of the fixture README ("Suggested acceptance thresholds").
TOLERANCES = {"objs": 1e-5, "eps": 2e-5, "block": 5e-5, "e_t": 2e-4, "x": 5e-4}
VARIANTS = {"all": "all", "test_mask": "mask", "test_box": "box", "test_point": "point"}
MIS_ORDER = [0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0]  # fixture trace: branch of each step-function call


class FixtureError(RuntimeError):
    pass


@dataclass
class Check:
    name: str
    max_abs: float
    tol: float
    scale: float  # max |reference|, for context

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tol

    def __str__(self) -> str:
        return f"{self.name:<32} max|diff| {self.max_abs:.2e}  (tol {self.tol:.0e}, |ref| <= {self.scale:.3g})  {'ok' if self.ok else 'FAIL'}"


def parity_dir() -> Path:
    """``$INSTDIFF_PARITY_DIR``, else ``../shared/parity`` beside the project root."""
    env = os.environ.get("INSTDIFF_PARITY_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "parity"


def verify_fixture(d: Path) -> None:
    """Check every file against ``SHA256SUMS`` (the fixture is read-only; never regenerate it)."""
    sums = d / "SHA256SUMS"
    if not sums.exists():
        raise FixtureError(f"parity fixture not found at {d} (set INSTDIFF_PARITY_DIR)")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split()[0], line.split()[-1].lstrip("*")
        got = hashlib.sha256((d / name).read_bytes()).hexdigest()
        if got != digest:
            raise FixtureError(f"parity fixture file {name} does not match SHA256SUMS")


def load_parity_unet(d: Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> InstanceUNet:
    """The fixture's tiny UNet through the official-checkpoint converter, loaded strictly.

    On another device/dtype (GPU fp16/bf16 checks) the position net stays fp32, as in the pipeline."""
    d = d or parity_dir()
    cfg = parity_tiny()
    unet = InstanceUNet(cfg).eval()
    layout = UNetLayout.from_ldm(cfg.unet.channel_mult, cfg.unet.num_res_blocks, cfg.unet.attention_resolutions)
    sd = convert_unet_state_dict(load_file(str(d / "unet_tiny.safetensors")), layout)
    unet.unet.load_state_dict(sd, strict=True)
    unet.to(device, dtype)
    unet.position_net.float()
    return unet


def _load(path: Path, unet: InstanceUNet) -> dict[str, torch.Tensor]:
    """Fixture tensors on the model's device; floating inputs in the model's dtype."""
    p = next(unet.unet.conv_in.parameters())
    return {k: v.to(p.device, p.dtype if v.is_floating_point() else v.dtype) for k, v in load_file(str(path)).items()}


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> Check:
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} vs reference {tuple(ref.shape)}")
    return Check(name, (got.float().cpu() - ref.float()).abs().max().item(), tol, ref.abs().max().item())


def _grounding(inputs: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}


def block_modules(unet: InstanceUNet) -> dict[str, torch.nn.Module]:
    """Official block name -> the diffusers module whose output equals it (fixture ``debug_blocks``)."""
    u, cfg = unet.unet, unet.cfg.unet
    L, n = cfg.num_res_blocks, len(cfg.channel_mult)
    out = {"input_blocks.0": u.conv_in, "middle_block": u.mid_block}
    idx = 1
    for lvl, block in enumerate(u.down_blocks):
        for j in range(L):
            out[f"input_blocks.{idx}"] = block.attentions[j] if cfg.attn_levels[lvl] else block.resnets[j]
            idx += 1
        if lvl < n - 1:
            out[f"input_blocks.{idx}"] = block.downsamplers[0]
            idx += 1
    for i in range(n * (L + 1)):
        lvl, j = divmod(i, L + 1)
        block = u.up_blocks[lvl]
        if j == L and lvl < n - 1:
            out[f"output_blocks.{i}"] = block.upsamplers[0]
        else:
            out[f"output_blocks.{i}"] = block.attentions[j] if hasattr(block, "attentions") else block.resnets[j]
    return out


@torch.no_grad()
def forward_checks(unet: InstanceUNet, d: Path) -> list[Check]:
    inp, out = _load(d / "inputs.safetensors", unet), load_file(str(d / "outputs.safetensors"))
    g = _grounding(inp, "grounding.")
    dtype = inp["x"].dtype
    checks = []
    for name, preset in VARIANTS.items():
        objs = unet.tokenize(g, DropFlags.preset(preset)).to(dtype)
        checks.append(_check(f"objs.{name}", objs, out[f"objs.{name}"], TOLERANCES["objs"]))
        eps = unet(inp["x"], inp["timesteps"], inp["context"], objs)
        checks.append(_check(f"eps.{name}", eps, out[f"eps.{name}"], TOLERANCES["eps"]))
    null_objs = unet.tokenize(unet.position_net.null_grounding(2, device=inp["x"].device),
                              DropFlags.preset("mask")).to(dtype)
    checks.append(_check("objs.null_grounding", null_objs, out["objs.null_grounding"], TOLERANCES["objs"]))
    eps = unet(inp["x"], inp["timesteps"], inp["context"], null_objs)
    checks.append(_check("eps.null_grounding", eps, out["eps.null_grounding"], TOLERANCES["eps"]))
    eps = unet(inp["x"], inp["timesteps"], inp["context"], unet.tokenize(g, DropFlags.preset("all")).to(dtype), gate=0)
    checks.append(_check("eps.all_gate_scale0", eps, out["eps.all_gate_scale0"], TOLERANCES["eps"]))
    return checks


@torch.no_grad()
def block_checks(unet: InstanceUNet, d: Path) -> list[Check]:
    inp, ref = _load(d / "inputs.safetensors", unet), load_file(str(d / "debug_blocks_b0.safetensors"))
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in block_modules(unet).items():
        def hook(mod, args, output, name=name):
            captured[name] = (output[0] if isinstance(output, tuple) else getattr(output, "sample", output))[:1]
        handles.append(module.register_forward_hook(hook))
    try:
        objs = unet.tokenize(_grounding(inp, "grounding."), DropFlags.preset("all"))
        unet(inp["x"], inp["timesteps"], inp["context"], objs)
    finally:
        for h in handles:
            h.remove()
    missing = set(ref) - set(captured)
    if missing:
        raise AssertionError(f"no module captured for fixture blocks {sorted(missing)}")
    return [_check(f"block.{k}", captured[k], ref[k], TOLERANCES["block"]) for k in sorted(ref)]


@torch.no_grad()
def sampler_checks(unet: InstanceUNet, d: Path, batched: bool = True) -> list[Check]:
    inp, ref = _load(d / "inputs.safetensors", unet), load_file(str(d / "sampler.safetensors"))
    full = Branch(inp["sampler.context.full"], _grounding(inp, "sampler.grounding.full."))
    insts = [Branch(inp[f"sampler.context.inst{i}"], _grounding(inp, f"sampler.grounding.inst{i}.")) for i in range(3)]
    steps = len(ref["plms.ddim_timesteps"])
    checks = []
    for run, mis in (("plms", 0.0), ("mis", 0.36)):
        stats = SamplerStats()
        final = Sampler(unet).sample(inp["sampler.start_noise"], [full, *insts], inp["sampler.uc"], steps=steps,
                                     guidance=7.5, alpha=0.75, mis=mis, drop=DropFlags.preset("mask"),
                                     batched=batched, trace=True, progress=False, stats=stats)
        tag = f"{run}{'' if batched else '[official order]'}"
        checks.append(_check(f"{tag}.final", final, ref[f"{run}.final"], TOLERANCES["x"]))
        # The official sampler calls its step function per branch: map each call to (our step, branch).
        order = MIS_ORDER if run == "mis" else [0] * steps
        n_branches, mis_steps = (4, int(steps * mis)) if run == "mis" else (1, 0)
        step_of = [k % mis_steps if k < n_branches * mis_steps else k - (n_branches - 1) * mis_steps
                   for k in range(len(order))]
        for field_, tol in (("e_t", "e_t"), ("x_out", "x"), ("x_in", "x")):
            key = f"{run}.trace.{field_}"
            if key in ref:
                got = torch.stack([stats.trace[s][field_][b] for s, b in zip(step_of, order)])
                checks.append(_check(f"{tag}.trace.{field_}", got, ref[key], TOLERANCES[tol]))
        for field_, key in (("t", "t"), ("t_next", "t_next"), ("n_old_eps", "n_old_eps"), ("index", "ddim_index")):
            got = torch.tensor([float(stats.trace[s][field_]) for s in step_of])
            want = ref[f"{run}.trace.{key}"].float()
            checks.append(_check(f"{tag}.trace.{key}", got, want[:, 0] if want.ndim == 2 else want, 0.0))
        gates = torch.tensor([float(e["gate"]) for e in stats.trace])
        checks.append(_check(f"{tag}.gate_schedule", gates, ref[f"{run}.gate_scale_per_step"].float(), 0.0))
    return checks


def run_parity(d: Path | None = None) -> list[Check]:
    d = d or parity_dir()
    verify_fixture(d)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    unet = load_parity_unet(d)
    return forward_checks(unet, d) + block_checks(unet, d) + sampler_checks(unet, d)
