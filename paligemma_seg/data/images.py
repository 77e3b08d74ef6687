"""Robust reading of images and masks: any PIL format or mode in, uint8 arrays out, or a reason.

Owns decoding and colour-mode conversion only (thresholding is `segtokens.codec.reference_mask`).
The content decides the format, not the extension: PNG data in a `.jpg` file reads fine (noted).
Conversion and evaluation both read masks with `read_mask`, so both see the same grey levels.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Formats a plain decoder (tf.io.decode_image) reads as RGB with no surprises, by extension.
_PLAIN = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",)}


class ImageReadError(ValueError):
    """A file that cannot be used as an image or mask; the message says why."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """pixels: uint8[H, W, 3] (images) or uint8[H, W] (masks); notes: conversions applied."""

    pixels: np.ndarray
    format: str  # what the content is (PIL's name: JPEG, PNG, ...)
    mode: str  # PIL mode as stored (RGB, L, CMYK, RGBA, ...)
    notes: tuple[str, ...]

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def is_image_file(path: str | os.PathLike) -> bool:
    """True for names with an image extension (content is checked when read)."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_plain(loaded: Loaded | ImageInfo, path: str | os.PathLike) -> bool:
    """True when a plain decoder gets the same RGB pixels as `read_image` (no copy needed)."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    return extension in _PLAIN.get(loaded.format, ()) and loaded.mode in ("RGB", "L")


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What `inspect_image` learns without keeping pixels."""

    format: str
    mode: str
    height: int
    width: int
    notes: tuple[str, ...]


def _open(path: str, reduced: bool = False) -> tuple[Image.Image, list[str]]:
    """Opens and decodes `path` (JPEGs at 1/8 scale when `reduced`, which still reads every byte);
    ImageReadError for missing, empty, foreign or broken files."""
    if not os.path.isfile(path):
        raise ImageReadError("file not found")
    if os.path.getsize(path) == 0:
        raise ImageReadError("empty file (0 bytes)")
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            size = image.size
            if reduced:
                image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()  # decode now: truncated or corrupt data fails here, not later
            image.info["original_size"] = size
    except UnidentifiedImageError as error:
        raise ImageReadError("not an image (PIL cannot identify the content)") from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageReadError(f"too large to decode safely ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(f"corrupt or truncated image data ({error})") from error
    extension = os.path.splitext(path)[1].lower()
    if image.format and Image.registered_extensions().get(extension) != image.format:
        notes.append(f"{image.format} data in a '{extension}' file")
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"first of {image.n_frames} frames used")
    return image, notes


def open_image(path: str | os.PathLike) -> tuple[Image.Image, list[str]]:
    """The decoded PIL image of `path` as stored (any mode) and notes; ImageReadError(reason).

    For readers that need the stored values (class ids, palette indices), not RGB or grey."""
    return _open(os.fspath(path))


def _scale_wide(array: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float pixels -> uint8 (0..65535 -> 0..255, floats [0, 1] -> 0..255)."""
    array = array.astype(np.float64)
    if mode == "F" and array.max(initial=0) <= 1.0:
        array = array * 255
    elif array.max(initial=0) > 255:
        array = array / 257
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def _over_black(rgba: np.ndarray) -> np.ndarray:
    """uint8[H, W, 4] -> uint8[H, W, 3], transparent pixels black (as satellite no-data is)."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgba[..., :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


_WIDE = ("I", "I;16", "I;16B", "I;16L", "F")
_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def _rgb_note(image: Image.Image) -> str | None:
    """How `_to_rgb` changes this image, for the report (None: plain RGB or a palette)."""
    mode = image.mode
    if mode in _WIDE:
        return f"{mode} pixels scaled to 8 bits"
    if mode in _ALPHA or (mode == "P" and "transparency" in image.info):
        return "alpha channel composited on black"
    if mode in ("L", "1"):
        return "greyscale expanded to RGB"
    return None if mode in ("RGB", "P") else f"{mode} converted to RGB"


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, np.uint8)
    if mode in _WIDE:
        return np.repeat(_scale_wide(np.asarray(image), mode)[..., None], 3, axis=-1)
    if mode in _ALPHA or (mode == "P" and "transparency" in image.info):
        return _over_black(np.asarray(image.convert("RGBA"), np.uint8))
    return np.asarray(image.convert("RGB"), np.uint8)


def _with_note(notes: list[str], note: str | None) -> tuple[str, ...]:
    return tuple(notes + [note] if note else notes)


def inspect_image(path: str | os.PathLike) -> ImageInfo:
    """Checks that `path` decodes completely (JPEGs at 1/8 scale: faster than `read_image`) and
    returns its size, format and notes; raises ImageReadError(reason)."""
    image, notes = _open(os.fspath(path), reduced=True)
    with image:
        width, height = image.info["original_size"]
        notes = _with_note(notes, _rgb_note(image))
        return ImageInfo(image.format or "?", image.mode, height, width, notes)


def read_image(path: str | os.PathLike) -> Loaded:
    """uint8[H, W, 3] RGB pixels of any readable image; raises ImageReadError(reason)."""
    image, notes = _open(os.fspath(path))
    with image:
        pixels, notes = _to_rgb(image), _with_note(notes, _rgb_note(image))
        return Loaded(np.ascontiguousarray(pixels), image.format or "?", image.mode, notes)


def read_mask(path: str | os.PathLike) -> Loaded:
    """uint8[H, W] grey levels of a mask file; raises ImageReadError(reason).

    Colour masks use the brightest channel (a red-on-black mask is water where it is red); alpha is
    composited on black; masks stored as 0/1 are scaled to 0/255 so a grey threshold reads them.
    """
    image, notes = _open(os.fspath(path))
    with image:
        mode = image.mode
        if mode in ("L", "1"):
            grey = np.asarray(image.convert("L"), np.uint8)
        elif mode in _WIDE:
            grey = _scale_wide(np.asarray(image), mode)
        else:
            rgb = _to_rgb(image)
            grey = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
            if _rgb_note(image):
                notes.append(f"{_rgb_note(image)}; brightest channel used")
        if 0 < grey.max() <= 1:
            notes.append("mask values 0/1 scaled to 0/255")
            grey = grey * np.uint8(255)
        return Loaded(np.ascontiguousarray(grey), image.format or "?", mode, tuple(notes))
