"""Reading scenes of any size: GeoTIFFs (rasterio, windowed) and plain images (PIL), as RGB rows.

A `Scene` gives uint8[h, W, 3] RGB pixels and bool[h, W] validity for any run of rows
(`read_rows`) or any window (`read_window`), so callers hold a strip of the scene, never all of
it (GeoTIFFs; a plain JPEG/PNG is decoded whole, with PIL's decompression-bomb limit lifted).
`Radiometry` says how band values become 0..255: the bands to use (1-based, as rasterio counts:
`--bands 4,3,2`; one band is shown as grey), then a per-band linear map from [low, high] to
[0, 255]: percentiles of a decimated read (`--stretch 2,98`), fixed values (`--scale 0,3000`
for uint16 reflectance), or none for uint8 data. Nodata (the raster's nodata value, internal
masks or an alpha band, via rasterio's `read_masks`) is invalid in any selected band; invalid
pixels are black.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from paligemma_seg.data import geo
from paligemma_seg.data import images as images_lib

DEFAULT_STRETCH = (2.0, 98.0)  # percentiles used for data that is not uint8 when none is given
STATS_SIDE = 1024  # the decimated read for percentiles has at most this many pixels a side
GDAL_CACHE_MB = 128  # GDAL's block cache while scenes are read and written


@dataclasses.dataclass(frozen=True)
class Radiometry:
    """Bands (1-based) and how their values map to 0..255; at most one of stretch and scale."""

    bands: tuple[int, ...] | None = None  # None: 1, 2, 3 (or 1 for a one-band raster)
    stretch: tuple[float, float] | None = None  # percentiles (low, high) per band
    scale: tuple[float, float] | None = None  # fixed values (low, high), all bands

    def __post_init__(self) -> None:
        if self.stretch is not None and self.scale is not None:
            raise ValueError("give --stretch or --scale, not both")
        if self.stretch is not None and not 0 <= self.stretch[0] < self.stretch[1] <= 100:
            raise ValueError(f"--stretch {self.stretch}: need 0 <= LOW < HIGH <= 100 (percent)")
        if self.scale is not None and not self.scale[0] < self.scale[1]:
            raise ValueError(f"--scale {self.scale}: need LOW < HIGH (band values)")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """'4,3,2' -> (4, 3, 2); None or '' -> None. ValueError naming the flag otherwise."""
    if not text:
        return None
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        hint = "give 1-based band numbers, e.g. --bands 4,3,2"
        raise ValueError(f"--bands {text!r}: {hint}") from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise ValueError(f"--bands {text!r}: give 3 bands (R,G,B) or 1 (grey), numbered from 1")
    return bands


def parse_pair(text: str | None, flag: str) -> tuple[float, float] | None:
    """'2,98' -> (2.0, 98.0); None or '' -> None."""
    if not text:
        return None
    parts = text.split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give two numbers LOW,HIGH, e.g. {flag} 2,98") from None
    return low, high


@contextlib.contextmanager
def unlimited_pixels() -> Iterator[None]:
    """Lifts PIL's decompression-bomb limit (scenes are big on purpose), then restores it."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@contextlib.contextmanager
def bounded_gdal_cache(megabytes: int = GDAL_CACHE_MB) -> Iterator[None]:
    """Caps GDAL's block cache (by default 5% of RAM, which windowed reads of a big scene fill
    with decoded blocks, so RSS would grow with the scene) unless GDAL_CACHEMAX is set."""
    try:
        import rasterio
    except ImportError:  # nothing to cap; geo.require says what to install where needed
        yield
        return
    if "GDAL_CACHEMAX" in os.environ:
        yield
        return
    with rasterio.Env(GDAL_CACHEMAX=megabytes << 20):  # rasterio passes bytes to GDAL
        yield


def read_image_any_size(path: str | os.PathLike) -> images_lib.Loaded:
    """`images.read_image` without PIL's size limit."""
    with unlimited_pixels():
        return images_lib.read_image(path)


def _to_uint8(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """float/int[C, h, w] -> uint8[C, h, w]: [low, high] per band -> [0, 255], clipped."""
    out = np.empty(values.shape, np.uint8)
    for band, (lo, hi) in enumerate(zip(low, high, strict=True)):
        scaled = (values[band].astype(np.float32) - np.float32(lo)) * np.float32(255 / (hi - lo))
        out[band] = np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    return out


class Scene:
    """A readable scene: size, georeference (None for plain images) and RGB rows/windows."""

    path: str
    height: int
    width: int
    crs: Any = None  # rasterio CRS or None
    transform: Any = None  # affine.Affine or None
    profile: dict[str, Any] | None = None  # rasterio profile of the source (rasters only)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    def read_window(
        self, row: int, col: int, height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(uint8[height, width, 3] RGB, bool[height, width] valid) of a window in the scene."""
        raise NotImplementedError

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) over the whole width."""
        return self.read_window(start, 0, stop - start, self.width)

    def read_decimated(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole scene at most `max_side` px a side (every k-th pixel), for previews."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases the file."""

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlainScene(Scene):
    """A JPEG/PNG/... decoded whole by PIL (any size); every pixel is valid."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.pixels = read_image_any_size(self.path).pixels
        self.height, self.width = self.pixels.shape[:2]

    def read_window(self, row, col, height, width):
        pixels = self.pixels[row : row + height, col : col + width]
        return pixels, np.ones(pixels.shape[:2], bool)

    def read_decimated(self, max_side):
        step = max(1, -(-max(self.height, self.width) // max_side))
        pixels = self.pixels[::step, ::step]
        return pixels, np.ones(pixels.shape[:2], bool)


class RasterScene(Scene):
    """A GDAL raster (GeoTIFF, ...) read window by window through rasterio."""

    def __init__(self, path: str | os.PathLike, radiometry: Radiometry = Radiometry()):
        rasterio, _ = geo.require()
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"{self.path}: file not found")
        try:
            self.dataset = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as error:
            raise ValueError(f"{self.path}: not a readable raster ({error})") from None
        self.height, self.width = self.dataset.height, self.dataset.width
        self.crs = self.dataset.crs
        self.transform = self.dataset.transform
        self.profile = dict(self.dataset.profile)
        self.bands = self._bands(radiometry.bands)
        self.low, self.high = self._value_range(radiometry)

    def _bands(self, bands: tuple[int, ...] | None) -> tuple[int, ...]:
        count = self.dataset.count
        if bands is None:
            if count in (1, 2):
                return (1,)
            bands = (1, 2, 3)
        missing = [b for b in bands if b > count]
        if missing:
            raise ValueError(
                f"{self.path} has {count} band(s); --bands asks for band {missing[0]}: give band "
                f"numbers from 1 to {count}"
            )
        return tuple(bands)

    def _value_range(self, radiometry: Radiometry) -> tuple[np.ndarray, np.ndarray]:
        """Per selected band, the values that map to 0 and to 255."""
        count = len(self.bands)
        if radiometry.scale is not None:
            return np.full(count, radiometry.scale[0]), np.full(count, radiometry.scale[1])
        dtype = np.dtype(self.dataset.dtypes[self.bands[0] - 1])
        stretch = radiometry.stretch
        if stretch is None and dtype == np.uint8:
            return np.zeros(count), np.full(count, 255.0)
        if stretch is None:
            stretch = DEFAULT_STRETCH
            logging.info(
                "%s: %s data, stretched to percentiles %s (set --stretch or --scale)",
                self.path,
                dtype,
                stretch,
            )
        return self._percentiles(stretch)

    def _decimated(self, step: int, masked: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(values[C, h, w], valid[h, w]) of every `step`-th pixel, read a few hundred source
        rows at a time: one read of the whole scene thrashes GDAL's bounded block cache."""
        from rasterio.windows import Window

        rows, values, valid = step * max(1, 256 // step), [], []
        for row in range(0, self.height, rows):
            height = min(rows, self.height - row)
            window = Window(0, row, self.width, height)
            shape = (len(self.bands), -(-height // step), -(-self.width // step))
            read = dict(window=window, out_shape=shape)
            values.append(self.dataset.read(list(self.bands), masked=masked, **read))
            valid.append(self.dataset.read_masks(list(self.bands), **read).min(axis=0) > 0)
        join = np.ma.concatenate if masked else np.concatenate
        return join(values, axis=1), np.concatenate(valid)

    def _percentiles(self, stretch: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        step = max(1, -(-max(self.height, self.width) // STATS_SIDE))
        values, _ = self._decimated(step, masked=True)
        low, high = [], []
        for band, data in zip(self.bands, values, strict=True):
            valid = data.compressed()
            if valid.size == 0:
                raise ValueError(f"{self.path}: band {band} holds only nodata")
            lo, hi = np.percentile(valid, stretch)
            low.append(lo)
            high.append(hi if hi > lo else lo + 1)
        return np.asarray(low), np.asarray(high)

    def read_window(self, row, col, height, width):
        from rasterio.windows import Window

        window = Window(col, row, width, height)
        values = self.dataset.read(list(self.bands), window=window)
        valid = self.dataset.read_masks(list(self.bands), window=window).min(axis=0) > 0
        return self._rgb(values, valid), valid

    def read_decimated(self, max_side):
        step = max(1, -(-max(self.height, self.width) // max_side))
        values, valid = self._decimated(step)
        return self._rgb(values, valid), valid

    def _rgb(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """uint8[h, w, 3] from band values [C, h, w] (one band -> grey), black where invalid."""
        rgb = np.moveaxis(_to_uint8(values, self.low, self.high), 0, -1)
        if rgb.shape[-1] == 1:
            rgb = np.repeat(rgb, 3, axis=-1)
        rgb[~valid] = 0
        return np.ascontiguousarray(rgb)

    def close(self) -> None:
        self.dataset.close()


def open_scene(path: str | os.PathLike, radiometry: Radiometry = Radiometry()) -> Scene:
    """A RasterScene for GDAL rasters (needs the geo extra), else a PlainScene (PIL)."""
    if geo.is_raster_file(path):
        return RasterScene(path, radiometry)
    if radiometry.bands or radiometry.stretch or radiometry.scale:
        raise ValueError(
            f"{path}: --bands, --stretch and --scale apply to rasters (GeoTIFF); a plain image "
            "is read as RGB"
        )
    try:
        return PlainScene(path)
    except images_lib.ImageReadError as error:
        raise ValueError(f"{path}: {error}") from None
