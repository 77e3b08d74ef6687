"""data.prepare.prepare_data regenerates tiles and reconverts when they were made with other settings."""

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from paligemma_seg import experiment
from paligemma_seg.data import prepare, synthetic


def _tiny_config():
    spec = importlib.util.spec_from_file_location("water_tiny", REPO_ROOT / "configs/water_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.codec.vqvae = str(REPO_ROOT / cfg.codec.vqvae)
    return cfg


def test_stale_conversion_detects_changed_codec_settings(tmp_path):
    cfg = _tiny_config()
    cfg.data.jsonl_dir = str(tmp_path)
    codec = experiment.load_codec(cfg)
    assert prepare._stale_conversion(cfg, codec) == ""  # no report: JSONL from elsewhere

    settings = {
        "images": str(pathlib.Path(cfg.data.images).resolve()),
        "masks": str(pathlib.Path(cfg.data.masks).resolve()),
        "prefix": cfg.data.prefix,
        "codec": dataclasses.asdict(codec.config),
    }
    (tmp_path / "report.json").write_text(json.dumps({"settings": settings}))
    assert prepare._stale_conversion(cfg, codec) == ""

    settings["codec"]["max_objects"] += 1
    settings["prefix"] = "segment lake"
    (tmp_path / "report.json").write_text(json.dumps({"settings": settings}))
    assert prepare._stale_conversion(cfg, codec) == "settings changed: prefix, codec"


def test_prepare_data_regenerates_tiles_made_with_other_settings(tmp_path):
    cfg = _tiny_config()
    cfg.data.synthetic.num_images, cfg.data.synthetic.size = 20, 32
    cfg.data.images, cfg.data.masks = str(tmp_path / "syn/images"), str(tmp_path / "syn/masks")
    cfg.data.splits.train = str(tmp_path / "syn/train_images.txt")
    cfg.data.splits.test = str(tmp_path / "syn/test_images.txt")
    cfg.data.jsonl_dir = str(tmp_path / "jsonl")
    assert "does not exist" in prepare._synthetic_to_generate(cfg)
    paths = prepare.prepare_data(cfg, ("train", "test"))
    assert prepare._synthetic_to_generate(cfg) == ""
    assert len(pathlib.Path(paths["test"]).read_text().splitlines()) == 2

    cfg.data.synthetic.num_images = 30  # more tiles: regenerate and reconvert
    assert "the config asks for" in prepare._synthetic_to_generate(cfg)
    paths = prepare.prepare_data(cfg, ("train", "test"))
    assert len(pathlib.Path(paths["test"]).read_text().splitlines()) == 3
    assert synthetic.read_manifest(tmp_path / "syn")["num_images"] == 30

    (tmp_path / "syn" / synthetic.MANIFEST).unlink()  # a folder made elsewhere is used as it is
    cfg.data.synthetic.num_images = 40
    assert prepare._synthetic_to_generate(cfg) == ""


def _synthetic_config(tmp_path, num_images=20):
    cfg = _tiny_config()
    cfg.tokenizer = str(REPO_ROOT / cfg.tokenizer)
    cfg.data.synthetic.num_images, cfg.data.synthetic.size = num_images, 32
    cfg.data.images, cfg.data.masks = str(tmp_path / "syn/images"), str(tmp_path / "syn/masks")
    cfg.data.splits.train = str(tmp_path / "syn/train_images.txt")
    cfg.data.splits.test = str(tmp_path / "syn/test_images.txt")
    cfg.data.jsonl_dir = str(tmp_path / "jsonl")
    return cfg


def _sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_prepare_data_refuses_jsonl_made_with_another_vqvae(tmp_path):
    """report.json records the VQ-VAE (and tokenizer) by content; another VQ-VAE is an error naming
    both files and the fix, other settings still reconvert, JSONL with no recorded VQ-VAE is used."""
    cfg = _synthetic_config(tmp_path)
    used = cfg.codec.vqvae
    paths = prepare.prepare_data(cfg, ("train", "test"))
    report_path = tmp_path / "jsonl" / "report.json"
    settings = json.loads(report_path.read_text())["settings"]
    assert settings["vqvae"] == {"path": used, "sha256": _sha256(used)}
    assert settings["tokenizer"] == {"path": cfg.tokenizer, "sha256": _sha256(cfg.tokenizer)}
    before = {split: pathlib.Path(p).read_bytes() for split, p in paths.items()}

    with np.load(used) as data:  # the same architecture and settings, other codes
        arrays = {k: data[k] for k in data.files}
    first = sorted(arrays)[0]
    arrays[first] = arrays[first] + 1.0
    other = tmp_path / "other_vqvae.npz"
    np.savez(other, **arrays)
    cfg.codec.vqvae = str(other)
    with pytest.raises(ValueError) as error:
        prepare.prepare_data(cfg, ("train", "test"))
    message = str(error.value)
    assert "\n" not in message
    assert f"made with the VQ-VAE {used} (sha256 {_sha256(used)[:12]})" in message
    assert f"codec.vqvae is {other} (sha256 {_sha256(other)[:12]})" in message
    assert "reconvert into another data.jsonl_dir" in message
    assert f"--config.codec.vqvae={used}" in message
    assert {s: pathlib.Path(p).read_bytes() for s, p in paths.items()} == before  # untouched

    cfg.data.jsonl_dir = str(tmp_path / "jsonl_other")  # the fix: another folder
    prepare.prepare_data(cfg, ("train", "test"))
    report = json.loads((tmp_path / "jsonl_other" / "report.json").read_text())
    assert report["settings"]["vqvae"]["sha256"] == _sha256(other)

    cfg.data.jsonl_dir, cfg.codec.vqvae = str(tmp_path / "jsonl"), used  # the other fix
    cfg.data.prefix = "segment lake"  # other settings: reconverted as before
    paths = prepare.prepare_data(cfg, ("train", "test"))
    assert json.loads(pathlib.Path(paths["test"]).read_text().splitlines()[0])["prefix"] == (
        "segment lake"
    )

    report = json.loads(report_path.read_text())
    report["settings"]["vqvae"] = None  # converted by the API with only a codec object: trusted
    report_path.write_text(json.dumps(report))
    cfg.codec.vqvae = str(other)
    after = {split: pathlib.Path(p).read_bytes() for split, p in paths.items()}
    assert prepare.prepare_data(cfg, ("train", "test")) == paths
    assert {s: pathlib.Path(p).read_bytes() for s, p in paths.items()} == after


def test_a_vqvae_changed_in_place_is_refused(tmp_path):
    cfg = _synthetic_config(tmp_path, num_images=10)
    cfg.codec.vqvae = str(tmp_path / "vqvae.npz")
    shutil.copy(_tiny_config().codec.vqvae, cfg.codec.vqvae)
    prepare.prepare_data(cfg, ("train",))
    with open(cfg.codec.vqvae, "ab") as f:  # retrained / replaced: same path, other bytes
        f.write(b"\0")
    with pytest.raises(ValueError, match="the file changed since"):
        prepare.prepare_data(cfg, ("train",))


def test_data_resize_writes_resized_copies_and_reconverts_when_asked(tmp_path):
    cfg = _synthetic_config(tmp_path)
    paths = prepare.prepare_data(cfg, ("train", "test"))
    row = json.loads(pathlib.Path(paths["test"]).read_text().splitlines()[0])
    assert "resized" not in row  # data.resize = 0 (the default): no copies

    cfg.data.resize = 24  # asked now: the conversion without copies is stale
    codec = experiment.load_codec(cfg)
    assert prepare._stale_conversion(cfg, codec) == "settings changed: resize"
    paths = prepare.prepare_data(cfg, ("train", "test"))
    assert prepare._stale_conversion(cfg, codec) == ""
    jsonl_dir = pathlib.Path(cfg.data.jsonl_dir)
    for line in pathlib.Path(paths["train"]).read_text().splitlines():
        row = json.loads(line)
        with (
            Image.open(jsonl_dir / row["resized"]["24"]) as copy,
            Image.open(jsonl_dir / row["image"]) as full,
        ):
            assert copy.size == (24, 24) and full.size == (32, 32)

    cfg.data.resize = 0  # copies no longer asked: the conversion with them still serves
    assert prepare._stale_conversion(cfg, codec) == ""
