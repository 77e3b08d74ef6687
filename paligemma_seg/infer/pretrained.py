"""The Python API's loading and inputs: `Segmenter.from_pretrained(PATH)`, `Segmenter.predict`.

`load` turns a PATH (training workdir, orbax checkpoint, .npz, HF directory; `sources.resolve`)
and its run config (the workdir's config.json, or `config=`) into a `Segmenter`; `to_pixels` turns
what a user holds (a path, a PIL image, an array) into the uint8 RGB pixels the engine takes.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from paligemma_seg import config_files
from paligemma_seg.infer import sources

ImageInput = str | os.PathLike | np.ndarray | Image.Image


def run_config(
    source: sources.Source, config: str | os.PathLike | ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """`config` (a ConfigDict, configs/NAME.py or a run's config.json), else the run's own."""
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if config is None:
        if source.config is None:
            raise ValueError(
                f"no training config found for {source.weights} (looked for a config.json "
                "written by training in its folder and the two above); pass "
                "config='configs/NAME.py' (the experiment it was trained with) or a run's "
                "config.json."
            )
        path = source.config
    else:
        path = os.fspath(config)
    if path.endswith(".json"):
        logging.info("Config: %s", path)
        return sources.load_run_config(path)
    if not os.path.isfile(path):
        raise ValueError(f"config {path} not found; pass configs/NAME.py or a run's config.json.")
    return config_files.load(path)


def load(
    cls: type,
    path: str | os.PathLike,
    config: str | os.PathLike | ml_collections.ConfigDict | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """A `cls` (infer.segmenter.Segmenter) with the weights of `path` placed on all devices."""
    from paligemma_seg.infer import segmenter

    source = sources.resolve(path)
    cfg = run_config(source, config)
    if overrides:
        cfg = config_files.apply_overrides(copy.deepcopy(cfg), overrides)
    model, params, _ = segmenter.load_model(cfg, source.weights)
    return cls(cfg, model, params)


def to_pixels(image: ImageInput) -> np.ndarray:
    """uint8[H, W, 3] RGB of an image path, a PIL image or a uint8 array ([H, W], [H, W, 3|4])."""
    if isinstance(image, str | os.PathLike):
        from paligemma_seg.data import images as images_lib

        return images_lib.read_image(image).pixels
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (
        array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
    ):
        raise ValueError(
            f"an image array must be uint8[H, W], uint8[H, W, 3] or uint8[H, W, 4]; got "
            f"{array.dtype}{list(array.shape)}"
        )
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])
