"""The steps of ``notebooks/02_playground.ipynb`` that touch the report's figures (outside the report chain)."""

from __future__ import annotations

from typing import Any

from instdiff_lib.playground import Session
from instdiff_lib.report.context import NotebookRun


def playground_example(run: NotebookRun, session: Session) -> Any:
    """Headless (``HEADLESS=True``, as papermill runs it): generate the loaded layout with the parameters' settings
    and save image, layout and overlay side by side as ``figures/02_playground__example.png``. Interactive: a note
    (nothing is generated until Generate is pressed)."""
    if not run.params.get("HEADLESS"):
        return "interactive: draw on the canvas above, caption each instance, press Generate"
    result = session.generate(progress=False)
    panel = result.panel(size=256)
    run.figure(panel, "example")
    print(result.command_line())
    return panel
