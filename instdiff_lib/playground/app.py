"""The playground's widgets (ipywidgets + ipyevents): a canvas to draw on, instance editing, settings, Generate.

The canvas is an ``ipywidgets.Image`` showing :meth:`~.editor.Editor.render` (the very drawing of the saved
``__layout.png``); ipyevents forwards its mouse events to the editor. Everything the widgets do is a call into
:class:`~.session.Session`; a refused input shows its message under the canvas, never a traceback. Each control
carries a CSS class ``instdiff-<name>`` (what the browser test looks for).
"""

from __future__ import annotations

import html
import io
import traceback

from PIL import Image

from instdiff_lib.model.config import SKIP_MODES
from instdiff_lib.playground.editor import TOOLS
from instdiff_lib.playground.session import DROPS, PlaygroundError, Result, Session, layout_files

STRIP = 8  # earlier results kept in the strip


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class App:
    """The widgets of one session (display it, or its ``root``)."""

    def __init__(self, session: Session, size: int = 512):
        import ipywidgets as W
        from ipyevents import Event

        self.session, self.size = session, size
        ed = session.editor
        s = session.settings
        self._syncing = False

        def tag(widget, name):
            widget.add_class(f"instdiff-{name}")
            return widget

        # ---- drawing ------------------------------------------------------------------------------------
        self.canvas = tag(W.Image(format="png", width=size, height=size,
                                  layout=W.Layout(width=f"{size}px", height=f"{size}px")), "canvas")
        self.events = Event(source=self.canvas, watched_events=["mousedown", "mouseup", "mouseleave"],
                            prevent_default_action=True)
        self.moves = Event(source=self.canvas, watched_events=["mousemove"], prevent_default_action=True,
                           throttle_or_debounce="throttle", wait=30)
        self.events.on_dom_event(self._on_mouse)
        self.moves.on_dom_event(self._on_mouse)
        self.tool = tag(W.ToggleButtons(options=list(TOOLS), value=ed.tool, description="tool",
                                        style={"button_width": "72px"}), "tool")
        self.caption = tag(W.Combobox(value=ed.next_caption, options=session.vocabulary(), ensure_option=False,
                                      placeholder="caption of the selected (or next) instance", description="caption",
                                      layout=W.Layout(width="100%")), "caption")
        self.instances = tag(W.Select(options=[], rows=8, description="instances", layout=W.Layout(width="100%")),
                             "instances")
        self.delete = tag(W.Button(description="Delete instance", icon="trash"), "delete")
        self.finish = tag(W.Button(description="Close polygon"), "finish")
        self.prompt = tag(W.Text(value=session.caption, description="prompt",
                                 placeholder="empty: composed from the instance captions",
                                 layout=W.Layout(width="100%")), "prompt")
        self.underlay = tag(W.Checkbox(value=False, description="draw over the last image"), "underlay")

        # ---- settings -----------------------------------------------------------------------------------
        self.seed = tag(W.BoundedIntText(value=s.seed, min=0, max=2**31 - 1, description="seed",
                                         continuous_update=True), "seed")
        self.keep_seed = tag(W.Checkbox(value=s.keep_seed, description="keep the seed (same noise across edits)"),
                             "keep-seed")
        self.steps = tag(W.BoundedIntText(value=s.steps, min=1, max=999, description="steps", continuous_update=True),
                         "steps")
        self.guidance = tag(W.FloatSlider(value=s.guidance, min=1.0, max=15.0, step=0.5, description="guidance"),
                            "guidance")
        self.alpha = tag(W.FloatSlider(value=s.alpha, min=0.0, max=1.0, step=0.05, description="alpha"), "alpha")
        self.mis = tag(W.FloatSlider(value=s.mis, min=0.0, max=1.0, step=0.02, description="MIS"), "mis")
        self.skip = tag(W.Dropdown(options=list(SKIP_MODES), value=s.skip_mode, description="skip mode"), "skip")
        self.drop = tag(W.Dropdown(options=list(DROPS), value=s.drop, description="modality drop"), "drop")
        self.model = tag(W.Text(value=session.model, description="model",
                                placeholder="empty: the embedded default; or a converted folder"), "model")
        self.out_dir = tag(W.Text(value=session.out_dir, description="output folder"), "out-dir")

        # ---- files, generate, results -------------------------------------------------------------------
        self.load_file = tag(W.Dropdown(options=[""] + layout_files(), value="", description="layout file"),
                             "load-file")
        self.load = tag(W.Button(description="Load"), "load")
        self.clear = tag(W.Button(description="New (blank)"), "clear")
        self.save_path = tag(W.Text(value="outputs/playground/drawn.json", description="save as"), "save-path")
        self.save = tag(W.Button(description="Save layout", icon="save"), "save")
        self.generate = tag(W.Button(description="Generate", button_style="primary", icon="play"), "generate")
        self.message = tag(W.HTML(value=""), "message")
        self.log = tag(W.Output(), "log")  # the progress bar while generating
        half = f"{size // 2}px"
        blank = _png(Image.new("RGB", (size // 2, size // 2), (245, 245, 245)))  # until the first result
        self.result_images = [tag(W.Image(value=blank, format="png", width=size // 2, height=size // 2,
                                          layout=W.Layout(width=half, height=half)), f"result-{k}")
                              for k in ("image", "layout", "overlay")]
        self.command = tag(W.HTML(value=""), "command")
        self.strip = tag(W.HBox([]), "strip")

        # ---- wiring -------------------------------------------------------------------------------------
        self.tool.observe(lambda c: self._edit(ed.set_tool, c["new"]), names="value")
        self.caption.observe(self._on_caption, names="value")
        self.instances.observe(self._on_select, names="index")
        self.delete.on_click(lambda _: self._edit(ed.delete))
        self.finish.on_click(lambda _: self._edit(ed.finish))
        self.prompt.observe(lambda c: self._set(session, "caption", c["new"]), names="value")
        self.underlay.observe(lambda c: self.refresh(), names="value")
        for name in ("seed", "keep_seed", "steps", "guidance", "alpha", "mis", "drop"):
            getattr(self, name).observe(lambda c, n=name: setattr(session.settings, n, c["new"]), names="value")
        self.skip.observe(lambda c: setattr(session.settings, "skip_mode", c["new"]), names="value")
        self.model.observe(lambda c: self._on_model(c["new"]), names="value")
        self.out_dir.observe(lambda c: setattr(session, "out_dir", c["new"]), names="value")
        self.load.on_click(self._on_load)
        self.clear.on_click(self._on_clear)
        self.save.on_click(self._on_save)
        self.generate.on_click(self._on_generate)
        session.listeners.append(self._on_result)

        draw = W.VBox([self.tool, W.HBox([
            W.Box([self.canvas], layout=W.Layout(border="1px solid #888", overflow="visible", flex="0 0 auto")),
            W.VBox([self.caption, self.instances, W.HBox([self.delete, self.finish]), self.prompt, self.underlay,
                    W.HBox([self.load_file, self.load, self.clear]), W.HBox([self.save_path, self.save])],
                   layout=W.Layout(width="460px"))])])
        settings = W.VBox([W.HBox([self.seed, self.keep_seed]), W.HBox([self.steps, self.guidance]),
                           W.HBox([self.alpha, self.mis]), W.HBox([self.skip, self.drop]),
                           W.HBox([self.model, self.out_dir])])
        results = W.VBox([W.HTML("<b>result</b>: image, layout, overlay"), W.HBox(self.result_images), self.command,
                          W.HTML("<b>earlier results</b>"), self.strip])
        self.root = W.VBox([draw, settings, W.HBox([self.generate, self.message]), self.log, results])
        self.refresh()
        for r in session.results[-STRIP:]:
            self._on_result(r)

    def _repr_mimebundle_(self, **kwargs):
        return self.root._repr_mimebundle_(**kwargs)

    # ---- drawing ---------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Redraw the canvas and the instance list; show the editor's message, if any."""
        ed, session = self.session.editor, self.session
        under = session.results[-1].image if self.underlay.value and session.results else None
        self.canvas.value = _png(ed.render(session.global_caption(), self.size, image=under))
        self._syncing = True
        try:
            labels = []
            for k, inst in enumerate(ed.instances):
                kinds = [n for n in ("box", "point", "scribble", "mask") if getattr(inst, n) is not None]
                labels.append(f"{k}: {inst.caption or '(no caption)'} [{', '.join(kinds)}]")
            self.instances.options = labels
            self.instances.index = ed.selected
            self.caption.value = ed.next_caption
        finally:
            self._syncing = False
        if ed.message:
            self.show(ed.message, error=True)

    def show(self, text: str, error: bool = False) -> None:
        colour = "#b00020" if error else "#1b5e20"
        self.message.value = f'<span style="color:{colour}">{html.escape(text)}</span>'

    def _edit(self, fn, *args) -> None:
        self.message.value = ""
        fn(*args)
        self.refresh()

    def _set(self, obj, name: str, value) -> None:
        setattr(obj, name, value)
        self.refresh()

    def _on_mouse(self, event: dict) -> None:
        w = event.get("boundingRectWidth") or self.size
        h = event.get("boundingRectHeight") or self.size
        x, y = event["relativeX"] / w, event["relativeY"] / h
        ed = self.session.editor
        kind = event["type"]
        if kind == "mousedown":
            self.message.value = ""
            ed.press(x, y)
        elif kind == "mousemove":
            if ed.drag is None:
                return
            ed.drag_to(x, y)
        elif kind in ("mouseup", "mouseleave"):
            if ed.drag is None and not (kind == "mouseup" and ed.tool == "point"):
                return
            ed.release(x, y)
        self.refresh()

    def _on_caption(self, change) -> None:
        if not self._syncing:
            self.session.editor.set_caption(change["new"])
            self.refresh()

    def _on_select(self, change) -> None:
        if not self._syncing:
            self.session.editor.select(change["new"])
            self.refresh()

    def _on_model(self, value: str) -> None:
        self.session.model = value
        self.caption.options = self.session.vocabulary() if not value or _exists(value) else []

    # ---- files and generation --------------------------------------------------------------------------
    def _guard(self, fn) -> None:
        """Run ``fn``; bad input shows its message, an unexpected error its type and text (details in the log)."""
        try:
            fn()
        except PlaygroundError as e:
            self.show(str(e), error=True)
        except Exception as e:  # noqa: BLE001 - the notebook shows a message, the traceback goes to the log
            self.show(f"unexpected error: {type(e).__name__}: {e}", error=True)
            with self.log:
                traceback.print_exc()

    def _on_load(self, _=None) -> None:
        def load():
            if not self.load_file.value:
                raise PlaygroundError("choose a layout file to load")
            layout = self.session.load(self.load_file.value)
            self.prompt.value = self.session.caption
            self.refresh()
            self.show(f"loaded {self.load_file.value}: {len(layout.instances)} instances")
        self._guard(load)

    def _on_clear(self, _=None) -> None:
        self.session.editor.clear()
        self.prompt.value = ""
        self.refresh()

    def _on_save(self, _=None) -> None:
        def save():
            path = self.session.save(self.save_path.value)
            self.show(f"saved {path}")
        self._guard(save)

    def _on_generate(self, _=None) -> None:
        def run():
            self.show("generating...")
            self.log.clear_output()
            with self.log:
                result = self.session.generate(progress=True)
            self.log.clear_output()
            what = "reused (same layout and settings)" if result.reused else f"done in {result.seconds:.1f} s"
            self.show(f"{what}: {result.image_file}")
        self.generate.disabled = True
        try:
            self._guard(run)
        finally:
            self.generate.disabled = False

    def _on_result(self, result: Result) -> None:
        import ipywidgets as W

        for widget, path in zip(self.result_images, (result.image_file, result.layout_png, result.overlay_png)):
            img = Image.open(path).convert("RGB")
            widget.value = _png(img.resize((self.size // 2,) * 2, Image.Resampling.NEAREST))
        self.command.value = f"<code>{html.escape(result.command_line())}</code>"
        if self.seed.value != result.settings.seed:
            self.seed.value = result.settings.seed
        thumb = W.Image(value=_png(result.image.resize((96, 96), Image.Resampling.NEAREST)), width=96, height=96)
        label = W.HTML(f"<small>seed {result.settings.seed}, {result.settings.steps} steps</small>")
        self.strip.children = (W.VBox([thumb, label]), *self.strip.children)[:STRIP]
        if self.underlay.value:
            self.refresh()


def _exists(path: str) -> bool:
    from instdiff_lib.playground.session import resolve

    return resolve(path).exists()

