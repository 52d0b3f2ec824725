"""Tests for instdiff_lib.viz: layout overlays (x = column, y = row) and image grids."""

import numpy as np
from PIL import Image

from instdiff_lib.layouts.layout import Instance, Layout
from instdiff_lib.viz import PALETTE, draw_layout, image_grid

WHITE = (255, 255, 255)


def is_white(region: np.ndarray) -> bool:
    return bool((region == 255).all())


def test_box_in_the_top_right_changes_only_the_top_right():
    layout = Layout("", 512, 512, [Instance("a car", box=(0.6, 0.05, 0.95, 0.3))])
    img = np.asarray(draw_layout(layout))
    assert img.shape == (512, 512, 3)
    assert not is_white(img[20:160, 300:490])  # outline and caption tag
    assert is_white(img[:, :290])  # left part untouched
    assert is_white(img[170:, :])  # bottom untouched (no global caption)
    assert tuple(img[100, int(0.6 * 512)]) == PALETTE[0]  # left edge of the box, row 100


def test_non_square_image_scales_x_by_width_and_y_by_height():
    base = Image.new("RGB", (300, 200), (0, 0, 0))
    layout = Layout("", 768, 512, [Instance("q", box=(0.5, 0.0, 1.0, 0.5))])
    out = draw_layout(layout, image=base)
    assert out.size == (300, 200)
    img = np.asarray(out)
    assert tuple(img[50, 150]) == PALETTE[0]  # x0 = 0.5 * 300 = 150, y = 50 inside [0, 100]
    assert not img[110:, :].any() and not img[:, :140].any()  # everything else stays black
    assert np.asarray(base).max() == 0  # input not modified


def test_mask_is_a_semi_transparent_fill():
    mask = np.zeros((64, 128), bool)  # layout frame 128 x 64 (W x H)
    mask[:32, 64:] = True  # top-right quarter
    layout = Layout("", 128, 64, [Instance("m", mask=mask, box=(0.5, 0.0, 1.0, 0.5))])
    img = np.asarray(draw_layout(layout, size=256)).astype(int)
    inside, outside = img[60, 200], img[200, 60]
    assert tuple(outside) == WHITE
    colour = np.array(PALETTE[0])
    assert np.all(inside < 255) and np.all(inside > colour)  # blended with white, not opaque


def test_points_and_scribbles_are_drawn_where_they_are():
    layout = Layout("", 512, 512, [
        Instance("dot", point=(0.8, 0.1)),
        Instance("line", scribble=np.array([[0.1, 0.9], [0.3, 0.9]])),
    ])
    img = np.asarray(draw_layout(layout))
    assert tuple(img[int(0.1 * 512), int(0.8 * 512)]) == PALETTE[0]
    assert tuple(img[int(0.9 * 512), int(0.2 * 512)]) == PALETTE[1]  # middle of the polyline
    assert is_white(img[200:400, 150:350])


def test_global_caption_goes_in_a_band_at_the_bottom():
    instances = [Instance("dot", point=(0.5, 0.1))]
    with_caption = np.asarray(draw_layout(Layout("a long global caption " * 5, 512, 512, instances)))
    without = np.asarray(draw_layout(Layout("", 512, 512, instances)))
    assert (with_caption[-60:] < 100).any() and is_white(without[-60:])
    assert np.array_equal(with_caption[:300], without[:300])


def test_image_grid_places_images_row_by_row():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (40, 30), c) for c in colours]
    grid = image_grid(images, ncols=2)
    assert grid.size == (80, 60)
    assert grid.getpixel((10, 10)) == colours[0]
    assert grid.getpixel((50, 10)) == colours[1]
    assert grid.getpixel((10, 40)) == colours[2]
    assert grid.getpixel((50, 40)) == WHITE  # empty cell
