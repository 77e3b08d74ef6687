"""Tiled prediction over a synthetic GeoTIFF scene with an oracle model (the tiles' true suffixes):
the stitched mask reaches the codec's per-tile ceiling, keeps the CRS and transform, and its
polygons rasterise back to it. Training tiles cut from the scene (mask raster or GeoJSON labels)
round-trip through `data.convert` to suffixes that decode to the tiles' masks."""

import json
import sys

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio import features
from rasterio.transform import Affine

from paligemma_seg.data import scene_tiles, scenes
from paligemma_seg.data.convert import __main__ as convert_cli
from paligemma_seg.data.convert import load_codec
from paligemma_seg.data.synthetic import render_tile
from paligemma_seg.infer import scene_outputs, tiling
from paligemma_seg.segtokens import codec as codec_lib

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

    lonlat = str(tmp_path / "scene_4326.geojson")  # predict --geojson_crs EPSG:4326
    scene_outputs.write_geojson(mask_path, lonlat, wgs84=True)
    assert "crs" not in json.load(open(lonlat))
    shapes = [(g, 1) for g in scene_tiles.read_geometries(lonlat, rasterio.CRS.from_epsg(32633))]
    back = features.rasterize(shapes, out_shape=(HEIGHT, WIDTH), transform=TRANSFORM)
    assert codec_lib.iou(back == 1, mask == 1) >= 0.99


def test_scene_reader_rejects_missing_band(scene_file):
    with pytest.raises(ValueError, match="has 3 band.*band 4"):
        scenes.open_scene(scene_file[0], scenes.Radiometry(bands=(4, 3, 2)))


def test_uint16_bands_scale_stretch_and_nodata(scene_file, tmp_path):
    """A 4-band uint16 scene whose bands 4, 3, 2 hold the RGB image as 1000 + 10 * value (band 1
    noise, nodata 0 in the border): --bands 4,3,2 with --scale 1000,3550 or --stretch 0,100
    gives the RGB image back; nodata pixels stay invalid and black."""
    path, _, valid = scene_file
    with rasterio.open(path) as source:
        rgb, profile = source.read(), source.profile
    rgb[:, BORDER, BORDER : BORDER + 2] = [[0, 255]] * 3  # the stretch's 0 and 100 percentiles
    reflectance = np.zeros((4, HEIGHT, WIDTH), np.uint16)
    reflectance[0] = np.random.default_rng(0).integers(1, 60000, (HEIGHT, WIDTH))
    reflectance[1:] = 1000 + 10 * rgb[::-1].astype(np.uint16)  # bands 2, 3, 4 = B, G, R
    reflectance[:, ~valid] = 0
    scene = tmp_path / "uint16.tif"
    with rasterio.open(scene, "w", **(profile | {"count": 4, "dtype": "uint16"})) as dataset:
        dataset.write(reflectance)
    expected = np.moveaxis(rgb, 0, -1)
    for radiometry in (
        scenes.Radiometry(bands=(4, 3, 2), scale=(1000.0, 3550.0)),
        scenes.Radiometry(bands=(4, 3, 2), stretch=(0.0, 100.0)),
    ):
        with scenes.open_scene(scene, radiometry) as opened:
            pixels, inside = opened.read_window(0, 0, HEIGHT, WIDTH)
        np.testing.assert_array_equal(inside, valid)
        np.testing.assert_array_equal(pixels[valid], expected[valid])
        assert not pixels[~valid].any()
    with scenes.open_scene(scene, scenes.Radiometry(bands=(4, 3, 2))) as opened:  # 2-98 default
        pixels, _ = opened.read_window(0, 0, HEIGHT, WIDTH)
    assert pixels[valid].min() == 0 and pixels[valid].max() == 255


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
    assert (out / "scene_preview.png").exists()
    with rasterio.open(out / record["mask"]) as mask:
        water = mask.read(1) == 1
    shapes = [
        (f["geometry"], 1) for f in json.loads((out / "scene.geojson").read_text())["features"]
    ]
    back = features.rasterize(shapes, out_shape=water.shape, transform=TRANSFORM) if shapes else 0
    assert codec_lib.iou(np.asarray(back) == 1, water) >= 0.99


@pytest.fixture(scope="module")
def cut_scene(scene_file, tmp_path_factory):
    """The scene with its right tile column (cols >= 768) nodata, and its mask GeoTIFF (0/1, 255
    nodata where the scene is)."""
    path, truth, valid = scene_file
    folder = tmp_path_factory.mktemp("cut")
    valid = valid.copy()
    valid[:, 3 * SIDE :] = False
    with rasterio.open(path) as source:
        profile, image = source.profile, source.read()
    image[:, ~valid] = 0
    scene = folder / "cut.tif"
    with rasterio.open(scene, "w", **profile) as dataset:
        dataset.write(image)
    mask = folder / "cut_mask.tif"
    with rasterio.open(mask, "w", **(profile | {"count": 1, "nodata": 255})) as dataset:
        dataset.write(np.where(valid, truth, 255).astype(np.uint8)[None])
    return scene, mask, truth & valid


def _tile_origin(name: str) -> tuple[int, int]:
    row, col = name.rsplit("_", 2)[1:]
    return int(row[1:]), int(col[1:])


def test_scene_tiles_round_trip_through_convert(cut_scene, tmp_path):
    scene, mask, water = cut_scene
    out = tmp_path / "jsonl"
    argv = ["--scene", str(scene), "--scene-mask", str(mask), "--tile", "256", "--stride", "256"]
    assert convert_cli.main([*argv, "--workers", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {k: report["settings"]["scene"][k] for k in ("tiles", "nodata_tiles", "cut_tiles")} == {
        "tiles": 12,
        "nodata_tiles": 3,
        "cut_tiles": 9,
    }
    assert report["splits"]["train"]["examples"] == 9 and report["counts"]["left_out"] == 0
    codec = load_codec()
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    ceilings = {e["image"]: e["ceiling_iou"] for e in report["images"]}
    for line in lines:
        name = line["image"].rsplit("/", 1)[-1]
        row, col = _tile_origin(name[: -len(".png")])
        truth = water[row : row + SIDE, col : col + SIDE]
        cut = np.asarray(Image.open(out / line["mask"])) > 127
        np.testing.assert_array_equal(cut, truth)  # nodata pixels are not water
        decoded = codec.decode(line["suffix"], SIDE, SIDE).mask
        assert codec_lib.iou(decoded, truth) == pytest.approx(ceilings[name], abs=1e-5)
        assert codec_lib.iou(decoded, truth) >= codec.ceiling_iou(truth) - 1e-5
    # A rerun replaces the tiles and the JSONL (same result).
    assert convert_cli.main([*argv, "--workers", "1", "--no-ceiling", "--out", str(out)]) == 0
    again = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [a["suffix"] for a in again] == [a["suffix"] for a in lines]


def _polygons(water: np.ndarray, crs: str | None) -> dict:
    shapes = features.shapes(water.astype(np.uint8), mask=water, transform=TRANSFORM)
    items = [{"type": "Feature", "properties": {}, "geometry": g} for g, _ in shapes]
    collection = {"type": "FeatureCollection", "features": items}
    if crs is None:  # RFC 7946: lon/lat
        from rasterio import warp

        for item in items:
            item["geometry"] = warp.transform_geom("EPSG:32633", "EPSG:4326", item["geometry"])
    else:
        collection["crs"] = {"type": "name", "properties": {"name": crs}}
    return collection


def test_scene_labels_geojson_gives_the_mask_raster_tiles(cut_scene, tmp_path):
    scene, mask, water = cut_scene
    from_mask = scene_tiles.cut_tiles(
        scene, tmp_path / "a", scene_tiles.TileSpec(mask=mask, tile=256)
    )
    for crs in ("EPSG:32633", None):
        labels = tmp_path / f"labels_{crs is None}.geojson"
        labels.write_text(json.dumps(_polygons(water, crs)))
        cut = scene_tiles.cut_tiles(
            scene, tmp_path / str(crs), scene_tiles.TileSpec(labels=labels, tile=256)
        )
        assert cut.names == from_mask.names and cut.nodata_tiles == 3
        for name in cut.names:
            a = np.asarray(Image.open(from_mask.masks / f"{name}.png")) > 0
            b = np.asarray(Image.open(cut.masks / f"{name}.png")) > 0
            if crs is not None:  # the same grid: exactly the same pixels
                np.testing.assert_array_equal(a, b)
            elif a.any():  # reprojected vertices: nearly
                assert codec_lib.iou(a, b) >= 0.99


def test_scene_tiles_without_rasterio_say_how_to_install(cut_scene, tmp_path, monkeypatch, capsys):
    scene, mask, _ = cut_scene
    monkeypatch.setitem(sys.modules, "rasterio", None)
    argv = ["--scene", str(scene), "--scene-mask", str(mask), "--out", str(tmp_path)]
    assert convert_cli.main(argv) == 2
    assert 'pip install -e ".[geo]"' in capsys.readouterr().err
