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
    with pytest.raises(ValueError, match=r"^expected a 2-D \(H, W\) mask, got shape \(4, 4, 1\)$"):
        derive.box_from_mask(np.zeros((4, 4, 1), bool))


# -----------------------------------------------------------------------------
# edge cases found by mutation testing (tests/MUTATION.md)


def test_default_point_counts_are_the_position_net_sizes():
    m = wide_top_right_mask()
    assert derive.scribble_from_mask(m, rng()).shape == (20, 2)
    assert derive.reorder_scribble(np.array([[0.1, 0.2], [0.3, 0.4]])).shape == (20, 2)
    assert derive.mask_points_from_mask(m, rng()).shape == (256, 2)


def test_scribble_from_mask_with_exactly_k_pixels_uses_each_once():
    # 20 pixels and k = 20: drawn without replacement, i.e. every pixel once, then sorted by distance to (0, 0)
    m = np.zeros((16, 32), bool)
    m[3:5, 7:17] = True  # rows 3..4, cols 7..16
    s = derive.scribble_from_mask(m, rng(5), k=20)
    pixels = sorted(((c, r) for r in (3, 4) for c in range(7, 17)), key=lambda p: p[0] ** 2 + p[1] ** 2)
    got = [(int(x * 32), int(y * 16)) for x, y in s]  # exact: 32 and 16 are powers of two
    assert sorted(got) == sorted(pixels)
    assert [p[0] ** 2 + p[1] ** 2 for p in got] == [p[0] ** 2 + p[1] ** 2 for p in pixels]


def test_reorder_scribble_downsampling_keeps_the_official_stride():
    # m = 50 >= k = 20: indices i * (50 // 20) = 0, 2, ..., 38 of the sorted points (not (i * 50) // 20)
    pts = np.stack([np.arange(50) / 50, np.zeros(50)], axis=1)
    assert np.array_equal(derive.reorder_scribble(pts[::-1], k=20), pts[0:40:2])


def test_reorder_scribble_returns_floats_and_rejects_an_empty_scribble():
    out = derive.reorder_scribble([[0, 1], [1, 0]], k=4)  # integer input
    assert out.dtype == np.float64 and out.tolist() == [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match="^a scribble needs at least one point$"):
        derive.reorder_scribble(np.zeros((0, 2)))


def test_interior_points_take_the_middle_of_each_segment():
    # one row of 9 pixels, centroid at col 4; stable order by distance: cols 4, 3, 5, 2, 6, 1, 7, 0, 8.
    # k = 2: segments of 9 // 2 = 4 pixels, middle index 4 // 2 = 2 -> sorted indices 2 and 6 = cols 5 and 7
    m = np.zeros((4, 12), bool)
    m[1, 0:9] = True
    assert derive.interior_points(m, rng(), k=2).tolist() == [[5.0, 1.0], [7.0, 1.0]]
    # n == k: no sampling, every pixel once in that order
    assert derive.interior_points(m, rng(), k=9)[:, 0].tolist() == [4, 3, 5, 2, 6, 1, 7, 0, 8]


def test_interior_points_of_tiny_masks_draw_every_pixel_and_reject_empty_masks():
    one = np.zeros((8, 8), bool)
    one[2, 6] = True
    assert derive.interior_points(one, rng(), k=4).tolist() == [[6.0, 2.0]] * 4
    two = np.zeros((8, 8), bool)
    two[1, 1] = two[5, 3] = True
    pts = derive.interior_points(two, rng(), k=64)  # drawn with replacement from both pixels
    assert {tuple(p) for p in pts.tolist()} == {(1.0, 1.0), (3.0, 5.0)}
    with pytest.raises(ValueError, match="^interior_points needs a non-empty mask$"):
        derive.interior_points(np.zeros((8, 8), bool), rng(), k=4)


def test_mask_points_take_every_contour_point_and_every_pixel_when_both_fit():
    # a 3 x 7 rectangle has 21 pixels; its padded level-0 contour has 2 * (3 + 7) = 20 points plus the closing one.
    # k = 42: boundary = linspace(0, 20, 21) -> every contour point once; interior = 21 segments of 1 -> every pixel
    m = np.zeros((16, 16), bool)
    m[4:7, 5:12] = True
    contour = derive.contour_points(m)
    ring = {(x, 4) for x in range(6, 13)} | {(x, 8) for x in range(6, 13)} | {(5, y) for y in (5, 6, 7)} | {
        (13, y) for y in (5, 6, 7)}
    assert len(contour) == 21 and {tuple(p) for p in contour.tolist()} == ring
    p = derive.mask_points_from_mask(m, rng(), k=42) * 16  # exact: 16 is a power of two
    pixels = [(float(c), float(r)) for r in range(4, 7) for c in range(5, 12)]
    assert sorted(map(tuple, p.tolist())) == sorted(pixels + [tuple(q) for q in contour.tolist()])


def test_contour_points_of_a_mask_touching_the_top_left_border_reach_zero():
    # the zero padding lets the level-0 contour run through padded row 0 and column 0 (x = 0 or y = 0 kept as is)
    m = np.zeros((8, 8), bool)
    m[0:2, 0:3] = True
    pts = derive.contour_points(m)
    ring = {(x, 0) for x in (1, 2, 3)} | {(x, 3) for x in (1, 2, 3)} | {(0, 1), (0, 2), (4, 1), (4, 2)}
    assert len(pts) == 11 and {(float(x), float(y)) for x, y in pts} == ring
    assert derive.contour_points(np.zeros((8, 8), bool)).shape == (0, 2)


def test_contour_points_keep_three_point_contours():
    # two diagonal pixels: an outer contour of 7 points and a 3-point one through the gap between them
    # (2 distinct points, closed); the official code only drops contours of fewer than 3 points
    from skimage import measure

    m = np.zeros((3, 3), bool)
    m[1, 2] = m[2, 1] = True
    contours = measure.find_contours(np.pad(m.astype(float), 1), 0)
    assert sorted(len(c) for c in contours) == [3, 7]
    pts = derive.contour_points(m)
    assert np.array_equal(pts, np.concatenate([c[:, ::-1] for c in contours]))
    assert {(float(x), float(y)) for x, y in pts[-3:]} == {(2.0, 2.0), (3.0, 3.0)}


def test_sorting_by_distance_is_stable_for_ties():
    # 22 points on three circles (radius 5/8, 3/8, 1/8; exact in binary), several distinct points per circle:
    # the official Python `sorted` keeps tied points in their input order, an unstable argsort need not
    on = {5: [(5, 0), (0, 5), (3, 4), (4, 3)], 3: [(3, 0), (0, 3)], 1: [(1, 0), (0, 1)]}
    radii = [5, 3, 5, 1, 5, 3, 1, 5, 3, 5, 1, 5, 3, 5, 5, 1, 3, 5, 1, 5, 3, 5]
    seen = {r: 0 for r in on}
    pts = []
    for r in radii:
        pts.append(on[r][seen[r] % len(on[r])])
        seen[r] += 1
    pts = np.array(pts, dtype=np.float64) / 8
    expected = np.array(sorted(pts.tolist(), key=lambda p: p[0] ** 2 + p[1] ** 2))
    assert np.array_equal(derive.reorder_scribble(pts, k=22), expected)


def test_mask_points_pick_evenly_spaced_contour_points():
    # the 3 x 7 rectangle's 21 contour points, k = 22: boundary = linspace(0, 20, 11) = every other contour point
    # (both ends of the closed contour included); interior = the 11 pixels `interior_points` picks
    m = np.zeros((16, 16), bool)
    m[4:7, 5:12] = True
    contour = derive.contour_points(m)
    p = derive.mask_points_from_mask(m, rng(), k=22) * 16
    expected = np.concatenate([derive.interior_points(m, rng(), 11), contour[0:21:2]])
    assert sorted(map(tuple, p.tolist())) == sorted(map(tuple, expected.tolist()))
