"""Pictures of masks: binary mask PNGs, overlays (translucent mask + boxes) and contact sheets.

Uses only PIL and numpy; the training code never imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GT_COLOR = (0, 200, 80)
PRED_COLOR = (30, 120, 255)
BOX_COLOR = (255, 200, 0)
_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """uint8[H, W, 3] from a PIL image, a uint8 array or a float array in [-1, 1] (model input)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip((array.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return array[..., :3]


def mask_image(mask: np.ndarray) -> Image.Image:
    """A bool[H, W] mask as an 8-bit greyscale image: 255 inside, 0 outside."""
    return Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), "L")


def overlay(
    image: np.ndarray | Image.Image,
    mask: np.ndarray,
    boxes: Sequence[tuple[int, int, int, int]] = (),
    color: tuple[int, int, int] = PRED_COLOR,
    alpha: float = 0.45,
    box_color: tuple[int, int, int] = BOX_COLOR,
) -> Image.Image:
    """The image with the mask blended in `color` and boxes (y1, x1, y2, x2, exclusive) outlined."""
    rgb = to_rgb_array(image).astype(np.float32)
    inside = np.asarray(mask, dtype=bool)
    if inside.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {inside.shape} differs from image size {rgb.shape[:2]}")
    blended = np.where(inside[..., None], (1 - alpha) * rgb + alpha * np.asarray(color), rgb)
    result = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(result)
    width = max(1, round(min(result.size) / 150))
    for y1, x1, y2, x2 in boxes:
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=box_color, width=width)
    return result


@dataclasses.dataclass(frozen=True)
class SheetRow:
    """One row of a contact sheet: the image, its ground truth, the prediction and a caption."""

    image: np.ndarray | Image.Image
    gt_mask: np.ndarray
    pred_mask: np.ndarray
    pred_boxes: Sequence[tuple[int, int, int, int]] = ()
    caption: str = ""


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """Resizes to fit a cell x cell square, keeping the aspect ratio."""
    scale = cell / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)


def contact_sheet(
    rows: Sequence[SheetRow],
    cell: int = 192,
    titles: tuple[str, str, str] = ("image", "ground truth", "prediction"),
) -> Image.Image:
    """A grid, one row per example: image | ground truth overlay | prediction overlay, caption."""
    font = ImageFont.load_default()
    pad, header, caption_height = 6, 18, 16
    width = 3 * cell + 4 * pad
    height = header + max(1, len(rows)) * (cell + caption_height + pad) + pad
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(titles):
        draw.text((pad + column * (cell + pad), 3), title, fill=_TEXT, font=font)
    for index, row in enumerate(rows):
        top = header + index * (cell + caption_height + pad)
        cells = (
            Image.fromarray(to_rgb_array(row.image), "RGB"),
            overlay(row.image, row.gt_mask, color=GT_COLOR),
            overlay(row.image, row.pred_mask, row.pred_boxes, color=PRED_COLOR),
        )
        for column, picture in enumerate(cells):
            fitted = _fit(picture, cell)
            left = pad + column * (cell + pad)
            sheet.paste(
                fitted, (left + (cell - fitted.size[0]) // 2, top + (cell - fitted.size[1]) // 2)
            )
        draw.text((pad, top + cell + 2), row.caption, fill=_TEXT, font=font)
    return sheet
