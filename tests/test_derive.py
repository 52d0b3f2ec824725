"""Tests for instdiff_lib.layouts.derive: scribbles, mask points and boxes derived from masks (spec §3.3)."""

import numpy as np
import pytest

from instdiff_lib.layouts import derive


def wide_top_right_mask(h: int = 512, w: int = 512) -> np.ndarray:
    """A wide, short rectangle in the top-right corner: rows 10..29, cols 300..499 (x > y everywhere)."""
    m = np.zeros((h, w), bool)
    m[10:30, 300:500] = True
    return m


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -----------------------------------------------------------------------------
# box_from_mask


def test_box_from_mask_is_tight_xyxy_in_x_col_y_row_order():
    assert derive.box_from_mask(wide_top_right_mask()) == (300 / 512, 10 / 512, 500 / 512, 30 / 512)


def test_box_from_mask_non_square_frame_divides_x_by_width_and_y_by_height():
    m = np.zeros((512, 768), bool)  # (H, W)
    m[100:200, 600:700] = True
    assert derive.box_from_mask(m) == (600 / 768, 100 / 512, 700 / 768, 200 / 512)


def test_box_from_empty_mask_is_none():
    assert derive.box_from_mask(np.zeros((8, 8), bool)) is None


# -----------------------------------------------------------------------------
# scribble_from_mask


def test_scribble_from_mask_points_are_foreground_pixels_sorted_by_distance():
    m = wide_top_right_mask()
    s = derive.scribble_from_mask(m, rng(), k=20)
    assert s.shape == (20, 2)
    cols, rows = np.rint(s[:, 0] * 512).astype(int), np.rint(s[:, 1] * 512).astype(int)
    assert m[rows, cols].all()
    dist = np.hypot(rows, cols)
    assert np.all(np.diff(dist) >= 0)
    assert len(set(zip(rows, cols))) == 20  # enough pixels -> sampled without replacement


def test_scribble_from_mask_uses_x_for_columns():
    s = derive.scribble_from_mask(wide_top_right_mask(), rng(), k=20)
    assert np.all(s[:, 0] > s[:, 1])  # the mask lies where col > row
    assert np.ptp(s[:, 0]) > np.ptp(s[:, 1])  # wide and short


def test_scribble_from_tiny_mask_samples_with_replacement():
    m = np.zeros((64, 64), bool)
    pixels = [(5, 40), (6, 41), (7, 42), (8, 43), (9, 44)]
    for r, c in pixels:
        m[r, c] = True
    s = derive.scribble_from_mask(m, rng(), k=20)
    assert s.shape == (20, 2)
    got = {(int(round(y * 64)), int(round(x * 64))) for x, y in s}
    assert got <= set(pixels)


def test_scribble_from_empty_mask_is_zeros():
    s = derive.scribble_from_mask(np.zeros((32, 32), bool), rng(), k=20)
    assert s.shape == (20, 2) and not s.any()


def test_scribble_from_mask_is_seeded():
    m = wide_top_right_mask()
    a = derive.scribble_from_mask(m, rng(1))
    assert np.array_equal(a, derive.scribble_from_mask(m, rng(1)))
    assert not np.array_equal(a, derive.scribble_from_mask(m, rng(2)))


# -----------------------------------------------------------------------------
# reorder_scribble


def test_reorder_scribble_upsamples_with_the_official_index_pattern():
    pts = np.array([[0.9, 0.9], [0.1, 0.1], [0.5, 0.4]])  # deliberately unsorted
    out = derive.reorder_scribble(pts, k=20)
    # sorted: p0 = (0.1, 0.1), p1 = (0.5, 0.4), p2 = (0.9, 0.9); indices (i * 3) // 20 -> 7 x p0, 7 x p1, 6 x p2
    expected = np.array([[0.1, 0.1]] * 7 + [[0.5, 0.4]] * 7 + [[0.9, 0.9]] * 6)
    assert np.array_equal(out, expected)


def test_reorder_scribble_downsamples_every_other_point():
    pts = np.stack([np.arange(40) / 40, np.zeros(40)], axis=1)  # already sorted along x
    out = derive.reorder_scribble(pts[::-1], k=20)
    assert np.array_equal(out, pts[0:40:2])


def test_reorder_scribble_single_point_repeats_it():
    out = derive.reorder_scribble(np.array([[0.3, 0.7]]), k=20)
    assert out.shape == (20, 2) and np.all(out == [0.3, 0.7])


# -----------------------------------------------------------------------------
# contour and mask points


def test_contour_points_follow_the_official_level0_padded_convention():
    # foreground rows 2..3, cols 3..5 of a 6x8 mask. Level 0 on the zero-padded mask runs through the
    # bordering background pixels, in padded coordinates (not shifted back): x in [3, 7], y in [2, 5].
    m = np.zeros((6, 8), bool)
    m[2:4, 3:6] = True
    pts = derive.contour_points(m)
    expected = {(6, 5), (5, 5), (4, 5), (3, 4), (3, 3), (4, 2), (5, 2), (6, 2), (7, 3), (7, 4)}
    assert {(float(x), float(y)) for x, y in pts} == expected
    assert np.array_equal(pts[0], pts[-1])  # closed


def test_mask_points_shape_range_and_order():
    m = wide_top_right_mask()
    p = derive.mask_points_from_mask(m, rng(), k=256)
    assert p.shape == (256, 2)
    px = p * 512
    # inside the mask, or on the level-0 contour of the padded mask (+1 px offset): [min, max + 2]
    assert np.all((px[:, 0] >= 300) & (px[:, 0] <= 499 + 2))
    assert np.all((px[:, 1] >= 10) & (px[:, 1] <= 29 + 2))
    assert np.all(np.diff(np.hypot(px[:, 0], px[:, 1])) >= -1e-9)  # sorted by distance to (0, 0)
    assert np.all(p[:, 0] > p[:, 1]) and np.ptp(p[:, 0]) > np.ptp(p[:, 1])


def test_mask_points_half_are_interior_pixels():
    m = wide_top_right_mask()
    px = derive.mask_points_from_mask(m, rng(), k=256) * 512
    is_int = np.all(px == np.round(px), axis=1)
    cols, rows = px[is_int, 0].astype(int), px[is_int, 1].astype(int)
    inside = m[np.clip(rows, 0, 511), np.clip(cols, 0, 511)]
    assert inside.sum() >= 128


def test_mask_points_large_mask_need_no_randomness():
    m = wide_top_right_mask()
    a = derive.mask_points_from_mask(m, rng(0))
    assert np.array_equal(a, derive.mask_points_from_mask(m, rng(123)))


def test_mask_points_tiny_mask_samples_interior_with_replacement():
    m = np.zeros((64, 64), bool)
    m[30, 20:25] = True  # 5 pixels
    p = derive.mask_points_from_mask(m, rng(), k=256)
    assert p.shape == (256, 2)
    assert np.all(p * 64 >= [20, 30]) and np.all(p * 64 <= [24 + 2, 30 + 2])


def test_mask_points_empty_mask_is_none():
    assert derive.mask_points_from_mask(np.zeros((32, 32), bool), rng()) is None


def test_mask_points_clip_to_one_at_the_right_edge():
    m = np.zeros((64, 64), bool)
    m[10:20, 50:64] = True  # touches the right border: contour x reaches 64 + 1
    p = derive.mask_points_from_mask(m, rng())
    assert p.max() <= 1.0 and np.isclose(p[:, 0].max(), 1.0)


def test_interior_points_start_at_the_centroid():
    yy, xx = np.mgrid[:101, :101]
    disc = (yy - 50) ** 2 + (xx - 40) ** 2 <= 30**2
    pts = derive.interior_points(disc, rng(), k=128)
    assert pts.shape == (128, 2)
    dist = np.hypot(pts[:, 0] - 40, pts[:, 1] - 50)  # (x, y) -> distance to the centre (x=40, y=50)
    assert dist[0] <= 3 and np.all(np.diff(dist) >= 0)  # one per ring of 22 pixels, centre outwards
    assert dist[-1] >= 28
    assert disc[pts[:, 1].astype(int), pts[:, 0].astype(int)].all()


def test_derive_rejects_non_2d_masks():
    with pytest.raises(ValueError):
        derive.box_from_mask(np.zeros((4, 4, 1), bool))
