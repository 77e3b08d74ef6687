"""Tiled prediction of a generated GeoTIFF scene with a trained model: tiles/s and peak RSS.

    python scripts/bench_scene.py --config configs/water_tiny.py \
        --checkpoint runs/water_tiny/params.npz --size 20000 [--tile 224 --overlap 0.25]
        [--preview docs/images/scene_preview.png]

The scene (3 bands, uint8, EPSG:32633, a nodata border) repeats 16 generated 256 px tiles and
is written strip by strip, so making it holds one strip. Peak RSS (ru_maxrss) is printed after the
prediction; it should not grow with --size. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

SIDE, POOL, BORDER = 256, 16, 100


def write_scene(path: str, size: int, seed: int = 3) -> None:
    import rasterio
    from rasterio.transform import Affine
    from rasterio.windows import Window

    from paligemma_seg.data.synthetic import render_tile

    pool = [np.maximum(render_tile(seed, i, SIDE)[0], 1) for i in range(POOL)]
    profile = dict(
        driver="GTiff", height=size, width=size, count=3, dtype="uint8", nodata=0,
        crs="EPSG:32633", transform=Affine(10, 0, 400000, 0, -10, 5000000), tiled=True,
        compress="deflate",
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dataset:
        for row in range(0, size, SIDE):
            height = min(SIDE, size - row)
            strip = np.zeros((height, size, 3), np.uint8)
            for col in range(0, size, SIDE):
                index = (row // SIDE * 7 + col // SIDE) % POOL
                width = min(SIDE, size - col)
                strip[:, col : col + width] = pool[index][:height, :width]
            rows = np.arange(row, row + height)[:, None]
            cols = np.arange(size)[None, :]
            inside = (rows >= BORDER) & (rows < size - BORDER) & (cols >= BORDER)
            strip[~(inside & (cols < size - BORDER))] = 0
            dataset.write(np.moveaxis(strip, -1, 0), window=Window(0, row, size, height))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--preview", help="copy NAME_preview.png here")
    args = parser.parse_args()

    import jax

    from paligemma_seg import config_files
    from paligemma_seg.infer import scenes, segmenter

    work = tempfile.mkdtemp(prefix="bench_scene-")
    try:
        scene = os.path.join(work, "scene.tif")
        started = time.perf_counter()
        write_scene(scene, args.size)
        made = time.perf_counter() - started
        cfg = config_files.load(args.config)
        model, params, mesh = segmenter.load_model(cfg, args.checkpoint)
        with jax.set_mesh(mesh):
            engine = segmenter.Segmenter(cfg, model, params)
            started = time.perf_counter()
            record = scenes.predict_scene(
                engine, scene, work, "scene", cfg.data.prefix, args.tile, args.overlap,
                progress=sys.stderr.isatty(),
            )  # fmt: skip
            seconds = time.perf_counter() - started
        if args.preview:
            shutil.copy(os.path.join(work, record["preview"]), args.preview)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = {
            "size": args.size, "tile": args.tile, "overlap": args.overlap,
            "tiles": record["tiles"], "predicted_tiles": record["predicted_tiles"],
            "nodata_tiles": record["nodata_tiles"], "tiles_per_s": record["tiles_per_s"],
            "seconds": round(seconds, 1), "scene_written_s": round(made, 1),
            "polygons": record.get("polygons"), "peak_rss_mib": round(peak, 1),
        }  # fmt: skip
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.exit(main())
