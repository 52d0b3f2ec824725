"""The JupyterLab playground (``notebooks/02_playground.ipynb``): draw instances, caption them, Generate.

``editor`` (pointer events -> instances), ``session`` (check, save as official demo JSON, generate through
``instdiff generate``'s own code path), ``app`` (the ipywidgets + ipyevents front end, imported on use).
Sits beside ``extension`` and ``training``: may import ``sampling``, ``weights``, ``model``, ``layouts``,
``datasets`` (the Shapes vocabulary) and the top-level ``fileio``/``viz``/``results``; never a notebook."""

from instdiff_lib.playground.editor import TOOLS, Editor
from instdiff_lib.playground.session import PlaygroundError, Result, Session, Settings, layout_files


def app(session: Session, size: int = 512):
    """The widgets for ``session`` (ipywidgets and ipyevents are imported here, not with the package)."""
    from instdiff_lib.playground.app import App

    return App(session, size=size)


__all__ = ["TOOLS", "Editor", "PlaygroundError", "Result", "Session", "Settings", "app", "layout_files"]
