"""Georeferenced outputs of a tiled prediction: NAME_mask.tif (COG), NAME.geojson, NAME_preview.png.

The mask is uint8 (1 water, 0 not, 255 nodata), the input's size, CRS and transform; rows are
written as they become final into a temporary striped GeoTIFF, then copied into a DEFLATE
Cloud Optimized GeoTIFF (GDAL's COG driver, 512 px tiles) and renamed into place.
Polygons come from rasterio.features.shapes in pixel coordinates, simplified with shapely (a
tolerance in pixels), then moved to the CRS; `area_m2` is given when the CRS is projected.
"""

from __future__ import annotations

import json
import os
import tempfile
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


def write_geojson(mask_path: str, path: str, tolerance: float = 1.0, wgs84: bool = False) -> int:
    """Water polygons of a written mask into `path` (atomic); returns the number of features."""
    rasterio, shapely = geo.require("polygons")
    from rasterio import features, warp
    from shapely import affinity, geometry

    with rasterio.open(mask_path) as dataset:
        mask = dataset.read(1)
        crs, transform = dataset.crs, dataset.transform
    water = (mask == 1).astype(np.uint8)
    matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    unit = crs.linear_units_factor[1] if crs is not None and crs.is_projected else None
    items = []
    for shape, _ in features.shapes(water, mask=water.astype(bool)):
        polygon = geometry.shape(shape).simplify(tolerance, preserve_topology=True)
        if polygon.is_empty:
            continue
        placed = affinity.affine_transform(polygon, matrix)
        properties = {"class": "water", "area_px": float(polygon.area)}
        if unit is not None:
            properties["area_m2"] = round(float(placed.area) * unit * unit, 3)
        shape_out = geometry.mapping(placed)
        if wgs84 and crs is not None:
            shape_out = warp.transform_geom(crs, "EPSG:4326", shape_out)
        items.append({"type": "Feature", "properties": properties, "geometry": shape_out})
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": items}
    if crs is not None and not wgs84:
        collection["crs"] = {"type": "name", "properties": {"name": crs.to_string()}}
    staging = path + ".tmp"
    with open(staging, "w") as f:
        json.dump(collection, f)
    os.replace(staging, path)
    return len(items)


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
