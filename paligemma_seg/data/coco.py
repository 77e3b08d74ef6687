"""COCO instance-segmentation JSON (as CVAT, Label Studio and Roboflow export it) -> instances.

`read_coco` parses the file and checks what can be checked without pixels: the keys, each
annotation's image and category ids, its segmentation's form (polygons with >= 3 points,
RLE with a size that matches its image) and polygons lying outside their image. `decode` turns one
image's annotations into bool masks with pycocotools (polygons, uncompressed and compressed RLE;
several polygons of one annotation are merged) and reports zero-area ones. Categories become class
labels, each annotation one instance; `iscrowd` regions are kept apart (not trained on, ignored by
evaluation, as COCO's evaluation ignores them).

Every problem is one record {"annotation": id, "image": file name or None, "reason": text}; none is
silent and none stops the conversion. Malformed JSON raises ValueError with the file, line and
column.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from paligemma_seg.data.classes import ClassList


@dataclasses.dataclass(frozen=True)
class CocoImage:
    """One image record and its (checked) annotations, ready for a worker process."""

    id: int
    file_name: str
    height: int
    width: int
    annotations: tuple[dict[str, Any], ...]  # {"id", "label", "segmentation", "iscrowd"}


@dataclasses.dataclass(frozen=True)
class CocoData:
    """What `read_coco` found: images by file name, the categories as classes, problems."""

    path: str
    images: dict[str, CocoImage]
    classes: ClassList
    problems: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Instances:
    """One image's instances: masks bool[N, H, W], labels, crowd flags, annotation ids."""

    masks: np.ndarray
    labels: tuple[str, ...]
    crowd: tuple[bool, ...]
    ids: tuple[int, ...]


def _load_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"COCO annotation file {path} not found; pass --coco ANNOTATIONS.json.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); fix the file or "
            "export it again."
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); is it a JSON file?") from None


def _require(data: Any, key: str, path: str, kind: type) -> Any:
    if not isinstance(data, dict) or not isinstance(data.get(key), kind):
        raise ValueError(
            f"{path}: expected a COCO object with a {kind.__name__} '{key}' (images, annotations "
            "and categories); is this an instance-segmentation export?"
        )
    return data[key]


def _polygon_problem(polygons: list, height: int, width: int) -> tuple[str | None, bool]:
    """(problem, partly outside) of a polygon list: bad form, or every point outside the image."""
    if not polygons or not all(isinstance(p, list) for p in polygons):
        return "segmentation is neither polygons nor RLE", False
    points = []
    for polygon in polygons:
        if (
            len(polygon) < 6
            or len(polygon) % 2
            or not all(isinstance(v, (int, float)) for v in polygon)
        ):
            return "polygon with fewer than 3 (x, y) points or non-numbers", False
        points.append(np.asarray(polygon, np.float64).reshape(-1, 2))
    xy = np.concatenate(points)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= width) & (xy[:, 1] >= 0) & (xy[:, 1] <= height)
    if not inside.any():
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        return (
            f"polygon outside its image (x {lo[0]:g}..{hi[0]:g}, y {lo[1]:g}..{hi[1]:g}; image "
            f"{width}x{height} WxH)"
        ), False
    return None, not inside.all()


def _segmentation_problem(segmentation: Any, height: int, width: int) -> tuple[str | None, bool]:
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not isinstance(size, list) or len(size) != 2 or counts is None:
            return "RLE without 'size' [h, w] or 'counts'", False
        if [int(size[0]), int(size[1])] != [height, width]:
            return f"RLE size {size} differs from its image's [{height}, {width}]", False
        return None, False
    if isinstance(segmentation, list):
        return _polygon_problem(segmentation, height, width)
    return "no segmentation (a box-only annotation)", False


def read_coco(path: str | os.PathLike) -> CocoData:
    """Parses and checks a COCO instance file (see the module docstring)."""
    path = os.fspath(path)
    data = _load_json(path)
    images = _require(data, "images", path, list)
    annotations = _require(data, "annotations", path, list)
    categories = _require(data, "categories", path, list)
    names: dict[int, str] = {}
    for position, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise ValueError(f"{path}: categories[{position}] lacks 'id' or 'name'")
        names[int(category["id"])] = str(category["name"]).strip()
    classes = ClassList(tuple(names), tuple(names.values()))
    records: dict[int, dict[str, Any]] = {}
    for position, image in enumerate(images):
        if not isinstance(image, dict) or not {"id", "file_name", "height", "width"} <= set(image):
            raise ValueError(
                f"{path}: images[{position}] lacks one of id, file_name, height, width"
            )
        records[int(image["id"])] = image
    problems: list[dict[str, Any]] = []
    kept: dict[int, list[dict[str, Any]]] = {i: [] for i in records}
    for position, annotation in enumerate(annotations):
        ident = (
            annotation.get("id", f"annotations[{position}]")
            if isinstance(annotation, dict)
            else None
        )
        image = records.get(annotation.get("image_id")) if isinstance(annotation, dict) else None

        def problem(reason: str, ident=ident, image=image) -> None:
            name = image["file_name"] if image else None
            problems.append({"annotation": ident, "image": name, "reason": reason})

        if not isinstance(annotation, dict):
            problem(f"annotations[{position}] is not an object")
            continue
        if image is None:
            problem(f"image id {annotation.get('image_id')!r} is not in 'images'")
            continue
        label = names.get(annotation.get("category_id"))
        if label is None:
            problem(f"unknown category id {annotation.get('category_id')!r} (not in 'categories')")
            continue
        height, width = int(image["height"]), int(image["width"])
        reason, partly = _segmentation_problem(annotation.get("segmentation"), height, width)
        if reason:
            problem(reason)
            continue
        kept[int(image["id"])].append(
            {
                "id": ident,
                "label": label,
                "segmentation": annotation["segmentation"],
                "iscrowd": bool(annotation.get("iscrowd", 0)),
                "clipped": partly,
            }
        )
    by_name: dict[str, CocoImage] = {}
    for ident, image in records.items():
        name = os.path.basename(str(image["file_name"]))
        if name in by_name:
            raise ValueError(f"{path}: two image records name {name}; file names must be unique")
        by_name[name] = CocoImage(
            ident, name, int(image["height"]), int(image["width"]), tuple(kept[ident])
        )
    return CocoData(path, by_name, classes, problems)


def _rle(segmentation: Any, height: int, width: int) -> Any:
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: one RLE each, merged
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {
        "size": segmentation["size"],
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }


def decode(image: CocoImage) -> tuple[Instances, list[dict[str, Any]]]:
    """(instances of `image`, problems): pycocotools decodes; zero-area annotations are problems."""
    from pycocotools import mask as mask_utils

    masks, labels, crowd, ids, problems = [], [], [], [], []
    for annotation in image.annotations:
        mask = mask_utils.decode(_rle(annotation["segmentation"], image.height, image.width))
        if not mask.any():
            problems.append(
                {
                    "annotation": annotation["id"],
                    "image": image.file_name,
                    "reason": "zero area (no pixel inside the image)",
                }
            )
            continue
        masks.append(mask.astype(bool))
        labels.append(annotation["label"])
        crowd.append(annotation["iscrowd"])
        ids.append(annotation["id"])
    stack = np.stack(masks) if masks else np.zeros((0, image.height, image.width), bool)
    return Instances(stack, tuple(labels), tuple(crowd), tuple(ids)), problems


def load_instances(path: str | os.PathLike, file_name: str) -> Instances:
    """Instances of one image of a COCO file (evaluation's ground truth for mask AP)."""
    data = read_coco(path)
    return decode(data.images[file_name])[0]


def class_counts(instances: Instances) -> Mapping[str, int]:
    """Non-crowd instances per label."""
    counts: dict[str, int] = {}
    for label, is_crowd in zip(instances.labels, instances.crowd, strict=True):
        if not is_crowd:
            counts[label] = counts.get(label, 0) + 1
    return counts
