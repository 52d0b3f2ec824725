"""Generate images for one layout file into a folder, with deterministic names and safe writes.

Outputs for ``scene.json`` with seed 3 and 2 images::

    scene__seed3__0.png   scene__seed3__1.png      the images
    scene__layout.png                              the inputs drawn on a blank canvas
    scene__seed3__overlay.png                      the inputs drawn over image 0
    scene__seed3.json                              parameters, model label, timing

Names depend only on the layout name and seed, never on what the folder already holds. Every file is
written to a temporary name and renamed, so a killed run leaves no half-written image. A rerun with the
same parameters finds the complete set and skips it (``overwrite=True`` regenerates).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from PIL import Image

from instdiff_lib.fileio import atomic_save_image, atomic_write_text
from instdiff_lib.layouts.layout import Layout
from instdiff_lib.viz import draw_layout


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def skip_mode_set(unet, mode: str | None):
    """Run with the UNet's decoder-skip mode set to ``mode`` (None: as it is), restoring the old mode after."""
    old = unet.skip_mode
    if mode is not None:
        unet.set_skip_mode(mode)
    try:
        yield
    finally:
        unet.set_skip_mode(old)


def refine_images(images: list[Image.Image], prompt: str, strength: float, device: str) -> list[Image.Image]:
    """The official demos' optional SDXL-refiner img2img pass (20 steps). Needs the refiner weights."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from instdiff_lib.weights.checkpoint import CheckpointError

    repo = "stabilityai/stable-diffusion-xl-refiner-1.0"
    try:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(repo, torch_dtype=dtype,
                                                                variant="fp16" if dtype == torch.float16 else None)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--refine needs the SDXL refiner ({repo}) and it could not be loaded: "
                              f"{type(e).__name__}: {str(e)[:200]}. Run once with internet access, or drop --refine.") from e
    pipe.to(device)
    return [pipe(prompt=prompt, image=img, strength=strength, num_inference_steps=20).images[0] for img in images]


def generate_from_layout(layout_path: str | Path, out_dir: str | Path, model: str | None = None, seed: int = 0,
                         steps: int = 50, guidance: float = 7.5, alpha: float = 0.8, mis: float = 0.36,
                         num_images: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32,
                         drop: str = "mask", negative_prompt: str | None = None, truncate: bool = False,
                         refine: float = 0.0, overwrite: bool = False, verify: bool = True, method: str = "plms",
                         pipe=None, skip_mode: str | None = None, progress: bool = True,
                         max_batch: int | None = None) -> list[Path]:
    """Generate ``num_images`` images of one layout file into ``out_dir`` (see the module docstring).

    ``skip_mode`` ("scaleu", "freeu", "none") overrides the model's decoder-skip mode for this run (None: the
    model's own). ``pipe`` reuses a loaded pipeline (its ``model`` must be the one named). ``max_batch`` caps the
    UNet batch (None: the pipeline's, or chosen from free GPU memory)."""
    from instdiff_lib.sampling.pipeline import DEFAULT_NEGATIVE_PROMPT, InstanceDiffusionPipeline
    from instdiff_lib.weights.embedded import default_model, recommended_negative_prompt

    model = model or default_model()
    if negative_prompt is None:
        negative_prompt = recommended_negative_prompt(model)

    layout_path = Path(layout_path)
    layout = Layout.from_json(layout_path, truncate=truncate)  # validates before any model is loaded
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = layout_path.stem
    params = {"layout": layout.to_json(), "model": model, "seed": seed, "steps": steps, "guidance": guidance,
              "alpha": alpha, "mis": mis, "num_images": num_images, "drop": drop, "method": method,
              "negative_prompt": DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt, "refine": refine,
              "dtype": str(dtype)}
    if skip_mode is not None:  # only when given, so the outputs of runs without it keep their hash
        params["skip_mode"] = skip_mode
    key = params_hash(params)
    image_paths = [out / f"{stem}__seed{seed}__{k}.png" for k in range(num_images)]
    meta_path = out / f"{stem}__seed{seed}.json"
    overlay_path = out / f"{stem}__seed{seed}__overlay.png"
    layout_png = out / f"{stem}__layout.png"
    all_paths = [*image_paths, overlay_path, layout_png, meta_path]
    if not overwrite and meta_path.exists() and all(p.exists() for p in all_paths):
        if json.loads(meta_path.read_text()).get("params_hash") == key:
            print(f"{stem}: already generated with these parameters in {out} (use --overwrite to redo)")
            return all_paths

    pipe = pipe or InstanceDiffusionPipeline.from_pretrained(model, device=device, dtype=dtype, verify=verify)
    with skip_mode_set(pipe.c.unet, skip_mode):
        result = pipe(layout, seed=seed, steps=steps, guidance=guidance, alpha=alpha, mis=mis, num_images=num_images,
                      negative_prompt=params["negative_prompt"], drop=drop, method=method, progress=progress,
                      max_batch=max_batch)
    images = result.images
    if refine > 0:
        images = refine_images(images, layout.caption, refine, device)
    for img, p in zip(images, image_paths):
        atomic_save_image(img, p)
    atomic_save_image(draw_layout(layout), layout_png)
    atomic_save_image(draw_layout(layout, image=images[0].resize((512, 512))), overlay_path)
    meta = {"params_hash": key, "layout_file": str(layout_path), "images": [p.name for p in image_paths],
            **result.info, "refine": refine, "skip_mode": pipe.c.unet.skip_mode if skip_mode is None else skip_mode}
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return all_paths
