"""Tiled prediction over a synthetic GeoTIFF scene with an oracle model (the tiles' true suffixes):
the stitched mask reaches the codec's per-tile ceiling, keeps the CRS and transform, and its
polygons rasterise back to it."""

import json

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("shapely")

from affine import Affine  # noqa: E402
from rasterio import features  # noqa: E402

from paligemma_seg.data import scenes  # noqa: E402
from paligemma_seg.data.convert import load_codec  # noqa: E402
from paligemma_seg.data.synthetic import render_tile  # noqa: E402
from paligemma_seg.infer import scene_outputs, tiling  # noqa: E402
from paligemma_seg.segtokens import codec as codec_lib  # noqa: E402

HEIGHT, WIDTH, SIDE, BORDER = 768, 1024, 256, 40
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4100000.0)


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    """A 3-band uint8 GeoTIFF (EPSG:32633) stitched from generated tiles, nodata 0 in a border."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    truth = np.zeros((HEIGHT, WIDTH), bool)
    for i, (row, col) in enumerate(
        (r, c) for r in range(0, HEIGHT, SIDE) for c in range(0, WIDTH, SIDE)
    ):
        tile, mask = render_tile(7, i, SIDE)
        image[row : row + SIDE, col : col + SIDE] = np.maximum(tile, 1)
        truth[row : row + SIDE, col : col + SIDE] = mask
    valid = np.zeros((HEIGHT, WIDTH), bool)
    valid[BORDER:-BORDER, BORDER:-BORDER] = True
    image[~valid] = 0
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    profile = dict(
        driver="GTiff",
        height=HEIGHT,
        width=WIDTH,
        count=3,
        dtype="uint8",
        nodata=0,
        crs="EPSG:32633",
        transform=TRANSFORM,
        tiled=True,
        compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(np.moveaxis(image, -1, 0))
    return path, truth, valid


def test_scene_oracle_reaches_codec_ceiling_and_keeps_georeference(scene_file, tmp_path):
    path, truth, valid = scene_file
    codec = load_codec()
    ceilings = []

    def oracle(tiles, windows):
        texts = []
        for r, c, h, w in windows:
            window = truth[r : r + h, c : c + w]
            if window.any():
                ceilings.append(codec.ceiling_iou(window))
            texts.append(codec.encode(window).suffix)
        return texts

    mask_path = str(tmp_path / "scene_mask.tif")
    with scenes.open_scene(path) as scene:
        writer = scene_outputs.MaskWriter(scene, mask_path)
        counts = tiling.predict_tiled(scene, oracle, codec, 224, 0.25, writer.emit)
        writer.finish()
    with rasterio.open(mask_path) as out:
        assert out.crs.to_epsg() == 32633 and out.transform == TRANSFORM
        assert (out.height, out.width, out.dtypes[0], out.nodata) == (HEIGHT, WIDTH, "uint8", 255)
        assert out.profile["tiled"] and out.profile["compress"].lower() == "deflate"
        mask = out.read(1)
    np.testing.assert_array_equal(mask == tiling.NODATA, ~valid)
    stitched = codec_lib.iou(mask == 1, truth & valid)
    ceiling = float(np.mean(ceilings))
    print(f"stitched IoU {stitched:.4f}, mean per-tile ceiling {ceiling:.4f}, {counts}")
    assert stitched >= ceiling - 0.02
    assert counts["nodata_tiles"] == 0 and counts["predicted_tiles"] == counts["tiles"]

    geojson = str(tmp_path / "scene.geojson")
    assert scene_outputs.write_geojson(mask_path, geojson) > 0
    shapes = [(f["geometry"], 1) for f in json.load(open(geojson))["features"]]
    back = features.rasterize(shapes, out_shape=(HEIGHT, WIDTH), transform=TRANSFORM)
    assert codec_lib.iou(back == 1, mask == 1) >= 0.99
    areas = [f["properties"]["area_m2"] for f in json.load(open(geojson))["features"]]
    assert abs(sum(areas) - 100.0 * (mask == 1).sum()) / (100.0 * (mask == 1).sum()) < 0.02


def test_scene_reader_rejects_missing_band(scene_file):
    with pytest.raises(ValueError, match="has 3 band.*band 4"):
        scenes.open_scene(scene_file[0], scenes.Radiometry(bands=(4, 3, 2)))


def test_tile_positions_cover_the_axis_and_end_at_the_edge():
    assert tiling.positions(1000, 224, 168) == [0, 168, 336, 504, 672, 776]
    assert tiling.positions(100, 224, 168) == [0]
    with pytest.raises(ValueError, match="overlap"):
        tiling.stride_of(224, 1.0)


def test_predict_cli_tiles_a_geotiff_into_mask_geojson_and_preview(scene_file, tmp_path):
    import test_predict
    import train_fixtures

    from paligemma_seg import predict

    cfg, _, _, npz = test_predict.tiny_model(tmp_path.parent / "inference")
    flags = [f"--config.{k}={v}" for k, v in train_fixtures.overrides(tmp_path).items()]
    flags += [f"--config.codec.vqvae={cfg.codec.vqvae}", f"--config.seq_len={cfg.seq_len}"]
    flags += [f"--checkpoint={npz}", "--tile=256", "--overlap=0", "--bands=3,2,1"]
    out = tmp_path / "out"
    argv = ["predict", "--config", str(train_fixtures.TINY_CONFIG), *flags]
    assert predict.main([*argv, str(scene_file[0]), "--out", str(out)]) == 0
    record = json.loads((out / "predictions.jsonl").read_text())
    assert record["tiles"] == 12 and record["predicted_tiles"] == 12
    with rasterio.open(out / record["mask"]) as mask:
        assert mask.crs.to_epsg() == 32633 and (mask.height, mask.width) == (HEIGHT, WIDTH)
        assert set(np.unique(mask.read(1)).tolist()) <= {0, 1, tiling.NODATA}
    assert (out / "scene.geojson").exists() and (out / "scene_preview.png").exists()
