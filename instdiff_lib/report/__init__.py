"""The report: notebook drivers (:mod:`.sections`), the run context (:mod:`.context`), the papermill runner
(:mod:`.runner`), the blog renderer (:mod:`.blog`) and the paper's and seed's reported numbers (:mod:`.reported`).
The top of the library: may import every package below it; never imports a notebook or a job script."""

from instdiff_lib.report.context import NotebookRun, show, start
from instdiff_lib.report.playground import playground_example
from instdiff_lib.report.sections import (ablations, attribute_binding, blogpost, demos, extension, location_formats,
                                          setup_check, world_of)

__all__ = ["NotebookRun", "start", "show", "setup_check", "demos", "location_formats", "attribute_binding", "ablations",
           "extension", "blogpost", "world_of", "playground_example"]
