"""Generated binary masks for training the mask VQ-VAE: blobs, lakes, rivers, rectangles, holes.

Owns only shape drawing (numpy + scipy, deterministic given a numpy Generator). Cropping to boxes
and resizing to 64x64 happen in `codec.py`, exactly as for real masks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage


def _grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)


def blob(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Smoothed noise above a quantile: irregular lakes and coastlines, often several parts."""
    sigma = rng.uniform(2.0, max(size) / 5)
    field = ndimage.gaussian_filter(
        rng.standard_normal(size).astype(np.float32), sigma, mode="wrap"
    )
    return field > np.quantile(field, rng.uniform(0.3, 0.9))


def lake(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A union of a few ellipses with a wavy border (radius modulated by low-frequency sines)."""
    yy, xx = _grid(size)
    mask = np.zeros(size, bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.2, 0.8) * size[0], rng.uniform(0.2, 0.8) * size[1]
        ry, rx = rng.uniform(0.1, 0.45) * size[0], rng.uniform(0.1, 0.45) * size[1]
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + sum(
            rng.uniform(0, 0.15) * np.sin(k * angle + rng.uniform(0, 2 * np.pi))
            for k in range(2, 7)
        )
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble**2
    return mask


def river(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A meandering band of varying width from one border to another, sometimes with a tributary."""
    mask = np.zeros(size, bool)
    for _ in range(rng.integers(1, 3)):
        steps = 200
        t = np.linspace(0, 1, steps)
        start, end = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
        path = start[None] + (end - start)[None] * t[:, None]
        for k in range(1, 4):
            path += rng.uniform(-0.15, 0.15, 2)[None] / k * np.sin(np.pi * k * t)[:, None]
        width = rng.uniform(0.5, max(2.0, min(size) / 10)) * (
            1 + 0.5 * np.sin(rng.uniform(1, 6) * t)
        )
        points = path * np.array(size)[None]
        mask |= _stroke(size, points, width)
    return mask


def _stroke(size: tuple[int, int], points: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Pixels within radius[i] of point i of a densely sampled path float[N, 2] (y, x)."""
    mask = np.zeros(size, bool)
    for (y, x), r in zip(points, radius, strict=True):
        y0, y1 = int(max(0, y - r - 1)), int(min(size[0], y + r + 2))
        x0, x1 = int(max(0, x - r - 1)), int(min(size[1], x + r + 2))
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] |= (yy + 0.5 - y) ** 2 + (xx + 0.5 - x) ** 2 <= max(r, 0.5) ** 2
    return mask


def rectangles(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """1-4 rectangles, axis-aligned or rotated (fields, reservoirs, cut by the border)."""
    yy, xx = _grid(size)
    mask = np.zeros(size, bool)
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0, 1) * size[0], rng.uniform(0, 1) * size[1]
        hy, hx = rng.uniform(0.05, 0.6) * size[0], rng.uniform(0.05, 0.6) * size[1]
        angle = 0.0 if rng.random() < 0.5 else rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        mask |= (np.abs(u) < hy) & (np.abs(v) < hx)
    return mask


def thin(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """1-5 straight or bent lines 1-3 px wide (canals, narrow streams)."""
    mask = np.zeros(size, bool)
    for _ in range(rng.integers(1, 6)):
        a, b, c = (rng.uniform(0, 1, 2) * np.array(size) for _ in range(3))
        t = np.linspace(0, 1, 4 * max(size))[:, None]
        points = (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c
        mask |= _stroke(size, points, np.full(len(points), rng.uniform(0.5, 1.5)))
    return mask


def holes(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A lake or blob with islands cut out."""
    base = lake(rng, size) if rng.random() < 0.5 else blob(rng, size)
    sigma = rng.uniform(1.0, max(size) / 12)
    field = ndimage.gaussian_filter(rng.standard_normal(size).astype(np.float32), sigma)
    return base & (field < np.quantile(field, rng.uniform(0.75, 0.97)))


def full_or_empty(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """All water, or all land with a few pixels (what whole-image crops look like)."""
    if rng.random() < 0.5:
        return np.ones(size, bool)
    mask = np.zeros(size, bool)
    mask[rng.integers(0, size[0]), rng.integers(0, size[1])] = True
    return mask


GENERATORS: dict[str, Callable[[np.random.Generator, tuple[int, int]], np.ndarray]] = {
    "blob": blob,
    "lake": lake,
    "river": river,
    "rectangles": rectangles,
    "thin": thin,
    "holes": holes,
    "full_or_empty": full_or_empty,
}
# Sampling weights: most real crops are lakes, blobs and rivers.
WEIGHTS = {
    "blob": 3,
    "lake": 3,
    "river": 3,
    "rectangles": 2,
    "thin": 1,
    "holes": 2,
    "full_or_empty": 0.5,
}


def random_mask(rng: np.random.Generator) -> np.ndarray:
    """One generated bool[H, W] mask, H and W in 24..192, of a randomly chosen kind."""
    names = list(GENERATORS)
    weights = np.array([WEIGHTS[n] for n in names], np.float64)
    name = names[rng.choice(len(names), p=weights / weights.sum())]
    size = (int(rng.integers(24, 193)), int(rng.integers(24, 193)))
    return GENERATORS[name](rng, size)
