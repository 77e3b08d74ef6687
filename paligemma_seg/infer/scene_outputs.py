"""Georeferenced outputs of a tiled prediction: NAME_mask.tif (COG), NAME.geojson, NAME_preview.png.

The mask is uint8 (1 water, 0 not, 255 nodata), the input's size, CRS and transform; rows are
written as they become final into a temporary striped GeoTIFF, then copied into a DEFLATE
Cloud Optimized GeoTIFF (GDAL's COG driver, 512 px tiles) and renamed into place.
Polygons come from rasterio.features.shapes in pixel coordinates, strip by strip (parts cut by
a strip's edge rejoined), simplified with shapely (a tolerance in pixels), then moved to the CRS;
`area_m2` is given when the CRS is projected.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from paligemma_seg.data import geo
from paligemma_seg.infer.tiling import NODATA


class MaskWriter:
    """emit(row, uint8[h, W]) rows into a temporary GeoTIFF; `finish()` publishes the COG."""

    def __init__(self, scene: Any, path: str):
        rasterio, _ = geo.require()
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        handle, self.staging = tempfile.mkstemp(suffix=".tif", prefix=".mask-", dir=folder)
        os.close(handle)
        profile = {
            "driver": "GTiff",
            "height": scene.height,
            "width": scene.width,
            "count": 1,
            "dtype": "uint8",
            "nodata": NODATA,
            "crs": scene.crs,
            "transform": scene.transform,
            "compress": "deflate",
        }
        self.dataset = rasterio.open(self.staging, "w", **profile)

    def emit(self, row: int, rows: np.ndarray) -> None:
        from rasterio.windows import Window

        self.dataset.write(rows[None], window=Window(0, row, rows.shape[1], rows.shape[0]))

    def finish(self) -> None:
        import rasterio.shutil

        self.dataset.close()
        cog = self.staging + ".cog"
        try:
            rasterio.shutil.copy(
                self.staging, cog, driver="COG", compress="DEFLATE", blocksize=512,
                overview_resampling="nearest",
            )  # fmt: skip
            os.replace(cog, self.path)
        finally:
            for leftover in (self.staging, cog):
                if os.path.exists(leftover):
                    os.remove(leftover)


GEOJSON_STRIP = 1024  # mask rows polygonised at a time (memory: this many rows of the width)


def _strip_polygons(dataset: Any, strip: int) -> Iterator[tuple[Any, bool]]:
    """(water polygon in pixel coordinates, whether a strip's edge cuts it) of the mask, read
    `strip` rows at a time; the caller rejoins the cut parts."""
    from rasterio import features
    from rasterio.transform import Affine
    from rasterio.windows import Window
    from shapely import geometry

    for row in range(0, dataset.height, strip):
        height = min(strip, dataset.height - row)
        water = dataset.read(1, window=Window(0, row, dataset.width, height)) == 1
        shifted = Affine.translation(0, row)
        for shape, _ in features.shapes(water.view(np.uint8), mask=water, transform=shifted):
            polygon = geometry.shape(shape)
            _, top, _, bottom = polygon.bounds
            yield polygon, (top <= row and row > 0) or (bottom >= row + height < dataset.height)


def _joined(parts: list[Any]) -> list[Any]:
    """The polygons of the union of `parts` (pieces of one polygon cut by strips rejoin)."""
    import shapely

    if not parts:
        return []
    union = shapely.unary_union(parts)
    return list(getattr(union, "geoms", [union]))


class _Features:
    """GeoJSON features of pixel-space polygons (simplified, placed in the CRS, with areas),
    written to `file` one by one as a FeatureCollection's members."""

    def __init__(self, file: Any, crs: Any, transform: Any, tolerance: float, wgs84: bool):
        self.file, self.crs, self.tolerance, self.wgs84 = file, crs, tolerance, wgs84
        self.matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
        self.unit = crs.linear_units_factor[1] if crs is not None and crs.is_projected else None
        self.count = 0

    def add(self, shape: Any) -> None:
        from rasterio import warp
        from shapely import affinity, geometry

        polygon = shape.simplify(self.tolerance, preserve_topology=True)
        if polygon.is_empty:
            return
        placed = affinity.affine_transform(polygon, self.matrix)
        properties = {"class": "water", "area_px": float(polygon.area)}
        if self.unit is not None:
            properties["area_m2"] = round(float(placed.area) * self.unit * self.unit, 3)
        shape_out = geometry.mapping(placed)
        if self.wgs84 and self.crs is not None:
            shape_out = warp.transform_geom(self.crs, "EPSG:4326", shape_out)
        item = {"type": "Feature", "properties": properties, "geometry": shape_out}
        self.file.write(("," if self.count else "") + json.dumps(item))
        self.count += 1


def write_geojson(
    mask_path: str,
    path: str,
    tolerance: float = 1.0,
    wgs84: bool = False,
    strip: int = GEOJSON_STRIP,
) -> int:
    """Water polygons of a written mask into `path` (atomic); returns the number of features.

    The mask is polygonised `strip` rows at a time (rasterio.features.shapes), polygons cut by
    a strip's edge are rejoined (shapely union), then each is simplified (`tolerance` px)."""
    rasterio, _ = geo.require("polygons")

    staging, cut = path + ".tmp", []
    with rasterio.open(mask_path) as dataset, open(staging, "w") as f:
        crs = dataset.crs
        named = crs is not None and not wgs84
        crs_member = {"type": "name", "properties": {"name": crs.to_string()}} if named else None
        f.write('{"type": "FeatureCollection", ')
        f.write(f'"crs": {json.dumps(crs_member)}, ' if named else "")
        f.write('"features": [')
        found = _Features(f, crs, dataset.transform, tolerance, wgs84)
        for polygon, at_cut in _strip_polygons(dataset, strip):
            cut.append(polygon) if at_cut else found.add(polygon)
        for polygon in _joined(cut):
            found.add(polygon)
        f.write("]}\n")
    os.replace(staging, path)
    return found.count


def mask_geojson(mask: np.ndarray, tolerance: float = 1.0) -> str:
    """GeoJSON text (a FeatureCollection) of a bool[H, W] mask's water polygons in pixel
    coordinates (x right, y down, no CRS), simplified as `write_geojson` does: for images
    without a georeference (the web page's uploads)."""
    geo.require("polygons")
    from rasterio import features
    from rasterio.transform import Affine
    from shapely import geometry

    water = np.ascontiguousarray(mask, dtype=bool)
    text = io.StringIO()
    text.write('{"type": "FeatureCollection", "features": [')
    found = _Features(text, None, Affine.identity(), tolerance, wgs84=False)
    for shape, _ in features.shapes(water.view(np.uint8), mask=water):
        found.add(geometry.shape(shape))
    text.write("]}\n")
    return text.getvalue()


def write_preview(scene: Any, mask_path: str, path: str, max_side: int = 1024) -> None:
    """A decimated overlay of the mask on the scene (PNG, atomic)."""
    import rasterio

    from paligemma_seg import visualize

    pixels, _ = scene.read_decimated(max_side)
    with rasterio.open(mask_path) as dataset:
        mask = dataset.read(1, out_shape=pixels.shape[:2]) == 1
    staging = path + ".tmp"
    visualize.overlay(pixels, mask).save(staging, format="PNG")
    os.replace(staging, path)
