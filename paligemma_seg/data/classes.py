"""Classes of multi-class data: the `--classes` list, class-id masks and the index masks we write.

A class list maps mask values to labels: `"1=water,2=building"` on the command line, or a JSON
file holding `{"1": "water", "2": "building"}`, `[{"id": 1, "name": "water"}, ...]` (COCO's
categories) or `["background", "water", ...]` (list position = value; "background" skipped).
Value 0 is background unless listed. Labels become prompt and answer text (`segment water ;
building`), so they may not hold `;`, `<`, `>` or line breaks, and are unique.

Index masks (what conversion writes for multi-class data, `converted_masks/NAME.png`, and what
evaluation reads): uint8, 0 = background, k = the k-th class of the list (1-based), IGNORE = pixels
scored by nobody (COCO crowd regions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
from PIL import Image

from paligemma_seg.data import images as image_io

IGNORE = 255  # index-mask value of pixels that no metric counts
MAX_CLASSES = 254  # index values 1..254; 255 is IGNORE
_BAD_LABEL = re.compile(r"[;<>\n\r]")


@dataclasses.dataclass(frozen=True)
class ClassList:
    """Mask value and label of each class, in prompt order."""

    values: tuple[int, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("the class list is empty; give at least one VALUE=LABEL.")
        if len(self.labels) > MAX_CLASSES:
            raise ValueError(f"{len(self.labels)} classes; at most {MAX_CLASSES} are supported.")
        for label in self.labels:
            check_label(label)
        for seen, what in ((self.values, "value"), (self.labels, "label")):
            duplicates = sorted({str(v) for v in seen if seen.count(v) > 1})
            if duplicates:
                raise ValueError(f"class {what}s {duplicates} appear twice; give each once.")

    @property
    def prompt_labels(self) -> str:
        """`water ; building`: the labels as PaliGemma joins them in a prompt."""
        return " ; ".join(self.labels)

    def to_dict(self) -> dict[str, str]:
        return {str(v): label for v, label in zip(self.values, self.labels, strict=True)}


def check_label(label: str) -> str:
    """`label` if it can be prompt and answer text; ValueError naming the label otherwise."""
    if not label or label != label.strip() or _BAD_LABEL.search(label):
        raise ValueError(
            f"class label {label!r} can't be used: labels are non-empty text without leading or "
            "trailing spaces, ';', '<', '>' or line breaks (they are written into prompts)."
        )
    return label


def _from_pairs(pairs: list[tuple[object, object]], where: str) -> ClassList:
    values, labels = [], []
    for value, label in pairs:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: class value {value!r} is not an integer") from None
        if not 0 <= number <= 65535:
            raise ValueError(f"{where}: class value {number} is outside 0..65535")
        if not isinstance(label, str):
            raise ValueError(f"{where}: the label of value {number} is not text: {label!r}")
        values.append(number)
        labels.append(label.strip())
    return ClassList(tuple(values), tuple(labels))


def parse_classes(text: str) -> ClassList:
    """`"1=water,2=building"` or the path of a classes JSON file (see the module docstring)."""
    if os.path.isfile(text) or text.endswith(".json"):
        return read_classes_file(text)
    pairs = []
    for item in text.split(","):
        value, sep, label = item.partition("=")
        if not sep:
            raise ValueError(
                f"--classes {text!r}: {item!r} is not VALUE=LABEL; write e.g. "
                "--classes '1=water,2=building' or pass a classes.json file."
            )
        pairs.append((value.strip(), label))
    return _from_pairs(pairs, f"--classes {text!r}")


def read_classes_file(path: str | os.PathLike) -> ClassList:
    """A classes JSON file: {value: label}, [{"id", "name"}], or [label by value]."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"classes file {path} not found; write one or pass --classes '1=water'.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})"
        ) from None
    if isinstance(data, dict):
        return _from_pairs(list(data.items()), path)
    if isinstance(data, list) and all(isinstance(d, dict) for d in data):
        missing = [i for i, d in enumerate(data) if "id" not in d or "name" not in d]
        if missing:
            raise ValueError(f"{path}: entry {missing[0]} lacks 'id' or 'name'")
        return _from_pairs([(d["id"], d["name"]) for d in data], path)
    if isinstance(data, list):
        pairs = [(i, n) for i, n in enumerate(data) if not (i == 0 and n == "background")]
        return _from_pairs(pairs, path)
    raise ValueError(f"{path}: expected an object or a list, got {type(data).__name__}")


def read_class_mask(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """(class ids int32[H, W], notes) of a class-id mask: grey or 16-bit values, palette indices.

    Colour (RGB) masks are refused unless all channels agree: their colours are not ids.
    """
    image, notes = image_io.open_image(path)
    with image:
        mode = image.mode
        if mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
            ids = np.asarray(image if mode != "1" else image.convert("L"), np.int64)
        elif mode in ("RGB", "RGBA"):
            rgb = np.asarray(image, np.int64)[..., :3]
            if not (np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2])):
                raise image_io.ImageReadError(
                    "colour mask: class masks hold one class id per pixel; save it as a grey or "
                    "palette PNG whose values are the ids of --classes"
                )
            ids = rgb[..., 0]
        else:
            raise image_io.ImageReadError(f"{mode} mask: expected grey, 16-bit or palette ids")
        if image.format == "JPEG":
            notes.append("JPEG class mask: lossy compression may change ids at edges")
    return ids.astype(np.int32), notes


def to_index(ids: np.ndarray, classes: ClassList) -> tuple[np.ndarray, dict[int, int]]:
    """(index mask uint8[H, W], {value absent from the classes and not 0: pixel count}).

    Pixels of unknown values become background (0); the caller reports them.
    """
    lookup_values = np.asarray(classes.values, np.int64)
    index = np.zeros(ids.shape, np.uint8)
    for position, value in enumerate(lookup_values, start=1):
        index[ids == value] = position
    present, counts = np.unique(ids, return_counts=True)
    known = set(classes.values) | {0}
    unknown = {int(v): int(c) for v, c in zip(present, counts, strict=True) if int(v) not in known}
    return index, unknown


def write_index_mask(index: np.ndarray, path: str | os.PathLike) -> None:
    """Writes an index mask as an 8-bit grey PNG (lossless)."""
    Image.fromarray(np.ascontiguousarray(index, np.uint8), mode="L").save(path, format="PNG")


def read_index_mask(path: str | os.PathLike) -> np.ndarray:
    """uint8[H, W] index mask written by `write_index_mask`."""
    image, _ = image_io.open_image(path)
    with image:
        return np.asarray(image, np.uint8)
