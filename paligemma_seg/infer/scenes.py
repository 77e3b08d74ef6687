"""One scene -> NAME_mask.tif, NAME.geojson and NAME_preview.png (tiled; see `infer.tiling`).

`auto_tile` decides `--tile auto`: rasters (GeoTIFF) and images over AUTO_MAX_PIXELS are tiled at
the model's input side; smaller plain images are predicted whole (`--tile 0`, resized to the
model's input, as before tiling existed).
"""

from __future__ import annotations

import os
from typing import Any

from paligemma_seg.data import geo, scenes
from paligemma_seg.infer import scene_outputs, tiling

AUTO_MAX_PIXELS = 4096 * 4096  # plain images up to this size are predicted whole under "auto"


def auto_tile(path: str, height: int, width: int, model_side: int) -> int:
    """The tile side `--tile auto` uses for this file: 0 (whole image) or the model's side."""
    if geo.is_raster_file(path) or height * width > AUTO_MAX_PIXELS:
        return model_side
    return 0


def predict_scene(
    segmenter: Any,
    path: str,
    out: str,
    name: str,
    prompt: str,
    tile: int,
    overlap: float = 0.25,
    radiometry: scenes.Radiometry = scenes.Radiometry(),
    progress: bool = True,
    wgs84: bool = False,
) -> dict[str, Any]:
    """Tiled prediction of one scene into `out` (local folder); returns its record.

    wgs84: NAME.geojson in EPSG:4326 (RFC 7946) instead of the scene's CRS."""
    predictor = tiling.segmenter_predictor(segmenter, prompt)
    mask_path = os.path.join(out, f"{name}_mask.tif")
    with scenes.bounded_gdal_cache(), scenes.open_scene(path, radiometry) as scene:
        writer = scene_outputs.MaskWriter(scene, mask_path)
        counts = tiling.predict_tiled(
            scene, predictor, segmenter.codec, tile, overlap, writer.emit,
            batch_size=segmenter.batch_size, progress=progress,
        )  # fmt: skip
        writer.finish()
        record = {"name": name, "mask": os.path.basename(mask_path), "tile": tile, **counts}
        if scene.georeferenced:
            geojson = os.path.join(out, f"{name}.geojson")
            record["polygons"] = scene_outputs.write_geojson(mask_path, geojson, wgs84=wgs84)
            record["geojson"] = os.path.basename(geojson)
        preview = os.path.join(out, f"{name}_preview.png")
        scene_outputs.write_preview(scene, mask_path, preview)
        record.update(preview=os.path.basename(preview), height=scene.height, width=scene.width)
    return record
