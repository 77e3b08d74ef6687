"""Segmentation metrics in pure numpy: per-image scores and a dataset accumulator.

Conventions (shared by training-time eval, the evaluate CLI and the tests):
- A mask is a bool[H, W] array (anything non-zero counts as inside).
- An empty prediction on an empty ground truth is a perfect answer: IoU = Dice = 1.
- `miou` and `dice` are means of per-image scores; `ciou`, `precision` and `recall` are
  cumulative over all pixels of the dataset (sum of intersections / sum of unions, and so on), as in
  big_vision's RefCOCO eval.
- Precision with no predicted pixels (or recall with no ground-truth pixels) is 1 when the other
  mask is empty too, 0 otherwise.

Instance AP (`InstanceAP`) is pycocotools' COCOeval on masks and boxes held in memory.

This module imports nothing from JAX and does no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

METRIC_NAMES = (
    "miou",
    "ciou",
    "dice",
    "precision",
    "recall",
    "valid_rate",
    "object_count_mae",
    "object_count_bias",
)


@dataclasses.dataclass(frozen=True)
class PixelCounts:
    """Pixel counts of one prediction against its ground truth."""

    true_pos: int
    false_pos: int
    false_neg: int

    @property
    def intersection(self) -> int:
        return self.true_pos

    @property
    def union(self) -> int:
        return self.true_pos + self.false_pos + self.false_neg


def pixel_counts(pred: np.ndarray, gt: np.ndarray) -> PixelCounts:
    """Counts true positives, false positives and false negatives of bool[H, W] masks."""
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}; "
            "decode the prediction at the ground truth's size"
        )
    true_pos = int(np.count_nonzero(pred & gt))
    return PixelCounts(
        true_pos=true_pos,
        false_pos=int(np.count_nonzero(pred)) - true_pos,
        false_neg=int(np.count_nonzero(gt)) - true_pos,
    )


def _ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator, with 0 / 0 = 1 (nothing to find and nothing found)."""
    return 1.0 if denominator == 0 else numerator / denominator


def _safe_ratio(numerator: int, denominator: int, empty_value: float) -> float:
    return empty_value if denominator == 0 else numerator / denominator


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two masks; 1.0 when both are empty."""
    counts = pixel_counts(pred, gt)
    return _ratio(counts.intersection, counts.union)


def mask_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|); 1.0 when both are empty."""
    counts = pixel_counts(pred, gt)
    return _ratio(2 * counts.true_pos, 2 * counts.true_pos + counts.false_pos + counts.false_neg)


def box_iou(box_a: tuple[float, ...], box_b: tuple[float, ...]) -> float:
    """IoU of two boxes (y1, x1, y2, x2) with exclusive ends; 1.0 for two empty boxes."""
    ay1, ax1, ay2, ax2 = box_a
    by1, bx1, by2, bx2 = box_b
    area_a = max(0.0, ay2 - ay1) * max(0.0, ax2 - ax1)
    area_b = max(0.0, by2 - by1) * max(0.0, bx2 - bx1)
    inter = max(0.0, min(ay2, by2) - max(ay1, by1)) * max(0.0, min(ax2, bx2) - max(ax1, bx1))
    union = area_a + area_b - inter
    return 1.0 if union <= 0 else inter / union


@dataclasses.dataclass
class SegmentationMetrics:
    """Accumulates per-image results; `result()` gives the dataset metrics as a dict of floats."""

    ious: list[float] = dataclasses.field(default_factory=list)
    dices: list[float] = dataclasses.field(default_factory=list)
    valid: list[bool] = dataclasses.field(default_factory=list)
    nonempty: list[bool] = dataclasses.field(default_factory=list)  # ground truth has pixels
    object_errors: list[int] = dataclasses.field(default_factory=list)
    true_pos: int = 0
    false_pos: int = 0
    false_neg: int = 0

    def add(
        self,
        pred: np.ndarray,
        gt: np.ndarray,
        valid: bool = True,
        pred_objects: int | None = None,
        gt_objects: int | None = None,
    ) -> float:
        """Adds one image and returns its IoU.

        Args:
          pred: bool[H, W] predicted mask.
          gt: bool[H, W] ground-truth mask.
          valid: whether the model's output parsed without invalid objects.
          pred_objects: number of objects the model predicted (for the object-count error).
          gt_objects: number of objects in the ground truth's encoding.
        """
        counts = pixel_counts(pred, gt)
        iou = _ratio(counts.intersection, counts.union)
        self.ious.append(iou)
        self.dices.append(
            _ratio(2 * counts.true_pos, 2 * counts.true_pos + counts.false_pos + counts.false_neg)
        )
        self.valid.append(bool(valid))
        self.nonempty.append(counts.true_pos + counts.false_neg > 0)
        if pred_objects is not None and gt_objects is not None:
            self.object_errors.append(int(pred_objects) - int(gt_objects))
        self.true_pos += counts.true_pos
        self.false_pos += counts.false_pos
        self.false_neg += counts.false_neg
        return iou

    def result(self) -> dict[str, float]:
        """Dataset metrics as plain numbers (never NaN; no images gives zeros)."""
        num = len(self.ious)
        if num == 0:
            return dict.fromkeys(METRIC_NAMES, 0.0) | {"num_images": 0, "miou_nonempty": 0.0}
        errors = np.asarray(self.object_errors, dtype=np.float64)
        has_pred = self.true_pos + self.false_pos > 0
        has_gt = self.true_pos + self.false_neg > 0
        union = self.true_pos + self.false_pos + self.false_neg
        return {
            "num_images": num,
            "miou": float(np.mean(self.ious)),
            "ciou": _ratio(self.true_pos, union),
            "dice": float(np.mean(self.dices)),
            "precision": _safe_ratio(
                self.true_pos, self.true_pos + self.false_pos, 0.0 if has_gt else 1.0
            ),
            "recall": _safe_ratio(
                self.true_pos, self.true_pos + self.false_neg, 0.0 if has_pred else 1.0
            ),
            "valid_rate": float(np.mean(self.valid)),
            # Over images whose ground truth is not empty (empty vs empty scores 1 in miou);
            # 0.0 when every ground truth is empty.
            "miou_nonempty": float(
                np.mean([i for i, n in zip(self.ious, self.nonempty, strict=True) if n] or [0.0])
            ),
            "object_count_mae": float(np.mean(np.abs(errors))) if errors.size else 0.0,
            "object_count_bias": float(np.mean(errors)) if errors.size else 0.0,
        }


@dataclasses.dataclass
class ClassIoU:
    """Per-class IoU of semantic (multi-class) segmentation over a dataset.

    `per_class_iou`: cumulative over all images (sum of intersections / sum of unions, per
    class); `per_class_image_iou`: mean of per-image IoUs over the images whose ground truth or
    prediction holds the class; `miou_classes`: mean of `per_class_iou` over the classes seen
    (in some ground truth or prediction); classes never seen are listed in `absent_classes`.
    """

    labels: tuple[str, ...]
    intersection: dict[str, int] = dataclasses.field(default_factory=dict)
    union: dict[str, int] = dataclasses.field(default_factory=dict)
    image_ious: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def add(self, label: str, pred: np.ndarray, gt: np.ndarray) -> float | None:
        """Adds one image's masks of one class; returns its IoU (None: neither has the class)."""
        counts = pixel_counts(pred, gt)
        if label not in self.labels:
            raise ValueError(f"class {label!r} is not one of {self.labels}")
        self.intersection[label] = self.intersection.get(label, 0) + counts.intersection
        self.union[label] = self.union.get(label, 0) + counts.union
        if counts.union == 0:
            return None
        iou = counts.intersection / counts.union
        self.image_ious.setdefault(label, []).append(iou)
        return iou

    def result(self) -> dict:
        seen = [label for label in self.labels if self.union.get(label, 0) > 0]
        per_class = {label: self.intersection[label] / self.union[label] for label in seen}
        return {
            "per_class_iou": per_class,
            "per_class_image_iou": {k: float(np.mean(self.image_ious[k])) for k in seen},
            "miou_classes": float(np.mean(list(per_class.values()))) if per_class else 0.0,
            "absent_classes": [label for label in self.labels if label not in per_class],
        }


AP_NAMES = ("mask_ap", "mask_ap50", "mask_ap75", "box_ap", "box_ap50", "box_ap75")


def _rle(mask: np.ndarray) -> dict:
    """pycocotools' compressed RLE of a bool[H, W] mask."""
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))


def _xywh(box: tuple[float, ...]) -> list[float]:
    """(y1, x1, y2, x2) with exclusive ends -> COCO's [x, y, width, height]."""
    y1, x1, y2, x2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (y1, x1, y2, x2) box of a non-empty mask (exclusive ends)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _average_precision(evaluator: Any, iou: float | None) -> float:
    """COCO's AP (area 'all', 100 detections) from an accumulated COCOeval: the mean over IoU
    thresholds (or at `iou`), 101 recall points and categories with ground truth; -1 if none."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    if iou is not None:
        precision = precision[np.isclose(evaluator.params.iouThrs, iou)]
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else -1.0


@dataclasses.dataclass
class InstanceAP:
    """Matched-instance mask AP and box AP over a dataset, by pycocotools' COCOeval.

    `add` collects one image's ground-truth instances and predicted objects (categories are the
    labels, numbered as first seen); `result` runs COCOeval ('segm' on the masks, 'bbox' on the
    boxes) and gives AP over IoU 0.5:0.05:0.95 and at 0.5 and 0.75 (`AP_NAMES`), -1.0 where no
    image has a ground-truth instance (COCO's convention). Crowd regions are ignored as COCO does.

    Scores: our decoder is greedy and gives no confidence, so every object scores 1.0 unless
    `scores` are passed. COCOeval's sorts are stable, so ties rank objects in the order images
    were added and, within an image, in output order: with constant scores AP summarises the one
    operating point the decoder has (precision P, recall R) along that arbitrary ranking, not a
    ranking quality; the interpolated precision is >= P up to recall R, so about P * R <= AP <= R.
    """

    labels: list[str] = dataclasses.field(default_factory=list)
    images: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    truths: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    detections: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def _category(self, label: str) -> int:
        if label not in self.labels:
            self.labels.append(label)
        return self.labels.index(label) + 1

    def add(
        self,
        gt_masks: Sequence[np.ndarray],
        gt_labels: Sequence[str],
        pred_masks: Sequence[np.ndarray],
        pred_labels: Sequence[str],
        pred_boxes: Sequence[tuple[float, ...]] | None = None,
        gt_crowd: Sequence[bool] | None = None,
        scores: Sequence[float] | None = None,
        shape: tuple[int, int] | None = None,
    ) -> None:
        """Adds one image.

        Args:
          gt_masks, gt_labels: its ground-truth instances, bool[H, W] each, and their labels.
          pred_masks, pred_labels: its predicted objects (`Prediction.object_masks`, `.labels`).
          pred_boxes: their (y1, x1, y2, x2) pixel boxes (`Prediction.boxes`); default: the
            masks' tight boxes. Ground-truth boxes are always their masks' tight boxes.
          gt_crowd: which ground-truth instances are crowd regions (ignored); default none.
          scores: a confidence per predicted object; default 1.0 each (see the class docstring).
          shape: (H, W) of the image, needed only when it has neither instances nor objects.
        """
        masks = [np.asarray(m, bool) for m in (*gt_masks, *pred_masks)]
        height, width = masks[0].shape if masks else shape or (1, 1)
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": int(height), "width": int(width)})
        crowd = list(gt_crowd) if gt_crowd is not None else [False] * len(gt_masks)
        for mask, label, is_crowd in zip(gt_masks, gt_labels, crowd, strict=True):
            mask = np.asarray(mask, bool)
            if mask.any():
                self.truths.append(
                    self._annotation(image_id, label, mask, _mask_box(mask), iscrowd=int(is_crowd))
                )
        boxes = pred_boxes if pred_boxes is not None else [None] * len(pred_masks)
        confidences = scores if scores is not None else [1.0] * len(pred_masks)
        objects = zip(pred_masks, pred_labels, boxes, confidences, strict=True)
        for mask, label, box, score in objects:
            mask = np.asarray(mask, bool)
            if box is None:
                if not mask.any():
                    continue
                box = _mask_box(mask)
            self.detections.append(
                self._annotation(image_id, label, mask, box, score=float(score), iscrowd=0)
            )

    def _annotation(
        self, image_id: int, label: str, mask: np.ndarray, box: tuple, **fields: Any
    ) -> dict[str, Any]:
        return {
            "image_id": image_id,
            "category_id": self._category(label),
            "segmentation": _rle(mask),
            "area": float(np.count_nonzero(mask)),
            "bbox": _xywh(box),
            **fields,
        }

    def _coco(self, annotations: list[dict[str, Any]]) -> Any:
        from pycocotools import coco

        data = coco.COCO()
        data.dataset = {
            "images": self.images,
            "categories": [{"id": k, "name": n} for k, n in enumerate(self.labels, start=1)],
            "annotations": [dict(a, id=i) for i, a in enumerate(annotations, start=1)],
        }  # ids from 1: COCOeval reads a matched id of 0 as "no match"
        data.createIndex()
        return data

    def result(self) -> dict[str, float]:
        """mask_ap, mask_ap50, mask_ap75, box_ap, box_ap50, box_ap75 and num_instances."""
        import contextlib
        import io

        from pycocotools import cocoeval

        out: dict[str, float] = {}
        if not any(not t["iscrowd"] for t in self.truths):
            return dict.fromkeys(AP_NAMES, -1.0) | {"num_instances": 0}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            truths, detections = self._coco(self.truths), self._coco(self.detections)
            for kind, iou_type in (("mask", "segm"), ("box", "bbox")):
                evaluator = cocoeval.COCOeval(truths, detections, iou_type)
                evaluator.evaluate()
                evaluator.accumulate()
                out[f"{kind}_ap"] = _average_precision(evaluator, None)
                out[f"{kind}_ap50"] = _average_precision(evaluator, 0.5)
                out[f"{kind}_ap75"] = _average_precision(evaluator, 0.75)
        return out | {"num_instances": sum(not t["iscrowd"] for t in self.truths)}
