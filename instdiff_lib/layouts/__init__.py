"""Layouts: instances with a caption and a box, point, scribble or mask, in the official demo JSON format.
The bottom of the data flow (layout -> tokens -> UNet -> sampler -> images); ``derive`` makes points and
scribbles from masks. Imports nothing else from instdiff_lib."""

from instdiff_lib.layouts.layout import Instance, Layout, LayoutError

__all__ = ["Instance", "Layout", "LayoutError"]
