"""Multi-class conversion: COCO instance JSON (polygons, RLE, crowd, every bad annotation) and
class-id masks, checked against pycocotools' own decoding and hand-made index masks; the COCO path
gives the binary path's suffixes and ceiling on the same masks."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from paligemma_seg.data import classes as classes_lib
from paligemma_seg.data import convert as convert_lib
from paligemma_seg.data import images as image_io
from paligemma_seg.data.convert import __main__ as convert_cli
from paligemma_seg.segtokens import codec as codec_lib

H, W = 60, 80


@pytest.fixture(scope="module")
def mask_codec():
    """The shipped VQ-VAE, own-part crops (COCO instances are their own masks)."""
    return convert_lib.load_codec(crop_others=False)


def _jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with 0s."""
    flat = mask.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _coco_fixture(root: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """Two images, two categories; good annotations of every form plus one of each bad kind."""
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(images / name)
    lake = np.zeros((H, W), bool)
    lake[10:30, 5:25] = True
    road = np.zeros((H, W), bool)
    road[40:44, :] = True
    blob = np.zeros((H, W), bool)
    blob[5:20, 50:70] = True
    crowd = np.zeros((H, W), bool)
    crowd[45:60, 60:80] = True
    annotations = [
        # a.png: a polygon lake (rectangle 20 x 20), an RLE road, an uncompressed-RLE blob (water)
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[5, 10, 25, 10, 25, 30, 5, 30]]},
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": _rle(road)},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": _uncompressed_rle(blob)},
        {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": _uncompressed_rle(crowd)},
        # the bad ones
        {"id": 10, "image_id": 99, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        {"id": 11, "image_id": 1, "category_id": 7, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        {"id": 12, "image_id": 2, "category_id": 1,
         "segmentation": [[200, 200, 240, 200, 240, 260]]},
        {"id": 13, "image_id": 2, "category_id": 1, "segmentation": [[3, 3, 9, 3, 15, 3]]},
        {"id": 14, "image_id": 2, "category_id": 2, "bbox": [1, 1, 5, 5]},
        {"id": 15, "image_id": 3, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]},
    ]  # fmt: skip
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
            {"id": 3, "file_name": "missing.png", "height": H, "width": W},
        ],
        "categories": [{"id": 1, "name": "water"}, {"id": 2, "name": "road"}],
        "annotations": annotations,
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path, {"lake": lake, "road": road, "blob": blob, "crowd": crowd}


def test_coco_conversion_matches_pycocotools(tmp_path, mask_codec):
    path, shapes = _coco_fixture(tmp_path)
    out = tmp_path / "out"
    report = convert_lib.convert_coco(path, tmp_path / "images", out, codec=mask_codec, workers=1)
    coco = COCO(str(path))
    rows = {pathlib.Path(r["image"]).name: r for r in _jsonl(out / "all.jsonl")}
    assert sorted(rows) == ["a.png", "b.png"]  # missing.png: a problem, not a line
    row = rows["a.png"]
    assert row["prefix"] == "segment water ; road" and row["classes"] == ["water", "road"]
    # The index mask: what pycocotools decodes, each non-crowd annotation at its class's value,
    # crowd pixels IGNORE.
    index = classes_lib.read_index_mask(out / row["mask"])
    expected = np.zeros((H, W), np.uint8)
    expected[coco.annToMask(coco.anns[4]).astype(bool)] = classes_lib.IGNORE
    for ann_id, value in ((1, 1), (3, 1), (2, 2)):
        expected[coco.annToMask(coco.anns[ann_id]).astype(bool)] = value
    np.testing.assert_array_equal(index, expected)
    # pycocotools' masks are ours (the polygon rasterises to the 20 x 20 rectangle, the RLEs back).
    assert coco.annToMask(coco.anns[2]).astype(bool).tolist() == shapes["road"].tolist()
    assert coco.annToMask(coco.anns[3]).astype(bool).tolist() == shapes["blob"].tolist()
    polygon = coco.annToMask(coco.anns[1]).astype(bool)
    assert abs(int(polygon.sum()) - 400) <= 45  # pycocotools' edge rule on a 20 x 20 square
    # Objects: water (the polygon lake ~400 px, then the blob 300 px), then road; each box the tight box of
    # pycocotools' mask, labels from the categories.
    parsed = codec_lib.parse_suffix(row["suffix"])
    assert [o.label for o in parsed] == ["water", "water", "road"]
    masks = [coco.annToMask(coco.anns[i]).astype(bool) for i in (1, 3, 2)]
    for obj, mask in zip(parsed, masks, strict=True):
        rows_, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = codec_lib.locs_to_box(np.asarray(obj.locs), H, W)
        assert box.tolist() == [rows_[0], cols[0], rows_[-1] + 1, cols[-1] + 1]
    # The codes are the VQ-VAE's for each instance's own crop.
    crops = np.stack([codec_lib.resize_crop(m[b[0] : b[2], b[1] : b[3]]) for m, b in zip(
        masks, [codec_lib.locs_to_box(np.asarray(o.locs), H, W) for o in parsed], strict=True
    )])[..., None]  # fmt: skip
    codes = mask_codec.vqvae.encode(crops)
    assert [list(o.codes) for o in parsed] == codes.tolist()
    # Every bad annotation is reported with its reason; none is silent.
    reasons = {a["annotation"]: a["reason"] for e in report["images"]
               for a in e.get("dropped_annotations", []) if "reason" in a}  # fmt: skip
    reasons |= {a["annotation"]: a["reason"] for a in report["unmatched_annotations"]}
    assert "not in 'images'" in reasons[10]
    assert "unknown category id 7" in reasons[11]
    assert "outside its image" in reasons[12]
    assert "zero area" in reasons[13]
    assert "box-only" in reasons[14]
    assert set(reasons) == {10, 11, 12, 13, 14}
    entries = {e["image"]: e for e in report["images"]}
    assert entries["missing.png"]["problem"].startswith("missing image")
    assert entries["a.png"]["classes"]["water"]["objects"] == 2
    assert entries["a.png"]["classes"]["road"]["objects"] == 1
    assert report["counts"]["dropped_annotations"] == 5
    assert report["classes"]["water"]["objects"] == 2 and report["classes"]["road"]["images"] == 1
    assert 0.5 < report["classes"]["road"]["ceiling_miou"] <= 1.0


def test_coco_path_equals_binary_path(water_dir, tmp_path, mask_codec):
    """Each connected part of a water mask as one RLE annotation: same suffixes, same ceiling."""
    names = sorted(p.name for p in (water_dir / "images").iterdir())[:12]
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    records, annotations = [], []
    structure = ndimage.generate_binary_structure(2, 2)
    for ident, name in enumerate(names, start=1):
        (images / name).symlink_to(water_dir / "images" / name)
        (masks / name).symlink_to(water_dir / "masks" / name)
        truth = codec_lib.reference_mask(image_io.read_mask(water_dir / "masks" / name).pixels)
        records.append({"id": ident, "file_name": name, "height": truth.shape[0],
                        "width": truth.shape[1]})  # fmt: skip
        labels, count = ndimage.label(truth, structure)
        for part in range(1, count + 1):
            annotations.append({"id": len(annotations) + 1, "image_id": ident, "category_id": 1,
                                "iscrowd": 0, "segmentation": _rle(labels == part)})  # fmt: skip
    coco_file = tmp_path / "water.json"
    coco_file.write_text(json.dumps({"images": records, "annotations": annotations,
                                     "categories": [{"id": 1, "name": "water"}]}))  # fmt: skip
    binary = convert_lib.convert(images, masks, tmp_path / "bin", codec=mask_codec, workers=2)
    instances = convert_lib.convert_coco(coco_file, images, tmp_path / "coco", codec=mask_codec)
    by_binary = {pathlib.Path(r["image"]).name: r for r in _jsonl(tmp_path / "bin/all.jsonl")}
    by_coco = {pathlib.Path(r["image"]).name: r for r in _jsonl(tmp_path / "coco/all.jsonl")}
    assert sorted(by_binary) == sorted(by_coco) == names
    for name in names:
        assert by_coco[name]["suffix"] == by_binary[name]["suffix"], name
    assert instances["ceiling_miou"] == pytest.approx(binary["ceiling_miou"], abs=1e-6)


def test_class_id_masks(tmp_path, mask_codec):
    """Palette class-id masks with --classes: labelled parts, index masks, unknown values noted."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    ids = np.zeros((H, W), np.uint8)
    ids[5:25, 5:30] = 1  # water
    ids[40:50, 10:20] = 2  # building
    ids[40:50, 40:50] = 2  # a second building
    ids[0:3, 70:80] = 7  # not a class: noted, read as background
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([0, 0, 0, 0, 0, 255, 200, 0, 0] + [0] * 759)
    rng = np.random.default_rng(1)
    for name in ("x", "y"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(images / f"{name}.jpg")
        palette.save(masks / f"{name}.png")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(masks / "y.png")  # size mismatch
    out = tmp_path / "out"
    code = convert_cli.main([
        "--images", str(images), "--masks", str(masks), "--classes", "1=water,2=building",
        "--out", str(out), "--workers", "1", "--codec", "checkpoints/vqvae_small.npz",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    [row] = _jsonl(out / "all.jsonl")
    assert row["prefix"] == "segment water ; building"
    parsed = codec_lib.parse_suffix(row["suffix"])
    assert [o.label for o in parsed] == ["water", "building", "building"]
    index = classes_lib.read_index_mask(out / row["mask"])
    expected = np.where(ids == 1, 1, np.where(ids == 2, 2, 0))
    np.testing.assert_array_equal(index, expected)
    entries = {e["image"]: e for e in report["images"]}
    assert any("mask value 7 is not in the classes (30 px" in n for n in entries["x.jpg"]["notes"])
    assert entries["y.jpg"]["problem"].startswith("size mismatch")
    assert entries["x.jpg"]["classes"]["building"]["objects"] == 2
    assert report["classes"]["water"]["ceiling_miou"] > 0.5
    assert report["settings"]["classes"] == {"1": "water", "2": "building"}


def test_bad_class_lists_and_json(tmp_path):
    assert classes_lib.parse_classes("1=water, 2=building").labels == ("water", "building")
    file = tmp_path / "classes.json"
    file.write_text(json.dumps(["background", "water", "road"]))
    assert classes_lib.parse_classes(str(file)).to_dict() == {"1": "water", "2": "road"}
    for text, message in (
        ("1=water,1=road", "appear twice"),
        ("water", "not VALUE=LABEL"),
        ("1=wa;ter", "can't be used"),
        ("x=water", "not an integer"),
    ):
        with pytest.raises(ValueError, match=message):
            classes_lib.parse_classes(text)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(ValueError, match=r"broken.json:2:\d+: not valid JSON"):
        convert_lib.convert_coco(broken, tmp_path, tmp_path / "o")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'annotations'"):
        convert_lib.convert_coco(wrong, tmp_path, tmp_path / "o")
