"""Generated binary masks for training the mask VQ-VAE: blobs, lakes, rivers, rectangles, holes,
branching river networks, dendritic reservoirs, rough coastlines and specks.

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


def _branches(
    rng: np.random.Generator,
    size: tuple[int, int],
    start: np.ndarray,
    heading: float,
    length: float,
    width: float,
    depth: int,
) -> np.ndarray:
    """A wandering stroke from `start` (y, x) that narrows and forks: a drainage network."""
    mask = np.zeros(size, bool)
    steps = max(8, int(length))
    turns = np.cumsum(rng.normal(0, 0.12, steps)) + heading
    points = start[None] + np.cumsum(np.stack([np.sin(turns), np.cos(turns)], 1), 0)
    radius = np.linspace(width, max(0.5, width * rng.uniform(0.3, 0.7)), steps)
    mask |= _stroke(size, points, radius)
    if depth > 0:
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(steps // 4, steps))
            side = rng.choice([-1, 1]) * rng.uniform(0.35, 1.1)
            mask |= _branches(
                rng, size, points[at], turns[at] + side, length * rng.uniform(0.3, 0.6),
                max(0.5, radius[at] * rng.uniform(0.4, 0.9)), depth - 1,
            )  # fmt: skip
    return mask


def river_network(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A branching river 1-8 px wide with tributaries that narrow to a pixel, entering a border."""
    side = int(rng.integers(4))
    height, width = size
    start = [
        np.array([0.0, rng.uniform(0, width)]),
        np.array([height - 1.0, rng.uniform(0, width)]),
        np.array([rng.uniform(0, height), 0.0]),
        np.array([rng.uniform(0, height), width - 1.0]),
    ][side]
    heading = [np.pi / 2, -np.pi / 2, 0.0, np.pi][side] + rng.uniform(-0.6, 0.6)
    base = rng.uniform(0.5, max(1.0, min(size) / 24))
    return _branches(rng, size, start, heading, max(size) * rng.uniform(0.8, 1.6), base, 3)


def reservoir(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A lake whose flooded valleys reach out as narrow, forking arms (dendritic shorelines)."""
    mask = lake(rng, size)
    edge = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    if not len(edge):
        return mask
    centre = edge.mean(0)
    for _ in range(int(rng.integers(3, 12))):
        start = edge[rng.integers(len(edge))].astype(np.float64)
        away = np.arctan2(*(start - centre)) + rng.uniform(-0.5, 0.5)
        mask |= _branches(
            rng, size, start, away, max(size) * rng.uniform(0.1, 0.5),
            rng.uniform(0.7, max(1.0, min(size) / 30)), 2,
        )  # fmt: skip
    return mask


def coastline(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Sea on one side of a rough fractal shore (fine inlets, rocks and spits)."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (yy - size[0] / 2) * np.sin(angle) + (xx - size[1] / 2) * np.cos(angle)
    roughness = np.zeros(size, np.float32)
    for sigma in (max(size) / 6, max(size) / 20, 1.5):  # coarse bays, inlets, pixel-scale rocks
        field = ndimage.gaussian_filter(rng.standard_normal(size).astype(np.float32), sigma)
        roughness += field / (field.std() + 1e-6) * sigma
    return ramp + rng.uniform(0.3, 1.0) * roughness < rng.uniform(-0.3, 0.3) * min(size)


def specks(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Many small ponds 1-6 px across, sometimes around one larger water body."""
    mask = blob(rng, size) if rng.random() < 0.3 else np.zeros(size, bool)
    count = int(rng.integers(5, 40))
    centres = rng.uniform(0, 1, (count, 2)) * np.array(size)
    return mask | _stroke(size, centres, rng.uniform(0.5, 3.0, count))


GENERATORS: dict[str, Callable[[np.random.Generator, tuple[int, int]], np.ndarray]] = {
    "blob": blob,
    "lake": lake,
    "river": river,
    "rectangles": rectangles,
    "thin": thin,
    "holes": holes,
    "full_or_empty": full_or_empty,
    "river_network": river_network,
    "reservoir": reservoir,
    "coastline": coastline,
    "specks": specks,
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
# The mask VQ-VAE's training mix (train_vqvae): half of it thin, branching and fragmented water,
# where the codes lose most (rivers, dendritic reservoirs, rough coasts, specks).
THIN_WATER_WEIGHTS = {
    **WEIGHTS,
    "river_network": 4,
    "reservoir": 4,
    "coastline": 3,
    "specks": 3,
    "thin": 2,
}


def random_mask(rng: np.random.Generator, weights: dict[str, float] | None = None) -> np.ndarray:
    """One generated bool[H, W] mask, H and W in 24..192, of a kind drawn by `weights` (name ->
    weight; default `WEIGHTS`)."""
    weights = WEIGHTS if weights is None else weights
    names = list(weights)
    probabilities = np.array([weights[n] for n in names], np.float64)
    name = names[rng.choice(len(names), p=probabilities / probabilities.sum())]
    size = (int(rng.integers(24, 193)), int(rng.integers(24, 193)))
    return GENERATORS[name](rng, size)
