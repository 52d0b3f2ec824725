"""What the playground does with a drawing: check it, save it as official demo JSON, generate from it.

A :class:`Session` holds an :class:`~.editor.Editor`, the generation :class:`Settings` and the results so far.
:meth:`Session.generate` writes the layout to ``<out>/<name>.json`` (the name is a hash of the layout, so an
edited layout never overwrites an earlier result) and runs :func:`~instdiff_lib.sampling.generate.generate_from_layout`
on that file, exactly as ``instdiff generate`` does: :meth:`Result.command` is the command line that gives
the same image. Bad input raises :class:`PlaygroundError` with a message for the person drawing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from instdiff_lib.fileio import atomic_write_text
from instdiff_lib.layouts.layout import N_SLOTS, Layout, LayoutError
from instdiff_lib.model.config import SKIP_MODES
from instdiff_lib.playground.editor import Editor
from instdiff_lib.results import project_root
from instdiff_lib.viz import image_grid

DROPS = ("mask", "box", "point", "all")
DTYPES = {"float32": ("fp32", torch.float32), "float16": ("fp16", torch.float16), "bfloat16": ("bf16", torch.bfloat16)}


class PlaygroundError(ValueError):
    """Input the playground cannot use; the message says what to change."""


@dataclass
class Settings:
    """The sampler settings of a Generate; the names and values of ``instdiff generate``'s options."""

    seed: int = 0
    steps: int = 25
    guidance: float = 3.0
    alpha: float = 1.0
    mis: float = 0.36
    drop: str = "mask"
    skip_mode: str = "scaleu"
    keep_seed: bool = True  # False: every Generate takes the next seed

    def check(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise PlaygroundError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if not 1 <= self.steps <= 999:  # the sampler's bound (Schedule.make)
            raise PlaygroundError(f"steps must be between 1 and 999, got {self.steps}")
        for name in ("alpha", "mis"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PlaygroundError(f"{name} is a fraction of the steps, between 0 and 1; got {getattr(self, name)}")
        if self.drop not in DROPS:
            raise PlaygroundError(f"modality preset must be one of {DROPS}, got {self.drop!r}")
        if self.skip_mode not in SKIP_MODES:
            raise PlaygroundError(f"skip mode must be one of {SKIP_MODES}, got {self.skip_mode!r}")


@dataclass
class Result:
    """One Generate: the files written (as ``instdiff generate`` names them) and how to redo it."""

    layout_file: Path
    image_file: Path
    layout_png: Path
    overlay_png: Path
    meta_file: Path
    settings: Settings
    model: str
    device: str
    dtype: str
    seconds: float
    reused: bool = False  # the same layout and settings were generated before: the files were reused

    @property
    def image(self) -> Image.Image:
        return Image.open(self.image_file).convert("RGB")

    def panel(self, size: int = 256) -> Image.Image:
        """Image, layout and overlay side by side."""
        panels = []
        for p in (self.image_file, self.layout_png, self.overlay_png):
            img = Image.open(p).convert("RGB")
            up = img.width < size  # the Shapes model's 64 px image: keep its pixels visible
            panels.append(img.resize((size, size), Image.Resampling.NEAREST if up else Image.Resampling.LANCZOS))
        return image_grid(panels, ncols=3)

    def command(self) -> list[str]:
        """The ``instdiff generate`` command line that writes the same image."""
        s = self.settings
        cmd = ["instdiff", "generate", _rel(self.layout_file), "--out", _rel(self.layout_file.parent),
               "--seed", str(s.seed), "--steps", str(s.steps), "--guidance", str(s.guidance), "--alpha", str(s.alpha),
               "--mis", str(s.mis), "--drop", s.drop, "--skip-mode", s.skip_mode, "--device", self.device,
               "--dtype", DTYPES[self.dtype][0]]
        if self.model:
            cmd += ["--model", _rel(Path(self.model))]
        return cmd

    def command_line(self) -> str:
        return shlex.join(self.command())


def _rel(p: Path) -> str:
    p = Path(p)
    try:
        return str(p.resolve().relative_to(project_root()))
    except ValueError:
        return str(p)


def resolve(path: str | os.PathLike) -> Path:
    """A path as the notebooks read it: relative paths are relative to the project root."""
    p = Path(path)
    return p if p.is_absolute() else project_root() / p


def layout_files(folder: str | os.PathLike = "layouts") -> list[str]:
    """The layout JSON files under ``folder`` (relative to the project root), sorted."""
    root = resolve(folder)
    return sorted(_rel(p) for p in root.rglob("*.json")) if root.is_dir() else []


class Session:
    """The playground's state: the editor, the settings, the model (loaded on first use) and the results."""

    def __init__(self, model: str = "", device: str = "cpu", dtype: str = "float32", out_dir: str = "outputs/playground",
                 frame: int = 64, settings: Settings | None = None, caption: str = ""):
        if dtype not in DTYPES:
            raise PlaygroundError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.model = model  # "" = the embedded default (the committed Shapes mini model)
        self.device, self.dtype = device, dtype
        self.out_dir = out_dir
        self.editor = Editor(frame, frame)
        self.settings = settings or Settings()
        self.caption = caption  # the global prompt; "" = composed from the instance captions
        self.results: list[Result] = []
        self.listeners: list = []  # called with each new Result (the widgets' result panel)
        self._pipe = None
        self._pipe_key = None

    @classmethod
    def from_params(cls, params: dict) -> "Session":
        """A session from the notebook's parameters (LAYOUT, MODEL, DEVICE, DTYPE, OUT_DIR, FRAME, SEED, ...)."""
        s = Settings(seed=params.get("SEED", 0), steps=params.get("STEPS", 25), guidance=params.get("GUIDANCE", 3.0),
                     alpha=params.get("ALPHA", 1.0), mis=params.get("MIS", 0.36), drop=params.get("DROP", "mask"),
                     skip_mode=params.get("SKIP_MODE", "scaleu"))
        s.check()
        session = cls(model=params.get("MODEL", ""), device=params.get("DEVICE", "cpu"),
                      dtype=params.get("DTYPE", "float32"), out_dir=params.get("OUT_DIR", "outputs/playground"),
                      frame=params.get("FRAME", 64), settings=s)
        if params.get("LAYOUT"):
            session.load(params["LAYOUT"])
        return session

    def __repr__(self) -> str:
        return (f"playground session: {len(self.editor.instances)} instances on a {self.editor.width}x"
                f"{self.editor.height} frame; model {self.model_path()}; {asdict(self.settings)}; outputs in "
                f"{self.out_dir}")

    # ---- model -----------------------------------------------------------------------------------------
    def model_path(self) -> str:
        from instdiff_lib.weights.embedded import default_model

        return str(resolve(self.model)) if self.model else default_model()

    def is_shapes_model(self) -> bool:
        cfg = Path(self.model_path()) / "model_config.json"
        return cfg.exists() and json.loads(cfg.read_text()).get("name", "").startswith("shapes")

    def vocabulary(self) -> list[str]:
        """Captions to offer: every Shapes caption for the Shapes model, none otherwise (free text)."""
        if not self.is_shapes_model():
            return []
        from instdiff_lib.datasets.shapes import COLORS, SHAPES, TEXTURE_ADJECTIVE

        return [f"a {c} {t} {s}" for s in SHAPES for c in COLORS for t in TEXTURE_ADJECTIVE.values()]

    def pipeline(self):
        """The model's pipeline, loaded once per (model, device, dtype)."""
        from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

        key = (self.model_path(), self.device, self.dtype)
        if self._pipe is None or self._pipe_key != key:
            try:
                self._pipe = InstanceDiffusionPipeline.from_pretrained(key[0], device=self.device,
                                                                       dtype=DTYPES[self.dtype][1])
            except Exception as e:  # noqa: BLE001 - a missing/corrupt model is bad input here, named in the message
                raise PlaygroundError(f"cannot load the model {key[0]}: {e}") from e
            self._pipe_key = key
        return self._pipe

    # ---- layout ----------------------------------------------------------------------------------------
    def global_caption(self) -> str:
        """The prompt: the one typed, or composed from the instance captions."""
        if self.caption.strip():
            return self.caption
        captions = [i.caption for i in self.editor.instances if i.caption.strip()]
        if self.is_shapes_model():
            from instdiff_lib.datasets.shapes import global_caption

            return global_caption(captions)
        return ", ".join(captions)

    def layout(self) -> Layout:
        """The drawing as a validated layout; :class:`PlaygroundError` names what is wrong."""
        if not self.editor.instances:
            raise PlaygroundError("the layout is empty: draw an instance (a box, point, scribble or mask) first")
        layout = self.editor.layout(self.global_caption())
        try:
            layout.validate(max_instances=N_SLOTS)
        except LayoutError as e:
            raise PlaygroundError(str(e)) from None
        return layout

    def check_captions(self, layout: Layout) -> None:
        """Every caption fits the text encoder (CLIP's 77 tokens), checked with the model's own tokenizer."""
        from instdiff_lib.model.text import MAX_TOKENS

        text = self.pipeline().c.text
        for k, inst in enumerate(layout.instances):
            n = text.n_tokens(inst.caption)
            if n > MAX_TOKENS:
                raise PlaygroundError(f"instance {k}: its caption is {n} CLIP tokens, more than the text encoder's "
                                      f"{MAX_TOKENS}; shorten it ({inst.caption[:60]!r}...)")
        n = text.n_tokens(layout.caption)
        if n > MAX_TOKENS:
            raise PlaygroundError(f"the prompt is {n} CLIP tokens, more than the text encoder's {MAX_TOKENS}; "
                                  "shorten it (or clear it to compose it from the instance captions)")

    def load(self, path: str | os.PathLike) -> Layout:
        """Load a layout file (official demo JSON) into the editor; its caption becomes the prompt."""
        try:
            layout = Layout.from_json(resolve(path))
        except LayoutError as e:
            raise PlaygroundError(str(e)) from None
        self.editor.load(layout)
        self.caption = layout.caption
        return layout

    def save(self, path: str | os.PathLike) -> Path:
        """Write the layout as official demo JSON (what ``instdiff generate`` reads)."""
        target = resolve(path)
        if target.suffix != ".json":
            raise PlaygroundError(f"a layout file ends in .json, got {str(path)!r}")
        layout = self.layout()
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(layout.to_json(), indent=1) + "\n")
        return target

    # ---- generate --------------------------------------------------------------------------------------
    def generate(self, progress: bool = True) -> Result:
        """Check the drawing, write it as ``<out>/layout-<hash>.json`` and generate from that file."""
        from instdiff_lib.sampling.generate import generate_from_layout
        from instdiff_lib.model.text import PromptTooLongError

        s = self.settings
        if not s.keep_seed and self.results:
            s.seed = self.results[-1].settings.seed + 1
        s.check()
        layout = self.layout()
        self.check_captions(layout)
        doc = json.dumps(layout.to_json(), indent=1) + "\n"
        out = resolve(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        layout_file = out / f"layout-{hashlib.sha256(doc.encode()).hexdigest()[:10]}.json"
        if not layout_file.exists():
            atomic_write_text(layout_file, doc)
        stem = layout_file.stem
        meta_file = out / f"{stem}__seed{s.seed}.json"
        before = meta_file.stat().st_mtime_ns if meta_file.exists() else None
        t0 = time.perf_counter()
        try:
            generate_from_layout(layout_file, out, model=self.model_path(), seed=s.seed, steps=s.steps,
                                 guidance=s.guidance, alpha=s.alpha, mis=s.mis, device=self.device,
                                 dtype=DTYPES[self.dtype][1], drop=s.drop, skip_mode=s.skip_mode,
                                 pipe=self.pipeline(), progress=progress)
        except (LayoutError, PromptTooLongError) as e:
            raise PlaygroundError(str(e)) from None
        result = Result(layout_file=layout_file, image_file=out / f"{stem}__seed{s.seed}__0.png",
                        layout_png=out / f"{stem}__layout.png", overlay_png=out / f"{stem}__seed{s.seed}__overlay.png",
                        meta_file=meta_file, settings=Settings(**asdict(s)), model=self.model, device=self.device,
                        dtype=self.dtype, seconds=round(time.perf_counter() - t0, 2),
                        reused=before is not None and meta_file.stat().st_mtime_ns == before)
        self.results.append(result)
        for listener in self.listeners:
            listener(result)
        return result

