"""The optional geo dependencies (rasterio, shapely): imported here, or one clear error.

GeoTIFF scenes, georeferenced masks and polygons need the `geo` extra; everything else runs
without it. `require()` is called where a geo input or output is first needed.
"""

from __future__ import annotations

import os
from types import ModuleType

INSTALL_HINT = 'pip install -e ".[geo]"'
# Rasters read with rasterio (windowed); other image files are plain images (PIL).
RASTER_EXTENSIONS = (".tif", ".tiff", ".vrt", ".jp2", ".img")


class GeoDependencyError(ValueError):
    """rasterio or shapely is missing; the message says what to install."""


def require(what: str = "GeoTIFF scenes") -> tuple[ModuleType, ModuleType]:
    """(rasterio, shapely), or GeoDependencyError naming `what` needed them and the fix."""
    try:
        import rasterio
        import shapely
    except ImportError as error:
        raise GeoDependencyError(
            f"{what} need rasterio and shapely ({error.name} is not installed): run {INSTALL_HINT}"
        ) from None
    return rasterio, shapely


def is_raster_file(path: str | os.PathLike) -> bool:
    """True for files read with rasterio (GeoTIFF and other GDAL rasters), by extension."""
    return os.path.splitext(os.fspath(path))[1].lower() in RASTER_EXTENSIONS
