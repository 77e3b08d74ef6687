"""Segmentation metrics in pure numpy: per-image scores and a dataset accumulator.

Conventions (shared by training-time eval, the evaluate CLI and the tests):
- A mask is a bool[H, W] array (anything non-zero counts as inside).
- An empty prediction on an empty ground truth is a perfect answer: IoU = Dice = 1.
- `miou` and `dice` are means of per-image scores; `ciou`, `precision` and `recall` are
  cumulative over all pixels of the dataset (sum of intersections / sum of unions, and so on), as in
  big_vision's RefCOCO eval.
- Precision with no predicted pixels (or recall with no ground-truth pixels) is 1 when the other
  mask is empty too, 0 otherwise.

This module imports nothing from JAX and does no I/O.
"""

from __future__ import annotations

import dataclasses

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
