"""Tiled prediction over a scene: a tile grid, soft per-tile masks, merged strip by strip.

Each tile's output text is decoded to a water probability (the sigmoid of the VQ-VAE decoder's
logits pasted into the object boxes, the max over objects, 0 outside every box), so a single tile
thresholded at 0.5 gives `MaskCodec.decode(...).mask`. Overlapping tiles are merged per pixel by
averaging these probabilities, then thresholding at 0.5 (not by OR of binary masks). Tiles are
visited row by row; once a row of tiles is merged, the rows no later tile covers are final and go
to `emit`, so only a strip of the scene (about one tile high, the scene's width) is held.
Tiles with no valid pixel are not predicted; invalid pixels are NODATA in the output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

NODATA = 255  # output value of invalid (nodata) pixels; 1 = water, 0 = no water
TilePredictor = Callable[[list[np.ndarray], list[tuple[int, int, int, int]]], list[str]]


def positions(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every `stride`, the last one ending at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def stride_of(tile: int, overlap: float) -> int:
    """The step between tiles for an overlap fraction in [0, 1)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"--overlap {overlap}: give a fraction in [0, 1), e.g. 0.25")
    return max(1, round(tile * (1 - overlap)))


def soft_mask(codec, text: str, height: int, width: int) -> np.ndarray:
    """float32[height, width] water probability of one tile's output text (see module doc)."""
    from paligemma_seg.segtokens import codec as codec_lib

    probability = np.zeros((height, width), np.float32)
    boxes, codes = [], []
    for item in codec_lib.parse_suffix(text):
        if item.problem is not None:
            continue
        box = codec_lib.locs_to_box(np.asarray(item.locs), height, width)
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append(box)
            codes.append(item.codes)
    if not boxes:
        return probability
    logits = codec.vqvae.decode(np.asarray(codes, np.int32))[..., 0]
    for (y1, x1, y2, x2), logit in zip(boxes, logits, strict=True):
        image = Image.fromarray(np.ascontiguousarray(logit, np.float32))
        resized = np.asarray(image.resize((int(x2 - x1), int(y2 - y1)), Image.BILINEAR))
        inside = 1.0 / (1.0 + np.exp(-resized.astype(np.float64)))
        probability[y1:y2, x1:x2] = np.maximum(probability[y1:y2, x1:x2], inside)
    return probability


def predict_tiled(
    scene,
    predict: TilePredictor,
    codec,
    tile: int,
    overlap: float,
    emit: Callable[[int, np.ndarray], None],
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """Runs `predict` over the tiles of `scene` and calls emit(row, uint8[h, W]) with final rows
    (1 water, 0 not, NODATA) in order; returns tile counts and tiles/s."""
    from tqdm import tqdm

    height, width = scene.height, scene.width
    tile_h, tile_w = min(tile, height), min(tile, width)
    stride = stride_of(tile, overlap)
    rows, cols = positions(height, tile, stride), positions(width, tile, stride)
    bar = tqdm(total=len(rows) * len(cols), unit="tile", disable=not progress, leave=False)
    base = 0  # first row held in the strip
    total = np.zeros((0, width), np.float32)
    count = np.zeros((0, width), np.uint8)
    valid = np.zeros((0, width), bool)
    predicted = skipped = 0
    start_time = time.perf_counter()
    for index, row in enumerate(rows):
        pixels, row_valid = scene.read_rows(row, row + tile_h)
        grow = row + tile_h - (base + len(total))
        if grow > 0:
            total = np.concatenate([total, np.zeros((grow, width), np.float32)])
            count = np.concatenate([count, np.zeros((grow, width), np.uint8)])
            valid = np.concatenate([valid, np.zeros((grow, width), bool)])
        valid[row - base : row - base + tile_h] = row_valid
        windows = [(row, col, tile_h, tile_w) for col in cols]
        keep = [w for w in windows if row_valid[:, w[1] : w[1] + tile_w].any()]
        skipped += len(windows) - len(keep)
        for first in range(0, len(keep), batch_size):
            chunk = keep[first : first + batch_size]
            tiles = [pixels[:, c : c + tile_w] for _, c, _, _ in chunk]
            for (r, c, h, w), text in zip(chunk, predict(tiles, chunk), strict=True):
                total[r - base : r - base + h, c : c + w] += soft_mask(codec, text, h, w)
                count[r - base : r - base + h, c : c + w] += 1
            predicted += len(chunk)
        bar.update(len(windows))
        done = rows[index + 1] if index + 1 < len(rows) else height
        final = done - base
        if final > 0:
            merged = total[:final] > 0.5 * np.maximum(count[:final], 1)
            out = np.where(valid[:final] & (count[:final] > 0), merged, NODATA).astype(np.uint8)
            emit(base, out)
            total, count, valid = total[final:], count[final:], valid[final:]
            base = done
    bar.close()
    seconds = time.perf_counter() - start_time
    return {
        "tiles": len(rows) * len(cols),
        "predicted_tiles": predicted,
        "nodata_tiles": skipped,
        "tiles_per_s": round(predicted / seconds, 2) if seconds > 0 else 0.0,
    }


def segmenter_predictor(segmenter, prompt: str) -> TilePredictor:
    """A TilePredictor over an `infer.segmenter.Segmenter` (tiles resized to its input)."""
    from paligemma_seg.data import preprocess

    def predict(tiles: Sequence[np.ndarray], windows) -> list[str]:
        inputs = np.stack([preprocess.from_pixels(t, segmenter.image_size) for t in tiles])
        sizes = [t.shape[:2] for t in tiles]
        return [p.text for p in segmenter.predict_inputs(inputs, sizes, prompt)]

    return predict
