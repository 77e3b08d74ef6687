"""Training tiles cut from a scene: image/mask PNG pairs for `data.convert`'s binary mode.

    python -m paligemma_seg.data.convert --scene scene.tif --scene-mask mask.tif \\
        [--scene-labels water.geojson] --tile 224 --stride 224 [--scene-split train] --out DIR

The scene is read window by window (`data.scenes`, with --bands/--stretch/--scale); the mask is
a raster on the scene's grid (same size; same CRS and transform when both have one): water is
any value > 0 that is not the mask's nodata. Or `--scene-labels`: GeoJSON polygons rasterised
into each tile's window (`rasterio.features.rasterize`, pixel centres inside), in the GeoJSON's
`crs` member's CRS (as predict writes it), else EPSG:4326 (RFC 7946), moved to the scene's CRS.

Tiles start every `stride` px, the last one in each row and column ending at the scene's edge
(scenes smaller than a tile give one smaller tile). Tiles without a valid scene pixel are
skipped and counted (`settings.scene.nodata_tiles` in report.json); in tiles partly nodata, the
nodata pixels are black and not water. Tiles are named `SCENE_rROW_cCOL.png` (their top-left
pixel, 6 digits), written into a staging folder, then renamed to `OUT/scene_tiles/SCENE/`
(`images/`, `masks/`), replacing an earlier cut; the JSONL and report.json are then written by
`convert.convert` exactly as for a folder of images and masks (atomic; a rerun redoes both).
Every tile goes into one split, `--scene-split` (default train), unless `--split NAME=LIST`
files name tiles (by these names) as for folders.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image

from paligemma_seg.data import geo, scenes
from paligemma_seg.data.pairs import PathLike

TILES_DIR = "scene_tiles"
DEFAULT_SPLIT = "train"


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """How a scene is cut: its labels (one of a mask raster and GeoJSON polygons), the tile side
    and stride in px (stride None: the side), and the bands' radiometry."""

    mask: PathLike | None = None
    labels: PathLike | None = None
    tile: int = 224
    stride: int | None = None
    radiometry: scenes.Radiometry = scenes.Radiometry()

    @property
    def step(self) -> int:
        """px between tile starts."""
        return self.stride or self.tile


@dataclasses.dataclass(frozen=True)
class Cut:
    """What `cut_tiles` wrote: the tile folders, the tile names, and the counts."""

    images: pathlib.Path
    masks: pathlib.Path
    names: list[str]
    tiles: int  # grid positions
    nodata_tiles: int  # skipped: no valid scene pixel


def starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every `stride`, the last one ending at the edge."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, stride), length - tile]


def _check_grid(scene: scenes.Scene, dataset: Any, path: str) -> None:
    """ValueError unless the raster at `path` lies on the scene's pixel grid."""
    if (dataset.height, dataset.width) != (scene.height, scene.width):
        raise ValueError(
            f"{path} is {dataset.width} x {dataset.height} px but {scene.path} is "
            f"{scene.width} x {scene.height}: resample the mask onto the scene's grid"
        )
    same = dataset.crs == scene.crs and dataset.transform.almost_equals(scene.transform)
    if dataset.crs and scene.crs and not same:
        raise ValueError(
            f"{path}: CRS/transform {dataset.crs} {tuple(dataset.transform)[:6]} differ from "
            f"{scene.path}'s {scene.crs} {tuple(scene.transform)[:6]}: resample the mask onto "
            "the scene's grid (e.g. gdalwarp with the scene's -t_srs, -te and -tr)"
        )


class _RasterLabels:
    """Water of a window from a mask raster: value > 0 and not the mask's nodata."""

    def __init__(self, path: str, scene: scenes.Scene):
        rasterio, _ = geo.require("scene masks")
        try:
            self.dataset = rasterio.open(path)
        except rasterio.errors.RasterioIOError as error:
            raise ValueError(f"--scene-mask {path}: not a readable raster ({error})") from None
        _check_grid(scene, self.dataset, path)

    def window(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        from rasterio.windows import Window

        window = Window(col, row, width, height)
        values = self.dataset.read(1, window=window)
        return (values > 0) & (self.dataset.read_masks(1, window=window) > 0)

    def close(self) -> None:
        self.dataset.close()


class _VectorLabels:
    """Water of a window from GeoJSON polygons, rasterised into the window's grid."""

    def __init__(self, path: str, scene: scenes.Scene):
        _, shapely = geo.require("scene labels")
        if not scene.georeferenced:
            raise ValueError(f"--scene-labels needs a georeferenced scene; {scene.path} has no CRS")
        self.transform = scene.transform
        shapes = [shapely.geometry.shape(g) for g in read_geometries(path, scene.crs)]
        self.shapes = [s for s in shapes if not s.is_empty]
        self.tree = shapely.STRtree(self.shapes)
        bounds = _scene_bounds(scene)
        if self.shapes and not len(self.tree.query(shapely.box(*bounds))):
            raise ValueError(
                f"--scene-labels {path}: none of its {len(self.shapes)} geometries falls in "
                f"{scene.path} (bounds {tuple(round(b) for b in bounds)} in {scene.crs}); a "
                "GeoJSON without a 'crs' member is read as EPSG:4326: add one or reproject it"
            )

    def window(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        import shapely
        from rasterio import features
        from rasterio.transform import Affine

        transform = self.transform @ Affine.translation(col, row)
        corners = [transform @ (x, y) for x in (0, width) for y in (0, height)]
        xs, ys = zip(*corners, strict=True)
        hits = [
            self.shapes[i] for i in self.tree.query(shapely.box(min(xs), min(ys), max(xs), max(ys)))
        ]
        if not hits:
            return np.zeros((height, width), bool)
        burnt = features.rasterize(
            [(s, 1) for s in hits], out_shape=(height, width), transform=transform, dtype="uint8"
        )
        return burnt.astype(bool)

    def close(self) -> None:
        pass


def _scene_bounds(scene: scenes.Scene) -> tuple[float, float, float, float]:
    from rasterio.transform import array_bounds

    return array_bounds(scene.height, scene.width, scene.transform)  # west, south, east, north


def read_geometries(path: str, crs: Any) -> list[dict]:
    """The GeoJSON geometries at `path` (FeatureCollection, Feature or geometry), in `crs`."""
    from rasterio import warp

    try:
        data = json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--scene-labels {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--scene-labels {path}: not GeoJSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--scene-labels {path}: not GeoJSON (expected an object)")
    source = data.get("crs", {}).get("properties", {}).get("name", "EPSG:4326")
    if data.get("type") == "FeatureCollection":
        geometries = [f.get("geometry") for f in data.get("features", [])]
    elif data.get("type") == "Feature":
        geometries = [data.get("geometry")]
    else:
        geometries = [data]
    geometries = [g for g in geometries if g]
    if any(g.get("type") not in ("Polygon", "MultiPolygon") for g in geometries):
        raise ValueError(f"--scene-labels {path}: give Polygon or MultiPolygon geometries only")
    same = warp.CRS.from_user_input(source) == crs
    return geometries if same else [warp.transform_geom(source, crs, g) for g in geometries]


def _grid(height: int, width: int, tile: int, stride: int) -> Iterator[tuple[int, int, int, int]]:
    """(row, col, h, w) of every tile, row by row."""
    for row in starts(height, tile, stride):
        for col in starts(width, tile, stride):
            yield row, col, min(tile, height - row), min(tile, width - col)


def _open_labels(scene: scenes.Scene, mask: str | None, labels: str | None) -> Any:
    if (mask is None) == (labels is None):
        raise ValueError("give one of --scene-mask MASK.tif and --scene-labels WATER.geojson")
    return _RasterLabels(mask, scene) if mask else _VectorLabels(labels, scene)


def cut_tiles(scene_path: PathLike, out: PathLike, spec: TileSpec) -> Cut:
    """Cuts the scene and its mask (or labels) into `OUT/scene_tiles/SCENE/` (module doc)."""
    geo.require("scene tiles")
    mask, labels, tile, stride = spec.mask, spec.labels, spec.tile, spec.step
    if tile < 1 or stride < 1:
        raise ValueError(f"--tile {tile} --stride {stride}: give sides of at least 1 px")
    out_dir = pathlib.Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".scene-tiles-", dir=out_dir))
    try:
        with scenes.bounded_gdal_cache(), scenes.open_scene(scene_path, spec.radiometry) as scene:
            final = out_dir / TILES_DIR / scene.name
            source = _open_labels(scene, mask and os.fspath(mask), labels and os.fspath(labels))
            try:
                names, total = _write_tiles(scene, source, staging, tile, stride)
            finally:
                source.close()
        _replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Cut(final / "images", final / "masks", names, total, total - len(names))


def _write_tiles(
    scene: scenes.Scene, source: Any, staging: pathlib.Path, tile: int, stride: int
) -> tuple[list[str], int]:
    """Writes the PNG pairs of tiles with a valid pixel; returns (their names, grid size)."""
    (staging / "images").mkdir()
    (staging / "masks").mkdir()
    names, total = [], 0
    for row, col, height, width in _grid(scene.height, scene.width, tile, stride):
        total += 1
        pixels, valid = scene.read_window(row, col, height, width)
        if not valid.any():
            continue
        water = source.window(row, col, height, width) & valid
        name = f"{scene.name}_r{row:06d}_c{col:06d}"
        Image.fromarray(pixels).save(staging / "images" / f"{name}.png")
        Image.fromarray(water.astype(np.uint8) * 255).save(staging / "masks" / f"{name}.png")
        names.append(name)
    return names, total


def _replace(staging: pathlib.Path, final: pathlib.Path) -> None:
    """Renames `staging` to `final`, moving an earlier `final` away first, then deleting it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def convert_scene(
    scene_path: PathLike,
    out: PathLike,
    spec: TileSpec,
    *,
    split: str = DEFAULT_SPLIT,
    splits: Mapping[str, PathLike] | None = None,
    **options: Any,
) -> dict:
    """Cuts the scene's tiles, then converts them with `convert.convert`; returns the report.

    splits: split name -> list of tile names (as for folders); without it every tile is in
    `split`. options: `convert.convert`'s keywords (codec, workers, ceiling, ...).
    """
    from paligemma_seg.data import convert as convert_lib

    cut = cut_tiles(scene_path, out, spec)
    if not splits:
        listed = cut.images.parent / f"{split}.txt"
        listed.write_text("".join(f"{name}\n" for name in cut.names))
        splits = {split: listed}
    scene = {
        "path": os.path.abspath(scene_path),
        "mask": spec.mask and os.path.abspath(spec.mask),
        "labels": spec.labels and os.path.abspath(spec.labels),
        "tile": spec.tile,
        "stride": spec.step,
        "bands": spec.radiometry.bands,
        "stretch": spec.radiometry.stretch,
        "scale": spec.radiometry.scale,
        "tiles": cut.tiles,
        "nodata_tiles": cut.nodata_tiles,
        "cut_tiles": len(cut.names),
    }
    return convert_lib.convert(
        cut.images, cut.masks, out, splits, extra_settings={"scene": scene}, **options
    )
