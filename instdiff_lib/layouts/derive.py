"""Derived location inputs: scribbles, mask points ("polygons") and boxes from a binary mask.

Paper §3.1 / spec §3.3; mirrors `dataset/decode_item.py` of the official code
(`sample_random_points_from_mask`, `sample_sparse_points_from_mask`, `sample_uniform_sparse_points`,
`binary_mask_to_polygon`, `reorder_scribbles`).

Conventions (the same everywhere in instdiff_lib):
- a mask is a 2-D bool array indexed [row, col] = [y, x], shape (H, W), origin top-left;
- every returned point is (x, y) = (col / W, row / H), i.e. normalised to [0, 1] with x the column;
- "sorted by distance to the origin" means a *stable* sort on the Euclidean norm, as Python's
  `sorted` in the official code, so ties keep their original order.

Randomness comes only from the `np.random.Generator` passed in (the official code uses the global
`np.random` / `random` state and is unseeded; the algorithms are otherwise the same).
"""

from __future__ import annotations

import numpy as np
from skimage import measure

# -----------------------------------------------------------------------------
# helpers


def _stable_order_by_norm(points: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Indices that sort (n, 2) `points` by Euclidean distance to `centre` (default origin), stably."""
    diff = points if centre is None else points - centre
    dist = np.sqrt((diff.astype(np.float64) ** 2).sum(axis=1))
    return np.argsort(dist, kind="stable")


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D (H, W) mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


# -----------------------------------------------------------------------------
# boxes


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight box of the foreground as normalised xyxy, or None for an empty mask.

    The box covers whole pixels: a foreground pixel at (row r, col c) spans [c, c+1] x [r, r+1],
    so x0 = min_col / W, x1 = (max_col + 1) / W (same convention as COCO's pixel boxes).
    """
    mask = _check_mask(mask)
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)


# -----------------------------------------------------------------------------
# scribbles


def scribble_from_mask(mask: np.ndarray, rng: np.random.Generator, k: int = 20) -> np.ndarray:
    """k random foreground pixels of `mask` as a (k, 2) array of normalised (x, y), ordered by distance to (0, 0).

    Official `sample_random_points_from_mask` + `convert_points`: pick k foreground pixels (without
    replacement when there are at least k, with replacement otherwise), sort them by the distance of
    (row, col) to (0, 0), emit (x = col / W, y = row / H), clipped to <= 1. An empty mask gives zeros.
    """
    mask = _check_mask(mask)
    h, w = mask.shape
    fg = np.argwhere(mask)  # (n, 2) as (row, col), row-major order
    if len(fg) == 0:
        return np.zeros((k, 2), dtype=np.float64)
    chosen = fg[rng.choice(len(fg), size=k, replace=len(fg) < k)]
    chosen = chosen[_stable_order_by_norm(chosen)]
    xy = np.stack([chosen[:, 1] / w, chosen[:, 0] / h], axis=1)
    return np.minimum(xy, 1.0)


def reorder_scribble(points: np.ndarray, k: int = 20) -> np.ndarray:
    """Resample a user scribble of m >= 1 (x, y) points to exactly k points, ordered by distance to (0, 0).

    Official `reorder_scribbles`: sort by distance to the origin; equally spaced sampling
    (m >= k: indices i * (m // k); m < k: indices (i * m) // k, so points repeat); sort again.
    Deterministic; coordinates are passed through unchanged (normalised in, normalised out).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    m = len(points)
    if m == 0:
        raise ValueError("a scribble needs at least one point")
    points = points[_stable_order_by_norm(points)]
    i = np.arange(k)
    idx = i * (m // k) if m >= k else (i * m) // k
    points = points[idx]
    return points[_stable_order_by_norm(points)]


# -----------------------------------------------------------------------------
# mask points ("polygons")


def contour_points(mask: np.ndarray) -> np.ndarray:
    """All contour points of `mask` as (L, 2) (x, y) pixel coordinates, contours concatenated.

    Official `binary_mask_to_polygon(mask, tolerance=0)`, reproduced as is:
    - the mask is zero-padded by 1 px and `find_contours` is called with level 0 (the official passes
      its `tolerance` argument, 0, as the level). On a {0, 1} image the level-0 iso-line runs through
      the centres of the *background* pixels bordering the object, i.e. one pixel outside it;
    - coordinates are not shifted back after padding, so they carry a +1 px offset: in the original
      frame a contour point lies in [min_fg, max_fg + 2] along each axis;
    - each contour is closed, passed through `approximate_polygon(tolerance=0)` (a no-op), skipped if it
      has fewer than 3 points, flipped from (row, col) to (x, y), and negatives are clipped to 0.
    Returns an empty (0, 2) array when there is no contour (empty mask).
    """
    mask = _check_mask(mask)
    padded = np.pad(mask.astype(np.float64), 1, mode="constant", constant_values=0)
    polygons = []
    for contour in measure.find_contours(padded, 0):
        if not np.array_equal(contour[0], contour[-1]):
            contour = np.vstack([contour, contour[:1]])  # close it
        contour = measure.approximate_polygon(contour, tolerance=0)
        if len(contour) < 3:
            continue
        polygons.append(np.maximum(contour[:, ::-1], 0.0))  # (row, col) -> (x, y)
    if not polygons:
        return np.zeros((0, 2), dtype=np.float64)
    return np.concatenate(polygons, axis=0)


def interior_points(mask: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    """k interior points of a non-empty `mask` as (k, 2) (x, y) pixel coordinates.

    Official `sample_uniform_sparse_points`: sort foreground (row, col) by distance to their centroid
    (stable), cut the sorted list into k consecutive segments of floor(n / k) pixels and take the middle
    pixel of each, so the points spread from the centre outwards. With fewer than k foreground pixels,
    draw k pixels with replacement (from `rng`, where the official uses Python's `random`).
    """
    mask = _check_mask(mask)
    fg = np.argwhere(mask)  # (n, 2) as (row, col)
    n = len(fg)
    if n == 0:
        raise ValueError("interior_points needs a non-empty mask")
    if n < k:
        chosen = fg[rng.integers(0, n, size=k)]
    else:
        fg = fg[_stable_order_by_norm(fg, centre=fg.mean(axis=0))]
        per_segment = n // k
        chosen = fg[np.arange(k) * per_segment + per_segment // 2]
    return chosen[:, ::-1].astype(np.float64)  # (row, col) -> (x, y)


def mask_points_from_mask(mask: np.ndarray, rng: np.random.Generator, k: int = 256) -> np.ndarray | None:
    """The 256 "mask points" (official `polygons`) of a mask as (k, 2) normalised (x, y), or None.

    Official `sample_sparse_points_from_mask`:
    (1) k/2 boundary points: all contour points (`contour_points`, +1 px padding offset kept), picked at
        indices `linspace(0, L - 1, k/2).astype(int)`;
    (2) k/2 interior points (`interior_points`);
    (3) interior + boundary concatenated (in that order), stably sorted by distance to (0, 0), x divided
        by W and y by H and clipped to <= 1 (official `convert_points`; the +1 px offset can otherwise
        push a boundary point of an object touching the right/bottom edge past 1).
    Returns None when the mask has no contour (empty mask); callers then use zeros.
    """
    mask = _check_mask(mask)
    h, w = mask.shape
    boundary = contour_points(mask)
    if len(boundary) == 0:
        return None
    n_boundary = k // 2
    boundary = boundary[np.linspace(0, len(boundary) - 1, n_boundary).astype(int)]
    inside = interior_points(mask, rng, k - n_boundary)
    points = np.concatenate([inside, boundary], axis=0)
    points = points[_stable_order_by_norm(points)]
    return np.minimum(points / np.array([w, h], dtype=np.float64), 1.0)
