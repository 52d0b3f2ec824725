"""The report: notebook drivers (:mod:`.sections`), the run context (:mod:`.context`), the papermill runner
(:mod:`.runner`) and the blog renderer (:mod:`.blog`). Notebooks import from here; this package never imports
a notebook or a job script."""

from .context import NotebookRun, show, start
from .sections import (ablations, attribute_binding, blogpost, demos, extension, location_formats, setup_check,
                       world_of)

__all__ = ["NotebookRun", "start", "show", "setup_check", "demos", "location_formats", "attribute_binding", "ablations",
           "extension", "blogpost", "world_of"]
