"""experiment.prepare_data reconverts when the convert report shows other settings."""

import dataclasses
import importlib.util
import json
import pathlib

from conftest import REPO_ROOT

from paligemma_seg import experiment


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
    assert experiment._stale_conversion(cfg, codec) == ""  # no report: JSONL from elsewhere

    settings = {
        "images": str(pathlib.Path(cfg.data.images).resolve()),
        "masks": str(pathlib.Path(cfg.data.masks).resolve()),
        "prefix": cfg.data.prefix,
        "codec": dataclasses.asdict(codec.config),
    }
    (tmp_path / "report.json").write_text(json.dumps({"settings": settings}))
    assert experiment._stale_conversion(cfg, codec) == ""

    settings["codec"]["max_objects"] += 1
    settings["prefix"] = "segment lake"
    (tmp_path / "report.json").write_text(json.dumps({"settings": settings}))
    assert experiment._stale_conversion(cfg, codec) == "settings changed: prefix, codec"
