"""``InstanceDiffusionPipeline``: layout in, images out.

    pipe = InstanceDiffusionPipeline.from_pretrained("tiny")          # or a converted folder / official .pth
    out = pipe(Layout.from_json("layouts/boxes_kitchen_animals.json"), seed=0, steps=50, alpha=0.8, mis=0.36)
    out.images[0].save("cat.png")

What it does, per the official ``inference.py`` (differences are deliberate and listed):

* noise ``x_T`` ~ N(0, I) from a CPU generator seeded with ``seed`` (same seed => same image);
* global prompt -> CLIP ``last_hidden_state``; each instance caption -> CLIP ``pooler_output``;
* grounding from the layout (boxes, points, scribbles, mask points, raster masks); unlike the official
  script, masks and scribbles given in the JSON are used (it silently discards them);
* PLMS + CFG + alpha schedule + MIS (:mod:`instdiff_lib.sampling.sampler`), modality drops by preset
  ("mask" = the official default ``test_mask.yaml``);
* decode with ``1 / scaling_factor``, clamp to [-1, 1], map to [0, 255] and *truncate* to uint8 (official).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from instdiff_lib.weights.checkpoint import Components, load_any
from instdiff_lib.model.config import DropFlags
from instdiff_lib.layouts.layout import Layout, grounding_arrays, grounding_for_instance
from instdiff_lib.sampling.sampler import Branch, Sampler, SamplerStats

DEFAULT_NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
                           "cropped, worst quality, low quality")  # official inference.py default


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    latents: torch.Tensor
    info: dict = field(default_factory=dict)


def resolve_drop(drop: str | DropFlags | None) -> DropFlags:
    if drop is None:
        return DropFlags.preset("mask")
    return drop if isinstance(drop, DropFlags) else DropFlags.preset(drop)


def max_batch_for(free_bytes: int, per_sample_bytes: int, n: int, headroom: float = 0.8) -> int | None:
    """How many UNet samples fit in ``headroom`` of ``free_bytes`` at ``per_sample_bytes`` each: None when all ``n``
    fit (one call), else the chunk size (at least 1)."""
    fit = int(headroom * free_bytes // max(per_sample_bytes, 1))
    return None if fit >= n else max(1, fit)


class InstanceDiffusionPipeline:
    """``max_batch`` caps the UNet batch (both guidance halves of every MIS branch run as one batch: up to 62 samples
    for 30 instances). None: on CUDA it is chosen from the free GPU memory, measured once per pipeline with a
    2-sample UNet call (:meth:`resolve_max_batch`); on the CPU the whole batch runs at once."""

    def __init__(self, components: Components, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch: int | None = None):
        cfg = components.cfg
        if cfg.text.hidden_size != cfg.unet.context_dim or cfg.text.hidden_size != cfg.unifusion.in_dim:
            raise ValueError(f"config {cfg.name!r}: the text tower width ({cfg.text.hidden_size}) must equal the UNet "
                             f"context dim ({cfg.unet.context_dim}) and the instance embedding width "
                             f"({cfg.unifusion.in_dim}) to run the pipeline")
        self.c = components
        self.device = torch.device(device)
        self.dtype = dtype
        self.c.unet.to(self.device, dtype)
        self.c.unet.position_net.float()  # tokens are computed once per run, in fp32 (Fourier features)
        self.c.text.to(self.device, torch.float32)  # fp32: runs once per prompt
        # the VAE runs in fp32 whatever the UNet dtype and whatever it was stored in (a converted fp16 folder loads
        # it in fp16): decode() feeds it fp32 latents, and an fp16 VAE overflows at 512 px
        self.c.vae.to(self.device, torch.float32)
        self.sampler = Sampler(self.c.unet)
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (or None: chosen from free GPU memory), got {max_batch}")
        self.max_batch = max_batch
        self._per_sample_bytes: int | None = None

    @classmethod
    def from_pretrained(cls, spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                        verify: bool = True, max_batch: int | None = None) -> "InstanceDiffusionPipeline":
        return cls(load_any(spec, seed=seed, verify=verify), device=device, dtype=dtype, max_batch=max_batch)

    # ---- the UNet batch --------------------------------------------------------------------------
    def resolve_max_batch(self, n: int, max_batch: int | None = None) -> int | None:
        """The chunk size for a UNet batch of ``n`` samples: the argument, else the pipeline's ``max_batch``, else (CUDA)
        what fits in the free memory, else None (one call)."""
        mb = max_batch if max_batch is not None else self.max_batch
        if mb is not None or n <= 2 or self.device.type != "cuda":
            return mb
        free, per = self._cuda_memory()
        return max_batch_for(free, per, n)

    def _cuda_memory(self) -> tuple[int, int]:
        """(free bytes now, peak bytes per UNet sample): the latter measured once, from a 2-sample call."""
        if self._per_sample_bytes is None:
            unet, s = self.c.unet, self.cfg.unet.sample_size
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            x = torch.zeros(2, self.cfg.unet.in_channels, s, s, device=self.device, dtype=self.dtype)
            ctx = torch.zeros(2, self.cfg.text.max_position_embeddings, self.cfg.unet.context_dim, device=self.device,
                              dtype=self.dtype)
            with torch.no_grad():
                null = unet.position_net.null_grounding(2, device=self.device, seg_size=1)
                objs = unet.tokenize(null, resolve_drop(None)).to(self.dtype)
                unet(x, torch.full((2,), 500, device=self.device), ctx, objs, 1)
            torch.cuda.synchronize(self.device)
            self._per_sample_bytes = max(1, (torch.cuda.max_memory_allocated(self.device) - base) // 2)
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free), int(self._per_sample_bytes)

    @property
    def cfg(self):
        return self.c.cfg

    # ---- inputs ----------------------------------------------------------------------------------
    def _grounding_tensors(self, arrays: dict[str, np.ndarray], embeddings: torch.Tensor, batch: int) -> dict:
        g = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
        pos = torch.zeros(self.cfg.unifusion.n_slots, self.cfg.unifusion.in_dim, device=self.device)
        pos[: len(embeddings)] = embeddings
        g["positive_embeddings"] = pos
        return {k: v.unsqueeze(0).expand(batch, *v.shape) for k, v in g.items()}

    def prepare(self, layout: Layout, seed: int, num_images: int, negative_prompt: str, mis: float,
                truncate_prompt: bool = False) -> tuple[list[Branch], torch.Tensor]:
        """Branch 0 = full layout; branches 1..n = each instance alone (caption as prompt, slot 0), for MIS."""
        layout = layout.validate(max_instances=self.cfg.unifusion.n_slots)
        text = self.c.text
        seg = self.cfg.unifusion.seg_input_size
        captions = [inst.caption for inst in layout.instances]
        emb = text.encode_phrases(captions)
        B = num_images
        ctx = text.encode_prompts([layout.caption], truncate=truncate_prompt).expand(B, -1, -1)
        uc = text.encode_prompts([negative_prompt], truncate=True).expand(B, -1, -1)
        branches = [Branch(ctx, self._grounding_tensors(grounding_arrays(layout, seed, seg_size=seg), emb, B))]
        if mis > 0:
            for i, cap in enumerate(captions):
                arrays = grounding_for_instance(layout, i, seed, seg_size=seg)
                inst_ctx = text.encode_prompts([cap]).expand(B, -1, -1)
                branches.append(Branch(inst_ctx, self._grounding_tensors(arrays, emb[i:i + 1], B)))
        cast = lambda b: Branch(b.context.to(self.dtype), b.grounding)  # noqa: E731
        return [cast(b) for b in branches], uc.to(self.dtype)

    def noise(self, seed: int, num_images: int) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(seed)
        s = self.cfg.unet.sample_size
        x = torch.randn(num_images, self.cfg.unet.in_channels, s, s, generator=gen)
        return x.to(self.device, self.dtype)

    # ---- run -------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, layout: Layout, seed: int = 0, steps: int = 50, guidance: float = 7.5, alpha: float = 0.75,
                 mis: float = 0.36, num_images: int = 1, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
                 drop: str | DropFlags | None = "mask", method: str = "plms", batched: bool = True,
                 max_batch: int | None = None, truncate_prompt: bool = False, progress: bool = True,
                 x_T: torch.Tensor | None = None) -> PipelineOutput:
        return self.generate([layout], [seed], steps=steps, guidance=guidance, alpha=alpha, mis=mis,
                             num_images=num_images, negative_prompt=negative_prompt, drop=drop, method=method,
                             batched=batched, max_batch=max_batch, truncate_prompt=truncate_prompt, progress=progress,
                             x_T=None if x_T is None else [x_T])[0]

    @torch.no_grad()
    def generate(self, layouts: list[Layout], seeds: list[int], *, steps: int = 50, guidance: float = 7.5,
                 alpha: float = 0.75, mis: float = 0.36, num_images: int = 1,
                 negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, drop: str | DropFlags | None = "mask",
                 method: str = "plms", batched: bool = True, max_batch: int | None = None,
                 truncate_prompt: bool = False, progress: bool = True,
                 x_T: list[torch.Tensor] | None = None) -> list[PipelineOutput]:
        """Several layouts (one seed each) sampled together: their branches share every UNet batch
        (:meth:`Sampler.sample_many`). Each output equals ``self(layout, seed, ...)`` up to float rounding; its
        ``info`` holds the whole call's ``seconds``, ``unet_calls`` and ``unet_batches`` and, as ``layout_batch``, the
        number of layouts."""
        if len(layouts) != len(seeds) or (x_T is not None and len(x_T) != len(layouts)):
            raise ValueError(f"one seed (and x_T, if given) per layout: {len(layouts)} layouts, {len(seeds)} seeds"
                             + ("" if x_T is None else f", {len(x_T)} x_T"))
        t0 = time.perf_counter()
        drop_flags = resolve_drop(drop)
        jobs, uc = [], None
        for k, (layout, seed) in enumerate(zip(layouts, seeds)):
            branches, uc = self.prepare(layout, seed, num_images, negative_prompt, mis, truncate_prompt)
            noise = self.noise(seed, num_images) if x_T is None else x_T[k].to(self.device, self.dtype)
            jobs.append((noise, branches))
        stats = SamplerStats()
        per_job = [len(brs) if int(steps * mis) > 0 else 1 for _, brs in jobs]
        n_batch = 2 * num_images * sum(per_job)  # the largest UNet batch of the run
        max_batch = self.resolve_max_batch(n_batch, max_batch) if batched else max_batch
        latents = self.sampler.sample_many(jobs, uc, steps=steps, guidance=guidance, alpha=alpha, mis=mis,
                                           method=method, drop=drop_flags, batched=batched, max_batch=max_batch,
                                           progress=progress, stats=stats)
        images = [self.decode(lat) for lat in latents]
        seconds = round(time.perf_counter() - t0, 3)
        common = {"model": self.c.label, "config": self.cfg.name, "steps": steps, "guidance": guidance,
                  "alpha": alpha, "mis": mis, "num_images": num_images, "negative_prompt": negative_prompt,
                  "drop": dict(zip(("boxes", "points", "scribbles", "masks"), drop_flags.as_tuple())),
                  "method": method, "max_batch": max_batch, "unet_calls": stats.unet_calls,
                  "unet_batches": stats.unet_batches, "device": str(self.device), "dtype": str(self.dtype),
                  "layout_batch": len(layouts), "seconds": seconds}
        return [PipelineOutput(imgs, lat, {**common, "seed": seed, "n_instances": len(layout.instances)})
                for imgs, lat, seed, layout in zip(images, latents, seeds, layouts)]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.c.vae
        x = vae.decode(latents.float() / vae.config.scaling_factor).sample
        x = ((x.clamp(-1, 1) + 1) / 2 * 255).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a.astype(np.uint8)) for a in x]  # astype truncates, like the official code
