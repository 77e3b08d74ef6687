"""data.prepare.prepare_data regenerates tiles and reconverts when they were made with other settings."""

import dataclasses
import importlib.util
import json
import pathlib

from conftest import REPO_ROOT

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
