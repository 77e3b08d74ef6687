"""Training crops for the mask VQ-VAE: the codec's own box crops of generated shapes and real masks,
random windows, a deterministic hold-out by name, and augmented batches."""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from paligemma_seg.segtokens import codec, shapes

MASK_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file -> uint8 grey [H, W]."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def list_masks(dirs: list[str], list_file: str | None) -> list[pathlib.Path]:
    """Mask files in `dirs`, restricted to the names in `list_file` (one per line) when given."""
    names = None
    if list_file:
        names = {line.strip() for line in open(list_file) if line.strip()}
    paths = []
    for directory in dirs:
        for path in sorted(pathlib.Path(directory).iterdir()):
            if path.suffix.lower() in MASK_EXTENSIONS and (names is None or path.name in names):
                paths.append(path)
    return paths


def is_holdout(name: str, fraction: float) -> bool:
    """Deterministic split by name: the same masks are held out on every run and machine."""
    digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def _random_window(rng: np.random.Generator, binary: np.ndarray) -> np.ndarray:
    height, width = binary.shape
    h = int(rng.integers(min(8, height), height + 1))
    w = int(np.clip(h * np.exp(rng.uniform(-1, 1)), min(8, width), width))
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    return codec.resize_crop(binary[y : y + h, x : x + w])


def crops_of(mask: np.ndarray, rng: np.random.Generator, windows: int) -> list[np.ndarray]:
    """float32[64, 64] crops of one mask: the codec's per-object crops (with and without the other
    parts in the box), its whole-mask crop, and `windows` random windows."""
    crops = []
    for config in (
        codec.CodecConfig(max_objects=16),
        codec.CodecConfig(max_objects=16, crop_others=True),
        codec.CodecConfig(whole_mask=True),
    ):
        crops.extend(codec.to_objects(mask, config).crops[..., 0])
    binary = codec.reference_mask(mask)
    crops.extend(_random_window(rng, binary) for _ in range(windows))
    return crops


def generated_crops(count: int, seed: int, weights: dict[str, float] | None = None) -> np.ndarray:
    """float32[count, 64, 64] crops of generated shapes, kinds drawn by `weights`
    (`shapes.random_mask`'s; default `shapes.WEIGHTS`)."""
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    with tqdm(total=count, desc=f"shapes (seed {seed})", leave=False) as bar:
        while len(crops) < count:
            mask = shapes.random_mask(rng, weights)
            new = crops_of(mask, rng, windows=1)
            picked = rng.choice(len(new), size=min(len(new), 3), replace=False)
            crops.extend(new[i] for i in picked)
            bar.update(len(picked))
    return np.stack(crops[:count])


def real_crops(paths: list[pathlib.Path], windows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    crops = []
    for path in tqdm(paths, desc="real masks", leave=False):
        crops.extend(crops_of(read_mask(path), rng, windows))
    return np.stack(crops) if crops else np.zeros((0, 64, 64), np.float32)


def to_uint8(crops: np.ndarray) -> np.ndarray:
    return np.round(crops * 255).astype(np.uint8)


def sample_batch(
    rng: np.random.Generator, pools: list[np.ndarray], weights: list[float], size: int
) -> np.ndarray:
    """float32[size, 64, 64, 1] from uint8 pools, each crop under a random flip/rotation."""
    weights = np.asarray(weights) / np.sum(weights)
    which = rng.choice(len(pools), size=size, p=weights)
    batch = np.stack([pools[p][rng.integers(len(pools[p]))] for p in which])
    batch = np.where(rng.random(size)[:, None, None] < 0.5, batch, batch.transpose(0, 2, 1))
    batch = batch[:, :: rng.choice([-1, 1]), :: rng.choice([-1, 1])]
    return (batch.astype(np.float32) / 255.0)[..., None]
