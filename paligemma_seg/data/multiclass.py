"""Multi-class data for `data.convert`: which pairs (class-id masks or COCO images), and the worker
side that cuts each image's ground truth into labelled objects.

Objects per class: for class-id masks the connected parts of each class's pixels (as binary masks
are cut, `segtokens.codec.to_objects`), for COCO each non-crowd annotation (its own mask, tight
box); at most `max_objects` per class, largest first, the rest counted as dropped. Objects are
ordered by class (the class list's order), then by size. The ground truth evaluation reads is an
index mask (`data.classes`) written to `converted_masks/NAME.png`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from paligemma_seg.data import classes as classes_lib
from paligemma_seg.data import coco as coco_lib
from paligemma_seg.data import images as image_io
from paligemma_seg.data import pairs
from paligemma_seg.data.pairs import Listing, Pair, PathLike, Prepared

MASKS_DIR = "converted_masks"


def find_class_pairs(
    images: PathLike,
    masks: PathLike,
    classes: classes_lib.ClassList,
    splits: Mapping[str, PathLike] | None = None,
) -> Listing:
    """`pairs.find_pairs`, each pair marked as a class-id mask of `classes`."""
    listing = pairs.find_pairs(images, masks, splits)
    marked = [dataclasses.replace(p, classes=classes) for p in listing.pairs]
    return Listing(marked, listing.ignored, listing.unlisted)


def find_coco_pairs(
    annotations: Mapping[str, PathLike], images: PathLike
) -> tuple[Listing, classes_lib.ClassList, list[dict[str, Any]]]:
    """(pairs, classes, annotation problems) of COCO files by split over one images folder.

    The classes are the categories of the first file; the other files must name the same ones.
    """
    folder = pairs._folder(images, "--images")
    present = {p.name for p in folder.iterdir() if image_io.is_image_file(p.name)}
    found, classes, problems, used = [], None, [], set()
    for split, path in annotations.items():
        data = coco_lib.read_coco(path)
        if classes is None:
            classes = data.classes
        elif data.classes != classes:
            raise ValueError(
                f"{path}: its categories {data.classes.to_dict()} differ from {classes.to_dict()} "
                "of the first --coco file; export all splits with one category list."
            )
        problems += [dict(p, split=split) for p in data.problems]
        for name, image in sorted(data.images.items()):
            problem = None if name in present else f"missing image: {name} not in {folder}"
            used.add(name)
            found.append(
                Pair(name, split, str(folder / name), None, problem, classes=classes, coco=image)
            )
    ignored = [
        {"file": str(folder / n), "reason": "no image record in the COCO files"}
        for n in sorted(present - used)
    ]
    return Listing(found, ignored, len(present - used)), classes, problems


# ----------------------------------------------------------------------------------------- workers


def _class_objects(
    index: np.ndarray, classes: classes_lib.ClassList, config: Any
) -> tuple[list, list, list[str], dict[str, dict[str, int]]]:
    """Connected parts per class of an index mask: (boxes, crops, labels, per-class counts)."""
    from paligemma_seg.segtokens import codec

    boxes, crops, labels, counts = [], [], [], {}
    for position, label in enumerate(classes.labels, start=1):
        binary = index == position
        if not binary.any():
            continue
        objects = codec.to_objects(binary, config)
        boxes += list(objects.boxes)
        crops += list(objects.crops)
        labels += [label] * len(objects.boxes)
        counts[label] = {"objects": len(objects.boxes), "dropped": int(objects.dropped)}
    return boxes, crops, labels, counts


def _instance_objects(
    instances: coco_lib.Instances, classes: classes_lib.ClassList, max_objects: int
) -> tuple[list, list, list[str], dict[str, dict[str, int]], np.ndarray]:
    """Non-crowd instances per class, largest first: (boxes, crops, labels, counts, index mask)."""
    from paligemma_seg.segtokens import codec

    height, width = instances.masks.shape[1:]
    index = np.zeros((height, width), np.uint8)
    areas = instances.masks.sum(axis=(1, 2))
    for i in np.flatnonzero(instances.crowd):
        index[instances.masks[i]] = classes_lib.IGNORE
    position_of = {label: p for p, label in enumerate(classes.labels, start=1)}
    for i in np.argsort(-areas, kind="stable"):  # larger first, so smaller ones stay on top
        if not instances.crowd[i]:
            index[instances.masks[i]] = position_of[instances.labels[i]]
    boxes, crops, labels, counts = [], [], [], {}
    for label in classes.labels:
        members = [
            i for i in np.argsort(-areas, kind="stable")
            if instances.labels[i] == label and not instances.crowd[i]
        ]  # fmt: skip
        if not members:
            continue
        for i in members[:max_objects]:
            rows = np.flatnonzero(instances.masks[i].any(axis=1))
            cols = np.flatnonzero(instances.masks[i].any(axis=0))
            y1, x1, y2, x2 = rows[0], cols[0], rows[-1] + 1, cols[-1] + 1
            boxes.append(np.array([y1, x1, y2, x2], np.int32))
            crops.append(codec.resize_crop(instances.masks[i][y1:y2, x1:x2])[..., None])
            labels.append(label)
        counts[label] = {
            "objects": min(len(members), max_objects),
            "dropped": max(0, len(members) - max_objects),
        }
    crowd = sum(instances.crowd)
    if crowd:
        counts["(crowd regions, ignored)"] = {"objects": 0, "dropped": int(crowd)}
    return boxes, crops, labels, counts, index


def _ground_truth(pair: Pair, image: Any) -> tuple[np.ndarray | None, list[str], str | None, Any]:
    """(index mask, notes, problem, COCO instances or None) of a multi-class pair."""
    height, width = image.height, image.width
    if pair.coco is not None:
        if (pair.coco.height, pair.coco.width) != (height, width):
            return None, [], (
                f"size mismatch: the COCO record says {pair.coco.height}x{pair.coco.width} (HxW), "
                f"the image is {height}x{width}"
            ), None  # fmt: skip
        instances, problems = coco_lib.decode(pair.coco)
        return None, [], None, (instances, problems)
    try:
        ids, notes = classes_lib.read_class_mask(pair.mask)
    except Exception as error:
        return None, [], f"unreadable mask: {error}", None
    if ids.shape != (height, width):
        size = f"image {height}x{width} (HxW), mask {ids.shape[0]}x{ids.shape[1]}"
        return None, notes, f"size mismatch: {size}", None
    index, unknown = classes_lib.to_index(ids, pair.classes)
    notes += [
        f"mask value {value} is not in the classes ({count} px read as background)"
        for value, count in sorted(unknown.items())
    ]
    return index, notes, None, None


def prepare(pair: Pair, config: Any, staging: str, final: str, ceiling: bool) -> Prepared:
    """`pairs.prepare` for multi-class pairs: labelled objects, index mask, per-class counts."""
    from paligemma_seg.segtokens import codec

    image, pixels, problem = pairs.read_image_checked(pair.image)
    notes = [f"image: {n}" for n in (image.notes if image else ())]
    if problem:
        return Prepared(pair, problem=problem, notes=tuple(notes))
    index, mask_notes, problem, coco = _ground_truth(pair, image)
    notes += [f"mask: {n}" for n in mask_notes]
    if problem:
        return Prepared(pair, problem=problem, notes=tuple(notes))
    annotation_problems: tuple[dict[str, Any], ...] = ()
    if coco is not None:
        instances, found = coco
        annotation_problems = tuple(found) + tuple(
            {"annotation": a["id"], "image": pair.name, "note": "polygon partly outside, clipped"}
            for a in pair.coco.annotations
            if a["clipped"]
        )
        boxes, crops, labels, counts, index = _instance_objects(
            instances, pair.classes, config.max_objects
        )
    else:
        boxes, crops, labels, counts = _class_objects(index, pair.classes, config)
    empty_crops = np.zeros((0, 64, 64, 1), np.float32)
    objects = codec.Objects(
        np.asarray(boxes, np.int32).reshape(-1, 4),
        np.stack(crops).astype(np.float32) if crops else empty_crops,
        dropped=sum(c["dropped"] for k, c in counts.items() if not k.startswith("(")),
        removed_parts=0,
        cleaned_pixels=0,
    )
    masks_staging = os.path.join(os.path.dirname(staging), MASKS_DIR)
    os.makedirs(masks_staging, exist_ok=True)
    classes_lib.write_index_mask(index, os.path.join(masks_staging, pair.name + ".png"))
    labelled = np.isin(index, np.arange(1, len(pair.classes.labels) + 1))
    return Prepared(
        pair,
        notes=tuple(notes),
        size=index.shape,
        water_fraction=float(np.count_nonzero(labelled) / index.size),
        objects=objects,
        image_path=pairs.plain_image_path(pair, image, pixels, staging, final),
        labels=tuple(labels),
        reference_index=index if ceiling else None,
        index_path=os.path.join(os.path.dirname(final), MASKS_DIR, pair.name + ".png"),
        class_counts=counts,
        annotation_problems=annotation_problems,
    )
