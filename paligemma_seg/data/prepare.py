"""The data a run needs, made when missing: generated tiles and converted JSONL per split.

`prepare_data(cfg, splits)` generates synthetic tiles (`data.synthetic`) when the config asks for
them and they are missing or were made with other settings, and runs the converter (`data.convert`)
when a split's JSONL is missing or `report.json` shows other conversion settings. Only process 0
writes; the others wait for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections

from paligemma_seg import experiment


def split_jsonl(cfg: ml_collections.ConfigDict, split: str) -> str:
    """Path of `split`'s JSONL file (it may not exist yet; see `prepare_data`)."""
    return os.path.join(cfg.data.jsonl_dir, f"{split}.jsonl")


def prepare_data(cfg: ml_collections.ConfigDict, splits: tuple[str, ...]) -> dict[str, str]:
    """Makes sure `splits` exist as JSONL: generates synthetic tiles, runs convert if needed.

    Returns split -> JSONL path. Only process 0 writes; the others wait for it.
    """
    paths = {split: split_jsonl(cfg, split) for split in splits}
    missing = [s for s, p in paths.items() if not os.path.isfile(p)]
    codec = None
    generate = jax.process_index() == 0 and _synthetic_to_generate(cfg)
    if generate:
        missing = list(paths)  # New tiles: any JSONL there is of the old ones.
    if not missing and jax.process_index() == 0:
        codec = experiment.load_codec(cfg)
        reason = _stale_conversion(cfg, codec)
        if reason:  # Converted with other settings: reconverting beats silently training on them.
            logging.warning("Reconverting %s: %s", cfg.data.jsonl_dir, reason)
            missing = list(paths)
    if missing and jax.process_index() == 0:
        codec = codec or experiment.load_codec(
            cfg
        )  # Fail on a missing codec before generating anything.
        if generate:
            from paligemma_seg.data import synthetic as synthetic_lib

            logging.info("Generating tiles into %s: %s", _synthetic_dir(cfg), generate)
            wanted = cfg.data.synthetic
            synthetic_lib.generate(_synthetic_dir(cfg), wanted.num_images, wanted.size, wanted.seed)
        _convert(cfg, codec)
    if missing and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prepare_data")
    still = [p for p in paths.values() if not os.path.isfile(p)]
    if still:
        raise ValueError(
            f"{', '.join(still)} not found after conversion; check that data.splits "
            f"({sorted(cfg.data.splits.to_dict())}) names the splits {list(splits)}."
        )
    return paths


def _synthetic_dir(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    return pathlib.Path(cfg.data.images).parent


def _synthetic_to_generate(cfg: ml_collections.ConfigDict) -> str:
    """Why generated tiles must be (re)made ('' = not): data.images is missing, or was generated
    with other data.synthetic settings. A folder not made by the generator is never touched."""
    wanted = cfg.data.synthetic
    if wanted.num_images <= 0:
        return ""
    if not os.path.isdir(cfg.data.images):
        return f"{cfg.data.images} does not exist"
    from paligemma_seg.data import synthetic as synthetic_lib

    made = synthetic_lib.read_manifest(_synthetic_dir(cfg))
    want = synthetic_lib.manifest(wanted.num_images, wanted.size, wanted.seed)
    if made is not None and made != want:
        return f"it holds {made}, the config asks for {want}"
    return ""


def _stale_conversion(cfg: ml_collections.ConfigDict, codec: Any) -> str:
    """Why data.jsonl_dir's report.json does not match this config ('' = it matches).

    JSONL without a convert report (written by another tool) is trusted as it is.
    """
    report_path = os.path.join(cfg.data.jsonl_dir, "report.json")
    try:
        with open(report_path) as f:
            settings = json.load(f).get("settings", {})
    except (OSError, ValueError):
        return ""
    expected = {
        "images": str(pathlib.Path(cfg.data.images).resolve()),
        "masks": str(pathlib.Path(cfg.data.masks).resolve()),
        "prefix": cfg.data.prefix,
        "codec": dataclasses.asdict(codec.config),
    }
    changed = [key for key, value in expected.items() if settings.get(key) != value]
    return f"settings changed: {', '.join(changed)}" if changed else ""


def _convert(cfg: ml_collections.ConfigDict, codec: Any) -> None:
    """Converts data.images/masks with paligemma_seg.data.convert and the config's codec."""
    for key in ("images", "masks"):
        if not os.path.isdir(cfg.data[key]):
            raise ValueError(
                f"data.{key} folder {cfg.data[key]} not found (expected at "
                f"{os.path.abspath(cfg.data[key])}); point --config.data.{key} at it."
            )
    from paligemma_seg.data import convert

    report = convert.convert(
        cfg.data.images,
        cfg.data.masks,
        cfg.data.jsonl_dir,
        cfg.data.splits.to_dict(),
        prefix=cfg.data.prefix,
        codec=codec,
    )
    logging.info(
        "Converted %d image/mask pairs into %s (ceiling mIoU %s)",
        len(report.get("images", [])),
        cfg.data.jsonl_dir,
        report.get("ceiling_miou"),
    )
