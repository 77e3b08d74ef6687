"""Masks <-> PaliGemma suffix text: `<locY1><locX1><locY2><locX2><seg..>x16 label ; ...`.

Owns thresholding, clean-up, instances, boxes <-> `<locNNNN>`, box crops <-> 64x64, the
never-raising parser and the ceiling IoU. The VQ-VAE itself lives in `vqvae.py`; tokenisation (ids,
sequence budget) in `tokenizer.py`.

Conventions (fixed here, used the same way by training data and evaluation):
- Ground truth is `grey > threshold` (bool masks as given), never cleaned (`reference_mask`).
- Boxes are pixel edges y1 x1 y2 x2 with y2/x2 EXCLUSIVE (one past the last row/column; the crop is
  `mask[y1:y2, x1:x2]`), so a 1-pixel object has y2 = y1 + 1 and stays valid (big_vision requires y2
  > y1).
- Decoding is big_vision's: pixel = floor(loc / 1023 * side). Encoding is big_vision's loc = edge /
  side * 1023 rounded UP (`loc_rounding="ceil"`) instead of to nearest: the ceiling is the nearest
  loc that the floor decode maps back to the same edge, so decode(encode(box)) == box for every side
  <= 1023 px (with "round", about half of the edges come back one pixel short). It is never more
  than one bin above big_vision's value. For sides > 1023 px a bin spans several pixels and edges
  come back up to ceil(side / 1023) - 1 px late.
- Crops are resized to 64x64 with PIL's bilinear filter on float32 images, which widens the triangle
  filter when shrinking (antialias), as big_vision's `tf.image.resize(..., 'bilinear',
  antialias=True)` does.
- Empty mask (no water after clean-up): the suffix is the empty string (the model emits EOS right
  away), and the empty string decodes to an empty mask.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

from paligemma_seg.segtokens.layout import (
    LOCS_PER_BOX,
    MASK_SIZE,
    NUM_CODES,
    NUM_LOC_BINS,
    OBJECT_SEPARATOR,
    TOKENS_PER_MASK,
    loc_token,
    seg_token,
)

if TYPE_CHECKING:  # The codec runs any object with encode/decode; JAX loads only with vqvae.
    from paligemma_seg.segtokens.vqvae import VQVAE

_TOKEN = re.compile(r"<(loc|seg)(\d+)>")


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """How a mask becomes tokens.

    Defaults = the best ceiling mIoU on the 164 water TRAINING masks with vqvae_small.npz
    (`scripts/codec_ceiling.py --sweep`): own-part crops beat crops holding all water in the box
    (0.879 vs 0.876, and are what big_vision's RefCOCO crops hold); clean-up moves it by <= 0.001
    either way (and costs up to 0.005 with the 64x64 crop alone), so it is off; 16 objects gain
    0.002 for twice the tokens; "round" boxes lose 0.005 (0.018 with the crop alone). Those masks
    have no grey level in 64..191, so any threshold there gives the same masks.
    """

    threshold: int = 127  # uint8 grey masks: water = grey > threshold; bool masks are used as given
    open_radius: int = 0  # clean-up: binary opening with a disk of this radius (px, 0 = off)
    close_radius: int = 0  # clean-up: binary closing with a disk of this radius (px, 0 = off)
    min_area: float = 0.0  # clean-up: drop connected parts smaller than this fraction of the image
    max_objects: int = 8  # at most this many parts (largest first); the rest are dropped, counted
    whole_mask: bool = False  # one object: a box over all water, instead of one per connected part
    crop_others: bool = False  # True: a part's crop holds all water in its box, not only its own
    connectivity: int = 8  # 4 or 8: which neighbours join pixels into one part
    loc_rounding: str = "ceil"  # "ceil" (exact round trip, see module doc) or "round" (big_vision)
    label: str = "water"
    refine_steps: int = 0  # sweeps of decoder-optimal code search after the encoder (0 = off)
    refine_candidates: int = 16  # codes tried per position and sweep (nearest first; 128 = all)


@dataclasses.dataclass(frozen=True)
class Objects:
    """A mask cut into objects.

    boxes int32[N, 4] (y1 x1 y2 x2, exclusive ends), crops float32[N, 64, 64, 1] in [0, 1].
    """

    boxes: np.ndarray
    crops: np.ndarray
    dropped: int  # parts beyond max_objects
    removed_parts: int  # parts removed by the clean-up (min_area / opening)
    cleaned_pixels: int  # pixels whose value the clean-up changed


@dataclasses.dataclass(frozen=True)
class EncodedMask:
    """The suffix text and what went into it; locs int32[N, 4], codes int32[N, 16]."""

    suffix: str
    objects: int
    boxes: np.ndarray
    locs: np.ndarray
    codes: np.ndarray
    dropped: int
    removed_parts: int
    cleaned_pixels: int


@dataclasses.dataclass(frozen=True)
class ParsedObject:
    """One `;`-separated chunk of model output; locs/codes are None if the layout was wrong."""

    text: str
    locs: tuple[int, ...] | None
    codes: tuple[int, ...] | None
    label: str
    problem: str | None  # None = valid


@dataclasses.dataclass(frozen=True)
class DecodedMask:
    """mask bool[H, W] = union of the valid objects; counts of valid and invalid objects."""

    mask: np.ndarray
    valid: int
    invalid: int
    objects: list[ParsedObject]


# ---------- mask -> objects


def reference_mask(mask: np.ndarray, threshold: int = 127) -> np.ndarray:
    """Ground truth as evaluation reads it: bool[H, W] = grey > threshold (bools as given)."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W] (or [H, W, C]), got shape {mask.shape}")
    return mask.astype(bool) if mask.dtype == bool else mask > threshold


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy**2 + xx**2 <= radius**2


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    return ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)


def clean(binary: np.ndarray, config: CodecConfig) -> tuple[np.ndarray, int]:
    """bool[H, W] -> (cleaned bool[H, W], parts removed by min_area).

    Opening, then closing, then dropping parts under min_area (a fraction of the image)."""
    cleaned = binary
    if config.open_radius > 0:
        cleaned = ndimage.binary_opening(cleaned, _disk(config.open_radius))
    if config.close_radius > 0:
        # Pad so that closing does not treat the image border as background.
        pad = config.close_radius
        padded = np.pad(cleaned, pad, mode="edge")
        cleaned = ndimage.binary_closing(padded, _disk(pad))[pad:-pad, pad:-pad]
    removed = 0
    if config.min_area > 0:
        labels, count = ndimage.label(cleaned, _structure(config.connectivity))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        small = sizes < config.min_area * binary.size
        small[0] = False
        removed = int(small.sum())
        cleaned = cleaned & ~small[labels]
    return cleaned, removed


def resize_crop(crop: np.ndarray) -> np.ndarray:
    """bool/float[h, w] -> float32[64, 64] in [0, 1]: PIL bilinear, antialiased when shrinking."""
    image = Image.fromarray(np.ascontiguousarray(crop, np.float32))
    return np.asarray(image.resize((MASK_SIZE, MASK_SIZE), Image.BILINEAR), np.float32).clip(0, 1)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def to_objects(mask: np.ndarray, config: CodecConfig) -> Objects:
    """Threshold, clean, split into parts (largest first, at most max_objects), box, crop."""
    binary = reference_mask(mask, config.threshold)
    cleaned, removed = clean(binary, config)
    changed = int((cleaned != binary).sum())
    empty = np.zeros((0, 4), np.int32), np.zeros((0, MASK_SIZE, MASK_SIZE, 1), np.float32)
    if not cleaned.any():
        return Objects(*empty, dropped=0, removed_parts=removed, cleaned_pixels=changed)
    if config.whole_mask:
        boxes, dropped = [_box(cleaned)], 0
        crops = [resize_crop(cleaned[boxes[0][0] : boxes[0][2], boxes[0][1] : boxes[0][3]])]
    else:
        labels, count = ndimage.label(cleaned, _structure(config.connectivity))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        order = np.argsort(-sizes, kind="stable")[: config.max_objects]
        slices = ndimage.find_objects(labels)
        boxes, crops, dropped = [], [], max(0, count - config.max_objects)
        for index in order:
            rows, cols = slices[index]
            boxes.append((rows.start, cols.start, rows.stop, cols.stop))
            window = cleaned[rows, cols] if config.crop_others else labels[rows, cols] == index + 1
            crops.append(resize_crop(window))
    return Objects(
        np.asarray(boxes, np.int32),
        np.stack(crops)[..., None],
        dropped=dropped,
        removed_parts=removed,
        cleaned_pixels=changed,
    )


# ---------- boxes <-> locs


def box_to_locs(box: np.ndarray, height: int, width: int, rounding: str = "ceil") -> np.ndarray:
    """Pixel box int[..., 4] (y1 x1 y2 x2, exclusive ends) -> loc values int32[..., 4] in 0..1023.

    loc = edge / side * 1023, rounded up ("ceil", exact round trip) or to nearest ("round",
    big_vision). Where a side > 1023 px squeezes a thin box into one bin, its end moves one bin out
    (its start one bin back at the last bin): every box stays valid (y2 > y1, x2 > x1 decoded).
    """
    box = np.asarray(box, np.int64)
    sides = np.array([height, width, height, width], np.int64)
    scaled = box * (NUM_LOC_BINS - 1)
    if rounding == "ceil":
        locs = -((-scaled) // sides)  # integer ceil, no float error
    elif rounding == "round":
        locs = np.round(scaled / sides)
    else:
        raise ValueError(f"loc_rounding must be 'ceil' or 'round', got {rounding!r}")
    locs = np.clip(locs, 0, NUM_LOC_BINS - 1)
    for start, end in ((0, 2), (1, 3)):
        collapsed = locs[..., end] <= locs[..., start]
        at_last = collapsed & (locs[..., start] == NUM_LOC_BINS - 1)
        locs[..., start] = np.where(at_last, NUM_LOC_BINS - 2, locs[..., start])
        locs[..., end] = np.where(collapsed & ~at_last, locs[..., start] + 1, locs[..., end])
    return locs.astype(np.int32)


def locs_to_box(locs: np.ndarray, height: int, width: int) -> np.ndarray:
    """loc values int[..., 4] -> pixel box int32[..., 4]: floor(loc / 1023 * side) (big_vision)."""
    locs = np.asarray(locs, np.int64)
    sides = np.array([height, width, height, width], np.int64)
    return (locs * sides // (NUM_LOC_BINS - 1)).astype(np.int32)


# ---------- text


def encode_crops(vqvae: VQVAE, crops: np.ndarray, config: CodecConfig) -> np.ndarray:
    """Box crops float[N, 64, 64, 1] -> codes int32[N, 16]: the encoder's nearest codes, then
    `config.refine_steps` sweeps of `VQVAE.refine` (the codes whose decoded crop fits best)."""
    codes = vqvae.encode(crops)
    if config.refine_steps > 0:
        codes = vqvae.refine(crops, codes, config.refine_steps, config.refine_candidates)
    return codes


def format_object(locs: np.ndarray, codes: np.ndarray, label: str) -> str:
    """`<locY1><locX1><locY2><locX2><segC0>..<segC15> label` (no spaces between tokens)."""
    text = "".join(map(loc_token, locs)) + "".join(map(seg_token, codes))
    return f"{text} {label}" if label else text


def split_objects(suffix: str) -> list[str]:
    """A suffix -> its object strings (so callers can drop whole objects to fit a budget)."""
    return [part.strip() for part in suffix.split(";") if part.strip()]


def join_objects(objects: list[str]) -> str:
    """Inverse of split_objects."""
    return OBJECT_SEPARATOR.join(objects)


def _parse_object(chunk: str) -> ParsedObject:
    tokens = list(_TOKEN.finditer(chunk))
    head = chunk[: tokens[0].start()].strip() if tokens else chunk
    if not tokens or head:
        return ParsedObject(
            chunk, None, None, "", "text before the tokens" if tokens else "no tokens"
        )
    for before, after in zip(tokens[:-1], tokens[1:], strict=True):
        if chunk[before.end() : after.start()].strip():  # spaces between tokens are fine
            return ParsedObject(chunk, None, None, "", "text between tokens")
    kinds = "".join("l" if t.group(1) == "loc" else "s" for t in tokens)
    label = chunk[tokens[-1].end() :].strip()
    if kinds != "l" * LOCS_PER_BOX + "s" * TOKENS_PER_MASK:
        problem = (
            f"expected 4 loc then 16 seg tokens, got {kinds.count('l')} loc, {kinds.count('s')} seg"
        )
        return ParsedObject(chunk, None, None, label, problem)
    digits = [len(t.group(2)) for t in tokens]
    values = [int(t.group(2)) for t in tokens]
    locs, codes = tuple(values[:LOCS_PER_BOX]), tuple(values[LOCS_PER_BOX:])
    if digits != [4] * LOCS_PER_BOX + [3] * TOKENS_PER_MASK:
        problem = "malformed token (loc needs 4 digits, seg 3)"
    elif max(locs) >= NUM_LOC_BINS or max(codes) >= NUM_CODES:
        problem = "token value out of range"
    elif locs[2] <= locs[0] or locs[3] <= locs[1]:
        problem = "inverted or empty box"
    else:
        problem = None
    return ParsedObject(chunk, locs, codes, label, problem)


def _parse_box(chunk: str) -> ParsedObject:
    """A detection object: 4 <loc> tokens then a label (no <seg>)."""
    tokens = list(_TOKEN.finditer(chunk))
    kinds = "".join("l" if t.group(1) == "loc" else "s" for t in tokens)
    label = chunk[tokens[-1].end() :].strip() if tokens else ""
    if not tokens or chunk[: tokens[0].start()].strip():
        return ParsedObject(chunk, None, None, "", "no tokens" if not tokens else "text first")
    if kinds != "l" * LOCS_PER_BOX or any(len(t.group(2)) != 4 for t in tokens):
        return ParsedObject(chunk, None, None, label, "expected 4 loc tokens (4 digits each)")
    locs = tuple(int(t.group(2)) for t in tokens)
    if max(locs) >= NUM_LOC_BINS:
        problem = "token value out of range"
    elif locs[2] <= locs[0] or locs[3] <= locs[1]:
        problem = "inverted or empty box"
    else:
        problem = None
    return ParsedObject(chunk, locs, None, label, problem)


def parse_boxes(text: str) -> list[ParsedObject]:
    """Detection output (`<loc>x4 label ; ...`) -> a ParsedObject per chunk (codes None)."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    return [_parse_box(chunk) for chunk in split_objects(text)]


def parse_suffix(text: str) -> list[ParsedObject]:
    """Model output -> a ParsedObject per non-empty `;` chunk. Never raises; see `problem`."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    return [_parse_object(chunk) for chunk in split_objects(text)]


# ---------- codec


def paste(logits: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Union of logits float[N, 64, 64] resized (PIL bilinear) into pixel boxes int[N, 4], > 0."""
    mask = np.zeros((height, width), bool)
    for (y1, x1, y2, x2), logit in zip(np.asarray(boxes).reshape(-1, 4), logits, strict=True):
        if y2 <= y1 or x2 <= x1:
            continue
        image = Image.fromarray(np.ascontiguousarray(logit, np.float32))
        resized = np.asarray(image.resize((int(x2 - x1), int(y2 - y1)), Image.BILINEAR))
        mask[y1:y2, x1:x2] |= resized > 0
    return mask


def iou(prediction: np.ndarray, target: np.ndarray) -> float:
    """IoU of two bool masks; empty vs empty is 1."""
    union = np.logical_or(prediction, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(prediction, target).sum() / union)


class MaskCodec:
    """Masks <-> suffix text with a VQ-VAE and a CodecConfig."""

    def __init__(self, vqvae: VQVAE, config: CodecConfig = CodecConfig()):
        self.vqvae = vqvae
        self.config = config

    def reference_mask(self, mask: np.ndarray) -> np.ndarray:
        """Ground truth as evaluation reads it: thresholded, no clean-up."""
        return reference_mask(mask, self.config.threshold)

    def encode(self, mask: np.ndarray) -> EncodedMask:
        """mask bool or uint8 grey [H, W] -> EncodedMask (empty mask: empty suffix)."""
        height, width = np.asarray(mask).shape[:2]
        objects = to_objects(mask, self.config)
        locs = box_to_locs(objects.boxes, height, width, self.config.loc_rounding)
        codes = encode_crops(self.vqvae, objects.crops, self.config)
        suffix = join_objects(
            [
                format_object(loc, code, self.config.label)
                for loc, code in zip(locs, codes, strict=True)
            ]
        )
        return EncodedMask(
            suffix,
            len(locs),
            objects.boxes,
            locs,
            codes,
            objects.dropped,
            objects.removed_parts,
            objects.cleaned_pixels,
        )

    def decode(self, text: str, height: int, width: int) -> DecodedMask:
        """Suffix (model output) -> DecodedMask at full resolution. Never raises on bad text."""
        parsed = parse_suffix(text)
        boxes = []
        for index, item in enumerate(parsed):
            if item.problem is None:
                box = locs_to_box(np.asarray(item.locs), height, width)
                if box[2] > box[0] and box[3] > box[1]:  # can still collapse after floor
                    boxes.append((index, box))
                else:
                    parsed[index] = dataclasses.replace(item, problem="box smaller than a pixel")
        logits = np.zeros((0, MASK_SIZE, MASK_SIZE, 1), np.float32)
        if boxes:
            logits = self.vqvae.decode(np.asarray([parsed[i].codes for i, _ in boxes], np.int32))
        mask = paste(logits[..., 0], np.asarray([box for _, box in boxes]), height, width)
        return DecodedMask(mask, len(boxes), len(parsed) - len(boxes), parsed)

    def ceiling_iou(self, mask: np.ndarray) -> float:
        """IoU(reference_mask(mask), decode(encode(mask))): the best score these tokens allow."""
        height, width = np.asarray(mask).shape[:2]
        decoded = self.decode(self.encode(mask).suffix, height, width)
        return iou(decoded.mask, self.reference_mask(mask))
