"""Procedural tasks in the spirit of VTAB's Structured group: counting, orientation and location.

Each image is drawn on a 64x64 canvas from the seed alone, so a task needs no download and every label can be
checked from the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

CANVAS = 64  # side of the procedural tasks' canvas, before resizing to img_size
COUNT_MAX = 6  # count: 1..6 objects -> classes 0..5
ORIENTATION_BINS = 8  # orientation: [0, 180) degrees in 8 bins of 22.5
LOCATION_GRID = 4  # location: 4 x 4 cells -> 16 classes, label = row * 4 + col
_BIN_MARGIN = 0.15  # orientations and positions keep this share of a bin away from its edges: unambiguous labels


def procedural_classes(name: str) -> list[str]:
    """Class names of a procedural task."""
    if name == "count":
        return [str(k) for k in range(1, COUNT_MAX + 1)]
    if name == "orientation":
        width = 180 / ORIENTATION_BINS
        return [f"{k * width:g}-{(k + 1) * width:g} deg" for k in range(ORIENTATION_BINS)]
    if name == "location":
        return [f"r{r}c{c}" for r in range(LOCATION_GRID) for c in range(LOCATION_GRID)]
    raise ValueError(f"unknown procedural task {name!r}; known: count, orientation, location")


def make_procedural(name: str, n: int, seed: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Generate a procedural task: uint8 RGB images (n, 64, 64, 3) and int64 labels, fixed by the seed.

    Tasks (classes balanced up to one image, each image on a dark, tinted, noisy background):
        - ``count``: 1..6 discs and squares, separated by at least 2 px; label = count - 1. Nuisances: size
          (radius 2.5..5.5, so brightness does not give the count away), colour, shape.
        - ``orientation``: one bar (length 18..28, width 3..5) at an angle in [0, 180) degrees
          counterclockwise from the x axis; label = angle bin of 22.5 degrees. Nuisances: position, size,
          colour, and a disc distractor anywhere clear of the bar.
        - ``location``: one filled disc; label = its cell on a 4 x 4 grid (row-major). Nuisances: size,
          colour, and a hollow square distractor anywhere clear of the disc.
    Angles and positions stay 15% of a bin away from bin edges, so every label is unambiguous.
    """
    classes = procedural_classes(name)
    rng = np.random.default_rng([seed, 1 + ["count", "orientation", "location"].index(name)])
    labels = rng.permutation(np.arange(n) % len(classes)).astype(np.int64)
    images = _background(rng, n)  # (n, H, W, 3) float32
    draw = {"count": _draw_count, "orientation": _draw_orientation, "location": _draw_location}[name]
    draw(rng, images, labels)
    sigma = rng.uniform(0.0, 0.03, (n, 1, 1, 1)).astype(np.float32)
    images += sigma * rng.standard_normal((n, CANVAS, CANVAS, 1), dtype=np.float32)  # grey noise
    images *= 255.0
    images += 0.5
    return np.clip(images, 0, 255, out=images).astype(np.uint8), labels


def _background(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    """Dark backgrounds (max channel <= 0.25): a random grey, a tint and a gentle linear gradient."""
    level = (rng.uniform(0.0, 0.18, (n, 1, 1, 1)) * rng.uniform(0.6, 1.0, (n, 1, 1, 3))).astype(np.float32)
    slope = (rng.uniform(-0.07, 0.07, (n, 2, 1, 1)) / CANVAS).astype(np.float32)
    ramp = np.arange(CANVAS, dtype=np.float32) + 0.5
    gradient = np.abs(slope[:, 0] * ramp[:, None] + slope[:, 1] * ramp[None, :])  # (n, H, W), <= 0.07
    return level + gradient[..., None]


def _colours(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    """Bright random colours, (n, 3), whose largest channel is in [0.7, 1]."""
    rgb = rng.uniform(0.1, 1.0, (n, 3))
    return (rgb / rgb.max(axis=1, keepdims=True) * rng.uniform(0.7, 1.0, (n, 1))).astype(np.float32)


_Window = tuple[tuple[npt.NDArray[np.int64], ...], npt.NDArray[np.float32], npt.NDArray[np.float32]]


def _window(rows: npt.NDArray[Any], cols: npt.NDArray[Any], size: int) -> _Window:
    """A size x size window per image around (rows, cols), shifted to lie inside the canvas.

    Objects are drawn only inside their window, not over the whole canvas (far fewer pixels per object); the window
    covers offsets up to ``size - size // 2 - 1.5`` px from the centre, so size >= 2 * extent + 3. Returns the
    window's fancy index and each pixel centre's offset from the object centre: dr (n, P, 1), dc (n, 1, P).
    """
    offsets = np.arange(size)
    r0 = np.clip(np.floor(rows).astype(np.int64) - size // 2, 0, CANVAS - size)
    c0 = np.clip(np.floor(cols).astype(np.int64) - size // 2, 0, CANVAS - size)
    pr, pc = r0[:, None] + offsets, c0[:, None] + offsets  # (n, P) pixel rows and columns
    where = (np.arange(len(rows))[:, None, None], pr[:, :, None], pc[:, None, :])
    dr = (pr + 0.5 - np.asarray(rows)[:, None]).astype(np.float32)[:, :, None]
    dc = (pc + 0.5 - np.asarray(cols)[:, None]).astype(np.float32)[:, None, :]
    return where, dr, dc


def _paint(
    images: npt.NDArray[np.float32],
    where: tuple[npt.NDArray[np.int64], ...],
    coverage: npt.NDArray[Any],
    colour: npt.NDArray[np.float32],
) -> None:
    """Blend colour (n, 3) into the windows of images with anti-aliased coverage (n, P, P) in [0, 1]."""
    region = images[where]  # (n, P, P, 3)
    images[where] = region + coverage[..., None].astype(np.float32) * (colour[:, None, None, :] - region)


def _box(du: npt.NDArray[Any], dv: npt.NDArray[Any], half_u: Any, half_v: Any) -> npt.NDArray[np.float32]:
    """Anti-aliased coverage of a rectangle with half sides half_u, half_v in its own coordinates du, dv."""
    inside_u = np.clip(half_u - np.abs(du) + 0.5, 0, 1)
    return (inside_u * np.clip(half_v - np.abs(dv) + 0.5, 0, 1)).astype(np.float32)


def _disc(dr: npt.NDArray[Any], dc: npt.NDArray[Any], radius: Any) -> npt.NDArray[np.float32]:
    return np.clip(radius - np.hypot(dr, dc) + 0.5, 0, 1).astype(np.float32)


def _per_image(values: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Per-image parameters (n,) as (n, 1, 1), to broadcast over each image's window."""
    return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)


def _place(
    rng: np.random.Generator, radii: Sequence[float], taken: Sequence[tuple[float, float, float]] = ()
) -> list[tuple[float, float]]:
    """Centres for objects of the given bounding radii, in the canvas, 2 px clear of each other and of taken.

    Crowded images are restarted from scratch rather than left with fewer objects than asked.
    """
    for _ in range(1000):
        placed: list[tuple[float, float, float]] = list(taken)
        for radius in radii:
            for _ in range(200):
                r, c = rng.uniform(radius + 1, CANVAS - radius - 1, 2)
                if all(
                    math.hypot(r - other_r, c - other_c) >= radius + other_radius + 2
                    for other_r, other_c, other_radius in placed
                ):
                    placed.append((r, c, radius))
                    break
            else:
                break  # crowded: start this image again
        else:
            return [(r, c) for r, c, _ in placed[len(taken) :]]
    raise RuntimeError("could not place the objects; the canvas is too crowded")


def _draw_count(rng: np.random.Generator, images: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> None:
    n = len(images)
    sizes = rng.uniform(2.5, 5.5, (n, COUNT_MAX))  # disc radius; squares get half side 0.85 * size
    square = rng.random((n, COUNT_MAX)) < 0.5
    centres = np.zeros((n, COUNT_MAX, 2))
    for i in range(n):
        k = labels[i] + 1
        centres[i, :k] = _place(rng, [1.25 * s for s in sizes[i, :k]])  # 1.25 size bounds both shapes
    for j in range(COUNT_MAX):  # one pass per object slot, vectorised over images
        where, dr, dc = _window(centres[:, j, 0], centres[:, j, 1], 16)
        size = _per_image(sizes[:, j])
        cover = np.where(_per_image(square[:, j]) > 0, _box(dr, dc, 0.85 * size, 0.85 * size), _disc(dr, dc, size))
        _paint(images, where, cover * _per_image(labels >= j), _colours(rng, n))


def _draw_orientation(rng: np.random.Generator, images: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> None:
    n = len(images)
    theta = (labels + rng.uniform(_BIN_MARGIN, 1 - _BIN_MARGIN, n)) * (math.pi / ORIENTATION_BINS)
    length, width = rng.uniform(18, 28, n), rng.uniform(3, 5, n)
    centres, spots = np.zeros((n, 2)), np.zeros((n, 2))
    spot_radius = rng.uniform(2.5, 4.0, n)
    for i in range(n):
        half = length[i] / 2
        centres[i] = rng.uniform(half + 2, CANVAS - half - 2, 2)
        # For the clearance test the bar is a chain of discs of radius width/2; the distractor avoids them.
        along = np.linspace(-half, half, 9)
        chain = [
            (centres[i, 0] - t * math.sin(theta[i]), centres[i, 1] + t * math.cos(theta[i]), width[i] / 2)
            for t in along
        ]
        [spots[i]] = _place(rng, [spot_radius[i]], chain)
    # Bar coordinates: u along (cos t, -sin t) in (col, row), i.e. counterclockwise as seen; v across it.
    where, dr, dc = _window(centres[:, 0], centres[:, 1], 34)
    cos, sin = _per_image(np.cos(theta)), _per_image(np.sin(theta))
    bar = _box(dc * cos - dr * sin, dc * sin + dr * cos, _per_image(length / 2), _per_image(width / 2))
    _paint(images, where, bar, _colours(rng, n))
    where, dr, dc = _window(spots[:, 0], spots[:, 1], 12)
    _paint(images, where, _disc(dr, dc, _per_image(spot_radius)), _colours(rng, n))


def _draw_location(rng: np.random.Generator, images: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> None:
    n = len(images)
    cell = CANVAS / LOCATION_GRID
    grid_rows, grid_cols = np.divmod(labels, LOCATION_GRID)
    rows = (grid_rows + rng.uniform(_BIN_MARGIN, 1 - _BIN_MARGIN, n)) * cell
    cols = (grid_cols + rng.uniform(_BIN_MARGIN, 1 - _BIN_MARGIN, n)) * cell
    radius = rng.uniform(2.5, 3.5, n)
    half = rng.uniform(3.5, 5.5, n)  # distractor: a hollow square with a 1.5 px wall
    spots = np.zeros((n, 2))
    for i in range(n):
        [spots[i]] = _place(rng, [half[i] * 1.5], [(rows[i], cols[i], radius[i])])
    where, dr, dc = _window(rows, cols, 12)
    _paint(images, where, _disc(dr, dc, _per_image(radius)), _colours(rng, n))
    where, dr, dc = _window(spots[:, 0], spots[:, 1], 16)
    outer, inner = _per_image(half), _per_image(half - 1.5)
    _paint(
        images,
        where,
        np.clip(_box(dr, dc, outer, outer) - _box(dr, dc, inner, inner), 0, 1),
        _colours(rng, n),
    )
