"""Generated satellite-like tiles with exact water masks: the offline data set for tiny models.

Owns drawing and writing tiles; turning them into JSONL is `convert.py`'s job. A tile is textured
land (fractal noise, fields, roads), optional water (lakes, rivers, coastlines) in one of several
colours, then optional clouds with shadows. Water under thin clouds (opacity <= 0.5) stays in the
mask because it is still visible; water under thick clouds does not. Tile i depends only on
(seed, i, size).

    python -m paligemma_seg.data.synthetic --out data/synthetic --num 200 --size 128 --seed 0
    (the command line is `__main__.py`)

writes `images/synth_00000.jpg` (RGB JPEG), `masks/synth_00000.png` (grey 0/255, exact) and
`train_images.txt`/`test_images.txt` (every 10th tile is a test tile), the water data set's layout,
and `synthetic.json` (num_images, size, seed) last, once the set is complete. With
`--classes water,building` half of the tiles also hold a built-up district and the masks are class
ids (1 = water, 2 = building): convert them with `--classes 1=water,2=building`.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

CLOUD_MASK_OPACITY = 0.5  # water under clouds more opaque than this is not in the mask
HAZE_COLOUR = np.array([0.66, 0.62, 0.66], np.float32)
TEST_EVERY = 10  # tile i is a test tile when i % TEST_EVERY == TEST_EVERY - 1

# RGB in [0, 1], loosely from Sentinel-2 true-colour tiles.
LAND_COLOURS = np.array(
    [
        [0.27, 0.35, 0.20],  # vegetation
        [0.36, 0.42, 0.25],  # grassland
        [0.16, 0.23, 0.13],  # forest
        [0.56, 0.51, 0.38],  # dry grass
        [0.74, 0.64, 0.48],  # desert sand
        [0.47, 0.36, 0.27],  # bare soil
        [0.52, 0.50, 0.49],  # rock
        [0.62, 0.55, 0.58],  # pinkish haze-covered plain
        [0.58, 0.58, 0.56],  # urban grey
    ],
    dtype=np.float32,
)
WATER_COLOURS = np.array(
    [
        [0.07, 0.14, 0.28],  # deep blue
        [0.08, 0.10, 0.19],  # navy
        [0.05, 0.07, 0.09],  # near black
        [0.16, 0.38, 0.42],  # turquoise
        [0.15, 0.27, 0.24],  # green
        [0.28, 0.36, 0.46],  # blue-grey
        [0.34, 0.30, 0.21],  # muddy
    ],
    dtype=np.float32,
)
WATER_WEIGHTS = np.array([3, 2, 1, 2, 2, 2, 0.5]) / 12.5
WATER_KINDS = ("none", "lakes", "river", "coast", "lakes+river")
WATER_KIND_WEIGHTS = (0.15, 0.35, 0.2, 0.2, 0.1)


@dataclasses.dataclass(frozen=True)
class TileLayers:
    """Everything a tile is composed of; `compose` turns it into pixels (no randomness left)."""

    land: np.ndarray  # float32[H, W, 3] land colour in [0, 1]
    water: np.ndarray  # bool[H, W] where water is drawn
    water_colour: np.ndarray  # float32[H, W, 3] water colour in [0, 1]
    cloud: np.ndarray  # float32[H, W] cloud opacity in [0, 1]
    shadow: np.ndarray  # float32[H, W] cloud-shadow darkening in [0, 1)
    sensor_noise: np.ndarray  # float32[H, W, 3] added last
    brightness: float
    haze: float  # blend towards a pale grey-pink, as in many Sentinel-2 tiles

    @property
    def mask(self) -> np.ndarray:
        """bool[H, W] ground truth: visible water."""
        return self.water & (self.cloud <= CLOUD_MASK_OPACITY)


def fractal_noise(rng: np.random.Generator, size: int, beta: float = 2.0) -> np.ndarray:
    """float32[size, size] noise with power spectrum 1/f^beta, scaled to [0, 1]."""
    spectrum = np.fft.rfft2(rng.standard_normal((size, size)))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.maximum(np.hypot(fy, fx), 1.0 / size)
    field = np.fft.irfft2(spectrum * radius ** (-beta / 2.0), s=(size, size))
    field -= field.min()
    return (field / max(field.max(), 1e-12)).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in units of the tile side, in [0, 1)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[:, None], coords[None, :]


def _rotated(size: int, angle: float, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) a direction through `centre`, in tile sides."""
    y, x = _grid(size)
    y, x = y - centre[0], x - centre[1]
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def _land(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two or three blended land colours with texture, fields and roads."""
    picks = LAND_COLOURS[rng.choice(len(LAND_COLOURS), 3, replace=False)]
    picks = picks * rng.uniform(0.85, 1.15, (3, 1)).astype(np.float32)
    blend = ndimage.zoom(rng.random((4, 4)), size / 4, order=3)[:size, :size] * 0.5
    blend = np.clip(blend + fractal_noise(rng, size, 2.6) * 0.6 - 0.05, 0, 1)[..., None]
    land = picks[0] * (1 - blend) + picks[1] * blend
    patches = fractal_noise(rng, size, 3.0)[..., None]
    land = np.where(patches > rng.uniform(0.6, 0.9), picks[2], land)
    if rng.random() < 0.5:
        land = _fields(rng, size, land)
    land = land * (0.85 + 0.3 * fractal_noise(rng, size, 1.0)[..., None])
    for _ in range(rng.choice(4, p=[0.5, 0.3, 0.15, 0.05])):
        land = _road(rng, size, land)
    return land.astype(np.float32)


def _fields(rng: np.random.Generator, size: int, land: np.ndarray) -> np.ndarray:
    """Rectangular fields of jittered colours on a rotated grid, over a patch of the tile."""
    u, v = _rotated(size, rng.uniform(0, np.pi), (0.5, 0.5))
    cell_u = np.floor(u / rng.uniform(0.05, 0.2)).astype(np.int64) % 32
    cell_v = np.floor(v / rng.uniform(0.05, 0.2)).astype(np.int64) % 32
    table = LAND_COLOURS[rng.integers(0, 6, (32, 32))] * rng.uniform(0.8, 1.2, (32, 32, 1))
    region = fractal_noise(rng, size, 3.0) > rng.uniform(0.2, 0.6)
    alpha = (region * 0.75)[..., None]
    return land * (1 - alpha) + table[cell_u, cell_v] * alpha


def _road(rng: np.random.Generator, size: int, land: np.ndarray) -> np.ndarray:
    """A straight, antialiased road across the tile."""
    _, v = _rotated(size, rng.uniform(0, np.pi), tuple(rng.uniform(0.1, 0.9, 2)))
    width = rng.uniform(0.6, 1.8)
    alpha = np.clip(width / 2 - np.abs(v) * size + 0.5, 0, 1)[..., None]
    colour = np.array([0.55, 0.53, 0.5], np.float32) * rng.uniform(0.8, 1.1)
    return land * (1 - alpha) + colour * alpha


def _shore(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """Zero-centred shoreline displacement: large bays and capes plus a little fine detail."""
    bays = fractal_noise(rng, size, rng.uniform(2.8, 3.4)) - 0.5
    detail = fractal_noise(rng, size, 2.0) - 0.5
    return amplitude * bays + rng.uniform(0.0, 0.08) * detail


def _lakes(rng: np.random.Generator, size: int) -> np.ndarray:
    """One to four blobs with fractal shores, from small ponds to lakes filling most of the tile."""
    water = np.zeros((size, size), bool)
    for k in range(rng.choice([1, 2, 3, 4], p=[0.55, 0.25, 0.12, 0.08])):
        radius = rng.uniform(0.15, 0.42) if k == 0 else rng.uniform(0.04, 0.15)
        u, v = _rotated(size, rng.uniform(0, np.pi), tuple(rng.uniform(0.2, 0.8, 2)))
        stretch = rng.uniform(1.0, 2.5)
        distance = np.hypot(u / stretch, v) / radius
        water |= distance + _shore(rng, size, rng.uniform(0.4, 1.4)) < 1
    return water


def _river(rng: np.random.Generator, size: int) -> np.ndarray:
    """A meandering band across the tile, its width varying along it."""
    u, v = _rotated(size, rng.uniform(0, np.pi), tuple(rng.uniform(0.3, 0.7, 2)))
    centre = np.zeros_like(u)
    for _ in range(3):
        frequency = rng.uniform(0.5, 4.0)
        centre = centre + rng.uniform(0.0, 0.12) / frequency * np.sin(
            2 * np.pi * frequency * u + rng.uniform(0, 2 * np.pi)
        )
    # At least ~6% of the side wide: thinner rivers are below what 16 mask tokens can draw.
    half_width = rng.uniform(max(0.8, 0.03 * size), max(1.0, 0.08 * size)) / size
    half_width = half_width * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * u))
    return np.abs(v - centre) < half_width


def _coast(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sea on one side of a fractal coastline."""
    u, _ = _rotated(size, rng.uniform(0, 2 * np.pi), (0.5, 0.5))
    return u + _shore(rng, size, rng.uniform(0.2, 0.6)) < rng.uniform(-0.3, 0.3)


def _water(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = WATER_KINDS[rng.choice(len(WATER_KINDS), p=WATER_KIND_WEIGHTS)]
    water = np.zeros((size, size), bool)
    if "lakes" in kind:
        water |= _lakes(rng, size)
    if "river" in kind:
        water |= _river(rng, size)
    if kind == "coast":
        water |= _coast(rng, size)
    return water


def _water_colour(rng: np.random.Generator, water: np.ndarray, land: np.ndarray) -> np.ndarray:
    """Water colour with depth shading: lighter and closer to the land colour near the shore."""
    size = water.shape[0]
    colour = WATER_COLOURS[rng.choice(len(WATER_COLOURS), p=WATER_WEIGHTS)]
    colour = colour * rng.uniform(0.85, 1.2) + rng.normal(0, 0.02, 3)
    depth = ndimage.distance_transform_edt(water) if water.any() else np.zeros(water.shape)
    shallow = np.exp(-depth / rng.uniform(1.0, 0.05 * size + 1.5))[..., None] * rng.uniform(
        0.1, 0.4
    )
    ripple = (fractal_noise(rng, size, 1.5)[..., None] - 0.5) * 0.05
    return (colour * (1 - shallow) + land * shallow + ripple).astype(np.float32)


def _clouds(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cloud opacity (thin haze to opaque) and the shadow it casts, shifted by the sun angle."""
    if rng.random() >= 0.25:
        return np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
    density = fractal_noise(rng, size, rng.uniform(2.6, 3.4))
    threshold = rng.uniform(0.4, 0.7)
    cloud = np.clip((density - threshold) / rng.uniform(0.05, 0.3), 0, 1) * rng.uniform(0.3, 1.0)
    shift = rng.integers(-size // 10, size // 10 + 1, 2)
    shadow = np.roll(cloud, tuple(shift), axis=(0, 1)) * rng.uniform(0.0, 0.45)
    return cloud.astype(np.float32), shadow.astype(np.float32)


def draw_layers(rng: np.random.Generator, size: int) -> TileLayers:
    """All random choices for one tile."""
    land = _land(rng, size)
    water = _water(rng, size)
    water_colour = _water_colour(rng, water, land)
    cloud, shadow = _clouds(rng, size)
    noise = rng.normal(0, 0.012, (size, size, 3)).astype(np.float32)
    brightness, haze = float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.0, 0.35))
    return TileLayers(land, water, water_colour, cloud, shadow, noise, brightness, haze)


def compose(layers: TileLayers) -> np.ndarray:
    """uint8[H, W, 3] tile: land, water, shadow, cloud, slight optical blur, sensor noise."""
    ground = np.where(layers.water[..., None], layers.water_colour, layers.land)
    ground = ground * (1 - layers.shadow[..., None])
    cloud = layers.cloud[..., None]
    sky = ground * (1 - cloud) + np.float32(0.92) * cloud
    sky = ndimage.gaussian_filter(sky, sigma=(0.6, 0.6, 0))
    hazy = sky * (1 - layers.haze) + HAZE_COLOUR * layers.haze
    pixels = hazy * layers.brightness + layers.sensor_noise
    return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)


CLASSES = ("water", "building")  # what tiles can hold; class ids 1, 2 in class-id masks
BUILT_UP_RATE = 0.5  # share of tiles with a built-up district when "building" is asked for
ROOF_COLOURS = np.array(
    [[0.62, 0.60, 0.58], [0.55, 0.32, 0.26], [0.78, 0.77, 0.74], [0.40, 0.40, 0.42]], np.float32
)


def _built_up(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(bool[H, W] district, float32[H, W, 3] its colours): blocks of roofs on a street grid
    inside a blob with a ragged, blocky edge."""
    u, v = _rotated(size, rng.uniform(0, np.pi / 2), tuple(rng.uniform(0.25, 0.75, 2)))
    radius = rng.uniform(0.15, 0.4)
    block = rng.uniform(0.05, 0.1)
    cu, cv = np.floor(u / block), np.floor(v / block)  # the district is made of whole blocks
    jitter = np.random.default_rng(rng.integers(1 << 31)).uniform(-0.25, 0.25, (64, 64))
    ragged = jitter[cu.astype(np.int64) % 64, cv.astype(np.int64) % 64]
    district = np.hypot((cu + 0.5) * block, (cv + 0.5) * block) / radius + ragged < 1
    street = (np.abs(u / block - np.round(u / block)) < 0.12) | (
        np.abs(v / block - np.round(v / block)) < 0.12
    )
    table = ROOF_COLOURS[rng.integers(0, len(ROOF_COLOURS), (64, 64))]
    table = table * rng.uniform(0.85, 1.15, (64, 64, 1))
    colour = table[cu.astype(np.int64) % 64, cv.astype(np.int64) % 64]
    colour = np.where(street[..., None], np.float32([0.35, 0.35, 0.36]), colour)
    return district, colour.astype(np.float32)


def check_classes(classes: tuple[str, ...]) -> None:
    """ValueError unless `classes` is 'water' plus any of CLASSES."""
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or "water" not in classes:
        raise ValueError(f"synthetic classes must be 'water' plus any of {CLASSES}, got {classes}")


def render_tile(
    seed: int, index: int, size: int, classes: tuple[str, ...] = ("water",)
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8[H, W, 3] image, mask) of tile `index`; the same for the same arguments.

    The mask is bool[H, W] water for classes ("water",), else uint8[H, W] class ids (1 = water,
    2 = building, 0 = neither). Buildings come from their own random stream, so a tile's water
    and land are the same whichever classes are asked for."""
    check_classes(classes)
    layers = draw_layers(np.random.default_rng([seed, index, size]), size)
    if classes == ("water",):
        return compose(layers), layers.mask
    built = np.zeros((size, size), bool)
    extra = np.random.default_rng([seed, index, size, 1])
    if "building" in classes and extra.random() < BUILT_UP_RATE:
        district, colour = _built_up(extra, size)
        built = district & ~layers.water
        layers = dataclasses.replace(layers, land=np.where(built[..., None], colour, layers.land))
    visible = layers.cloud <= CLOUD_MASK_OPACITY
    ids = np.where(layers.mask, 1, np.where(built & visible, 2, 0)).astype(np.uint8)
    return compose(layers), ids


def tile_name(index: int) -> str:
    return f"synth_{index:05d}"


MANIFEST = "synthetic.json"  # written last: its presence means the set is complete


def _write_tile(task: tuple) -> str:
    """Renders and writes tile `index` into `out` (a worker's job); returns its image name."""
    out, seed, index, size, classes = task
    image, mask = render_tile(seed, index, size, classes)
    name = tile_name(index)
    Image.fromarray(image).save(os.path.join(out, "images", f"{name}.jpg"), quality=92)
    grey = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask  # water 255, or class ids
    Image.fromarray(grey).save(os.path.join(out, "masks", f"{name}.png"))
    return f"{name}.jpg"


def manifest(
    num_images: int, size: int, seed: int, classes: tuple[str, ...] = ("water",)
) -> dict[str, Any]:
    """What `generate` writes to MANIFEST; equal manifests mean identical tile sets."""
    made: dict[str, Any] = {"num_images": int(num_images), "size": int(size), "seed": int(seed)}
    if tuple(classes) != ("water",):
        made["classes"] = list(classes)
    return made


def read_manifest(out_dir: str | pathlib.Path) -> dict[str, int] | None:
    """The MANIFEST of a generated set, or None (not generated here, or interrupted)."""
    try:
        return json.loads((pathlib.Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def generate(
    out_dir: str | pathlib.Path,
    num_images: int,
    size: int = 128,
    seed: int = 0,
    workers: int | None = None,
    classes: tuple[str, ...] = ("water",),
) -> list[str]:
    """Writes `num_images` tiles into `out_dir` (layout: module docstring); returns image names.

    Atomic: tiles go to a temporary sibling folder renamed to `out_dir` when complete (an
    existing `out_dir` is replaced then), so an interrupted run leaves no half-written set.
    `workers` processes render in parallel (default: the CPU cores); the tiles do not depend on it.
    """
    if num_images < 1 or size < 16:
        raise ValueError(f"need num_images >= 1 and size >= 16, got {num_images} and {size}")
    out = pathlib.Path(out_dir)
    if out.exists() and read_manifest(out) is None and any(out.iterdir()):
        raise ValueError(
            f"{out} exists and was not written by this generator (no {MANIFEST}); it is left "
            "alone: choose another output folder or remove it."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        classes = tuple(classes)
        check_classes(classes)  # bad classes fail here, not in a worker
        tasks = [(str(tmp), seed, index, size, classes) for index in range(num_images)]
        workers = min(workers or min(os.cpu_count() or 1, num_images // 64 or 1), num_images)
        progress = dict(total=num_images, desc="generating tiles", unit="tile", leave=False)
        if workers == 1:
            names = [_write_tile(task) for task in tqdm(tasks, **progress)]
        else:  # spawn: safe in a process that has already started JAX or TF threads.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                names = list(tqdm(pool.imap(_write_tile, tasks, chunksize=32), **progress))
        test = [n for i, n in enumerate(names) if i % TEST_EVERY == TEST_EVERY - 1]
        train = [n for i, n in enumerate(names) if i % TEST_EVERY != TEST_EVERY - 1]
        (tmp / "train_images.txt").write_text("".join(f"{n}\n" for n in train))
        (tmp / "test_images.txt").write_text("".join(f"{n}\n" for n in test))
        (tmp / MANIFEST).write_text(json.dumps(manifest(num_images, size, seed, classes)) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return names
