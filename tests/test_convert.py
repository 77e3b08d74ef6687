"""Convert CLI: the shared water data, every bad-pair case, splits, determinism and atomicity."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from train_fixtures import TOKENIZER

from paligemma_seg.data import convert as convert_lib
from paligemma_seg.data import images as image_io
from paligemma_seg.data import synthetic
from paligemma_seg.data.convert import __main__ as convert_cli
from paligemma_seg.segtokens import codec as codec_lib
from paligemma_seg.segtokens import vqvae
from paligemma_seg.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def mask_codec(tmp_path_factory):
    """A VQ-VAE with random weights: suffix format and counts do not depend on its quality."""
    rng = np.random.default_rng(0)
    state = {
        key: (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32)
        for key, shape in vqvae.expected_shapes().items()
    }
    path = tmp_path_factory.mktemp("codec") / "vq_random.npz"
    np.savez(path, **state)
    return convert_lib.load_codec(path)


def _jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _entries(report: dict) -> dict[str, dict]:
    return {e["image"]: e for e in report["images"]}


def test_convert_water_data(water_dir, tmp_path, mask_codec):
    splits = {"train": water_dir / "train_images.txt", "test": water_dir / "test_images.txt"}
    report = convert_lib.convert(
        water_dir / "images", water_dir / "masks", tmp_path, splits, codec=mask_codec, workers=2
    )
    assert report["counts"]["pairs"] == 185 and report["counts"]["written"] == 185
    assert (
        report["splits"]["train"]["examples"] == 164 and report["splits"]["test"]["examples"] == 21
    )
    assert report["problems"] == {} and len(report["images"]) == 185
    assert 0.0 < report["ceiling_miou"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text()) == report
    test_rows = _jsonl(tmp_path / "test.jsonl")
    assert len(test_rows) == 21 and len(_jsonl(tmp_path / "train.jsonl")) == 164
    listed = (water_dir / "test_images.txt").read_text().split()
    assert [pathlib.Path(r["image"]).name for r in test_rows] == listed
    entries = _entries(report)
    for row in test_rows[:4]:  # batched conversion == the codec's own one-mask path
        image, mask = (tmp_path / row["image"]).resolve(), (tmp_path / row["mask"]).resolve()
        assert image.is_file() and row["prefix"] == "segment water"
        grey = image_io.read_mask(mask).pixels
        assert row["suffix"] == mask_codec.encode(grey).suffix
        assert entries[image.name]["ceiling_iou"] == pytest.approx(
            mask_codec.ceiling_iou(grey), abs=1e-6
        )
    assert not list(tmp_path.glob(".convert-*"))


def _save(path: pathlib.Path, array: np.ndarray, **kwargs) -> None:
    Image.fromarray(array).save(path, **kwargs)


def _bad_pairs(root: pathlib.Path) -> pathlib.Path:
    """A folder with one file per case; masks hold a 10x12 block of water."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    rgb = (rng.random((32, 40, 3)) * 255).astype(np.uint8)
    water = np.zeros((32, 40), np.uint8)
    water[5:15, 8:20] = 255
    for name in [
        "good",
        "cmyk",
        "rgba",
        "grey",
        "pngdata",
        "truncated",
        "text",
        "mismatch",
        "badmask",
    ]:
        _save(masks / f"{name}.jpg", water)
    _save(images / "good.jpg", rgb)
    Image.fromarray(rgb).convert("CMYK").save(images / "cmyk.jpg")
    _save(images / "rgba.png", np.dstack([rgb, np.full((32, 40), 255, np.uint8)]))
    _save(masks / "rgba.png", water)
    _save(images / "grey.jpg", rgb[..., 0])
    _save(images / "pngdata.jpg", rgb, format="PNG")
    _save(images / "truncated.jpg", rgb)
    data = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (images / "text.jpg").write_text("this is not an image\n")
    _save(images / "mismatch.jpg", rgb[:31])
    _save(images / "badmask.jpg", rgb)
    (masks / "badmask.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    _save(images / "nomask.jpg", rgb)
    _save(images / "allwater.jpg", rgb)
    _save(masks / "allwater.png", np.full((32, 40), 255, np.uint8))
    _save(images / "empty.jpg", rgb)
    _save(masks / "empty.png", np.zeros((32, 40), np.uint8))
    _save(images / "ones.jpg", rgb)
    _save(masks / "ones.png", (water > 0).astype(np.uint8))  # 0/1 mask
    (images / "notes.txt").write_text("not an image")
    _save(masks / "orphan.png", water)
    return root


def test_convert_bad_pairs_are_reported_not_fatal(tmp_path, mask_codec):
    data = _bad_pairs(tmp_path / "data")
    out = tmp_path / "out"
    report = convert_lib.convert(data / "images", data / "masks", out, codec=mask_codec, workers=1)
    entries = _entries(report)
    problems = {name: (e["problem"] or "").split(":")[0] for name, e in entries.items()}
    assert problems == {
        "allwater.jpg": "suspicious mask",
        "badmask.jpg": "unreadable mask",
        "cmyk.jpg": "",
        "empty.jpg": "",
        "good.jpg": "",
        "grey.jpg": "",
        "mismatch.jpg": "size mismatch",
        "nomask.jpg": "missing mask",
        "ones.jpg": "",
        "pngdata.jpg": "",
        "rgba.png": "",
        "text.jpg": "unreadable image",
        "truncated.jpg": "unreadable image",
    }
    assert "truncated" in entries["truncated.jpg"]["problem"]
    assert "not an image" in entries["text.jpg"]["problem"]
    assert "image 31x40 (HxW), mask 32x40" in entries["mismatch.jpg"]["problem"]
    assert entries["allwater.jpg"]["suspicious"] == "all water"
    assert report["counts"]["written"] == 7 and report["counts"]["left_out"] == 6
    assert report["problems"]["unreadable image"] == 2
    ignored = {pathlib.Path(i["file"]).name: i["reason"] for i in report["ignored"]}
    assert ignored == {"notes.txt": "not an image file", "orphan.png": "mask without an image"}
    assert entries["empty.jpg"]["objects"] == 0 and entries["empty.jpg"]["ceiling_iou"] == 1.0
    assert entries["ones.jpg"]["objects"] == 1  # 0/1 mask scaled, not read as empty
    assert "mask: mask values 0/1 scaled to 0/255" in entries["ones.jpg"]["notes"]
    rows = {pathlib.Path(r["mask"]).stem: r for r in _jsonl(out / "all.jsonl")}
    assert rows["empty"]["suffix"] == "" and rows["good"]["suffix"].endswith(" water")
    assert rows["good"]["suffix"] == rows["grey"]["suffix"] == rows["cmyk"]["suffix"]
    for name in ("cmyk.jpg", "rgba.png", "pngdata.jpg"):  # converted to plain RGB PNGs
        copy = out / rows[name.split(".")[0]]["image"]
        assert copy.name == f"{name}.png" and copy.parent.name == "converted_images"
        loaded = image_io.read_image(copy)
        assert (loaded.format, loaded.mode) == ("PNG", "RGB")
        original = image_io.read_image(data / "images" / name).pixels
        np.testing.assert_array_equal(loaded.pixels, original)
    assert report["counts"]["converted_images"] == 3
    assert (out / rows["good"]["image"]).resolve() == data / "images" / "good.jpg"
    kept = convert_lib.convert(
        data / "images",
        data / "masks",
        tmp_path / "kept",
        codec=mask_codec,
        workers=1,
        keep_suspicious=True,
        ceiling=False,
    )
    assert _entries(kept)["allwater.jpg"]["problem"] is None
    assert kept["counts"]["suspicious_kept"] == 1 and kept["ceiling_miou"] is None


def test_convert_splits_and_listing_errors(tmp_path, mask_codec):
    data = tmp_path / "data"
    synthetic.generate(data, num_images=4, size=32, seed=0)
    (data / "a.txt").write_text("# comment\nsynth_00000.jpg\n\nsynth_00001\nsynth_00042.jpg\n")
    (data / "b.txt").write_text("synth_00002.jpg\n")
    report = convert_lib.convert(
        data / "images",
        data / "masks",
        tmp_path / "out",
        {"a": data / "a.txt", "b": data / "b.txt"},
        codec=mask_codec,
        workers=1,
    )
    missing = _entries(report)["synth_00042.jpg"]["problem"]
    assert missing.startswith("missing image") and "a.txt:5" in missing
    assert report["splits"]["a"]["examples"] == 2 and report["splits"]["b"]["examples"] == 1
    assert report["counts"]["images_in_no_split"] == 1
    (data / "b.txt").write_text("synth_00003.jpg\nsynth_00001.jpg\n")
    with pytest.raises(
        ValueError, match=r"b.txt:2: synth_00001.jpg is already listed at .*a.txt:4"
    ):
        convert_lib.convert(
            data / "images",
            data / "masks",
            tmp_path / "o2",
            {"a": data / "a.txt", "b": data / "b.txt"},
            codec=mask_codec,
        )
    with pytest.raises(ValueError, match="no such folder"):
        convert_lib.convert(data / "nope", data / "masks", tmp_path / "o3", codec=mask_codec)


def _outputs(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_convert_is_deterministic_and_rerunnable(tmp_path, mask_codec):
    data = tmp_path / "data"
    synthetic.generate(data, num_images=12, size=48, seed=1)
    splits = {"train": data / "train_images.txt", "test": data / "test_images.txt"}
    args = (data / "images", data / "masks")
    convert_lib.convert(*args, tmp_path / "one", splits, codec=mask_codec, workers=1)
    convert_lib.convert(*args, tmp_path / "two", splits, codec=mask_codec, workers=2)
    first = _outputs(tmp_path / "one")
    assert set(first) == {"train.jsonl", "test.jsonl", "report.json"}
    assert first == _outputs(tmp_path / "two")
    convert_lib.convert(*args, tmp_path / "one", splits, codec=mask_codec, workers=1)
    assert _outputs(tmp_path / "one") == first


class _FailingVQVAE:
    """Encodes the first batch, then fails, as an interrupted run would."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def encode(self, crops):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("interrupted")
        return self.real.encode(crops)

    def decode(self, codes):
        return self.real.decode(codes)


def test_convert_is_atomic(tmp_path, mask_codec, monkeypatch):
    data = tmp_path / "data"
    synthetic.generate(data, num_images=10, size=32, seed=2)
    splits = {"train": data / "train_images.txt", "test": data / "test_images.txt"}
    monkeypatch.setattr(convert_lib, "ENCODE_BATCH", 2)  # several batches
    failing = codec_lib.MaskCodec(_FailingVQVAE(mask_codec.vqvae), mask_codec.config)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_lib.convert(data / "images", data / "masks", out, splits, codec=failing, workers=1)
    assert failing.vqvae.calls == 2 and list(out.iterdir()) == []  # no JSONL, no report, no temp
    convert_lib.convert(data / "images", data / "masks", out, splits, codec=mask_codec, workers=1)
    before = _outputs(out)
    failing.vqvae.calls = 0
    with pytest.raises(RuntimeError):
        convert_lib.convert(data / "images", data / "masks", out, splits, codec=failing, workers=1)
    assert _outputs(out) == before and not list(out.glob(".convert-*"))


def test_convert_cli(tmp_path, mask_codec, monkeypatch, capsys):
    data = tmp_path / "data"
    synthetic.generate(data, num_images=5, size=32, seed=3)
    monkeypatch.setattr(convert_lib, "load_codec", lambda *a, **k: mask_codec)
    code = convert_cli.main(
        [
            "--images",
            str(data / "images"),
            "--masks",
            str(data / "masks"),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "1",
            "--absolute-paths",
            "--split",
            f"train={data / 'train_images.txt'}",
        ]
    )
    assert code == 0
    assert "train.jsonl: 5 examples" in capsys.readouterr().out
    row = _jsonl(tmp_path / "out" / "train.jsonl")[0]
    assert pathlib.Path(row["image"]).is_absolute() and pathlib.Path(row["mask"]).suffix == ".png"
    with pytest.raises(SystemExit):
        convert_cli.main(["--images", "a", "--masks", "b", "--out", "c", "--split", "train"])
    assert "expected NAME=LIST_FILE" in capsys.readouterr().err
    assert convert_cli.main(["--images", str(tmp_path / "none"), "--masks", "b", "--out", "c"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_report_records_the_vqvae_and_tokenizer_files(tmp_path, mask_codec, monkeypatch, capsys):
    """report.json names the files that made (VQ-VAE) or go with (tokenizer) the data, by content
    (sha256 of the bytes), via the API and the CLI; no file given: null."""
    import hashlib

    data = tmp_path / "data"
    synthetic.generate(data, num_images=4, size=32, seed=4)
    shipped = pathlib.Path(convert_lib.__file__).resolve().parents[3] / "checkpoints"
    vqvae_file, tokenizer_file = shipped / "vqvae_small.npz", shipped / "tokenizer_small.model"

    def record(path: pathlib.Path) -> dict:
        return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    args = (data / "images", data / "masks")
    report = convert_lib.convert(*args, tmp_path / "plain", codec=mask_codec, workers=1)
    assert report["settings"]["vqvae"] is None and report["settings"]["tokenizer"] is None
    report = convert_lib.convert(
        *args, tmp_path / "api", codec=mask_codec, workers=1, vqvae_path=vqvae_file,
        tokenizer_path=tokenizer_file,
    )  # fmt: skip
    assert report["settings"]["vqvae"] == record(vqvae_file)
    assert report["settings"]["tokenizer"] == record(tokenizer_file)
    assert convert_lib.file_sha256(vqvae_file) == record(vqvae_file)["sha256"]

    monkeypatch.setattr(convert_lib, "load_codec", lambda *a, **k: mask_codec)
    flags = ["--images", str(args[0]), "--masks", str(args[1]), "--workers", "1"]
    tokenizer = ["--tokenizer", str(tokenizer_file)]
    assert convert_cli.main([*flags, "--out", str(tmp_path / "cli"), *tokenizer]) == 0
    settings = json.loads((tmp_path / "cli" / "report.json").read_text())["settings"]
    assert settings["vqvae"] == record(vqvae_file)  # the default --codec, found in the repo
    assert settings["tokenizer"] == record(tokenizer_file)
    missing = ["--tokenizer", str(tmp_path / "no.model")]
    assert convert_cli.main([*flags, "--out", str(tmp_path / "cli2"), *missing]) == 2
    assert f"tokenizer file {tmp_path / 'no.model'} not found" in capsys.readouterr().err


def test_convert_resize_writes_model_resolution_images_the_pipeline_reads(tmp_path, mask_codec):
    """--resize: each line gets `resized` {"32": "resized_32/NAME.png"}, the pixels of the training
    resize (tf.image.resize bilinear, the oracle) rounded to uint8; the pipeline feeds those at
    32 px and the original at any other size."""
    import tensorflow as tf

    from paligemma_seg.data import pipeline, preprocess

    rng = np.random.default_rng(3)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, (height, width), mode in [("a", (50, 70), "RGB"), ("b", (97, 40), "RGBA")]:
        pixels = rng.integers(0, 255, (height, width, 3 if mode == "RGB" else 4), np.uint8)
        Image.fromarray(pixels, mode).save(tmp_path / "images" / f"{name}.png")
        mask = np.zeros((height, width), np.uint8)
        mask[5:30, 10:35] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    out = tmp_path / "out"
    report = convert_lib.convert(
        tmp_path / "images", tmp_path / "masks", out, codec=mask_codec, workers=2, resize=32,
        progress=False,
    )  # fmt: skip
    assert report["settings"]["resize"] == 32 and report["counts"]["written"] == 2
    rows = _jsonl(out / "all.jsonl")
    # NAME.png, NAME the image's file name (as for the plain copies in converted_images/).
    assert [r["resized"] for r in rows] == [
        {"32": "resized_32/a.png.png"}, {"32": "resized_32/b.png.png"}
    ]  # fmt: skip
    examples = pipeline.read_jsonl(out / "all.jsonl")
    for row, example in zip(rows, examples, strict=True):
        original = image_io.read_image(out / row["image"]).pixels  # RGBA: its plain RGB copy
        stored = np.asarray(Image.open(out / row["resized"]["32"]))
        oracle = tf.image.resize(original.astype(np.float32), (32, 32), method="bilinear").numpy()
        assert stored.shape == (32, 32, 3) and stored.dtype == np.uint8
        assert np.abs(stored - oracle).max() <= 0.5 + 1e-3
        assert example.image_at(32) == str(out / row["resized"]["32"])
        assert example.image_at(64) == example.image == str(out / row["image"])
        fed = preprocess.load_image(example.image_at(32), 32)
        full = preprocess.load_image(example.image, 32)
        assert np.abs(fed - full).max() <= 0.5 / 127.5 + 1e-5
    table = pipeline.tokenize(examples, Tokenizer.load(TOKENIZER), 128, image_size=32)
    assert list(table.images) == [e.image_at(32) for e in examples]
    assert not list(out.glob(".convert-*"))


def test_resized_entry_errors_name_the_fix(tmp_path):
    from paligemma_seg.data import pipeline

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    line = {"image": "x.png", "prefix": "segment water", "suffix": "", "resized": {"224": "no.png"}}
    (tmp_path / "a.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1: resized image .*no.png not found; convert"):
        pipeline.read_jsonl(tmp_path / "a.jsonl")
