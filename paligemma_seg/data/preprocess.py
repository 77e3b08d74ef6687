"""The one image preprocess: pixels -> model input float32[size, size, 3] in [-1, 1].

Training (`pipeline`, inside tf.data) and inference (`infer.segmenter`, `infer.evaluation`) both go
through `normalize`, so a model sees at prediction time exactly what it saw in training:
`tf.image.resize` bilinear to a square (big_vision's resize), then x / 127.5 - 1. TensorFlow is
kept off GPUs and TPUs here, before it first runs: JAX owns the accelerators.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

for _kind in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):  # No such device type, or TF already initialised.
        pass


def _resize(pixels: tf.Tensor, size: int) -> tf.Tensor:
    return tf.image.resize(tf.cast(pixels, tf.float32), (size, size), method="bilinear")


def normalize(pixels: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 (or float 0..255) [H, W, 3] -> float32[size, size, 3] in [-1, 1]."""
    return _resize(pixels, size) / 127.5 - 1.0


def resized_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[size, size, 3]: `normalize`'s resize, rounded to the nearest level.

    What `data.convert --resize` stores: `normalize` of it differs from `normalize` of the
    original by at most 0.5 / 127.5 (the rounding); the resize of a `size` image is the identity."""
    resized = _resize(pixels, size).numpy()
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def from_bytes(data: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded image bytes (JPEG, PNG, ...) -> the model input (traceable in tf.data)."""
    return normalize(tf.io.decode_image(data, channels=3, expand_animations=False), size)


def from_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8[H, W, 3] already decoded (e.g. by `data.images.read_image`) -> the model input."""
    return normalize(pixels, size).numpy()


def load_image(path: str, size: int) -> np.ndarray:
    """One image file -> the model input, as the training pipeline sees it."""
    return from_bytes(tf.io.read_file(path), size).numpy()
