"""The report: the notebooks' steps (:mod:`.sections`), their tables (:mod:`.tables`) and figures (:mod:`.figures`),
the run context (:mod:`.context`), the papermill runner (:mod:`.runner`), the blog renderer (:mod:`.blog`) and the
paper's and seed's reported numbers (:mod:`.reported`). The protocol steps the notebooks call live in
:mod:`instdiff_lib.evaluation.experiments`.
The top of the library: may import every package below it; never imports a notebook or a job script."""

from instdiff_lib.report import figures, tables
from instdiff_lib.report.context import NotebookRun, show, start
from instdiff_lib.report.playground import playground_example
from instdiff_lib.report.sections import (ablation_plan, blogpost, chance, check_placement, demo, demo_scenes,
                                          environment, first_image, generate_planned, grounding_gap, out_root,
                                          parity_check, placement_detector, plan_layouts, planner, rating_sheet,
                                          training_record, variants, weights_inventory, world_of, write_ablations,
                                          write_attribute_binding, write_demos, write_extension,
                                          write_location_formats, write_setup)

__all__ = ["NotebookRun", "start", "show", "figures", "tables", "world_of", "out_root", "variants", "chance",
           "ablation_plan", "environment", "weights_inventory", "first_image", "parity_check", "grounding_gap",
           "training_record", "write_setup", "demo_scenes", "demo", "write_demos", "write_location_formats", "write_attribute_binding",
           "write_ablations", "planner", "plan_layouts", "generate_planned", "placement_detector", "check_placement",
           "rating_sheet", "write_extension", "blogpost", "playground_example"]
