"""Metrics against values computed by hand on small masks."""

import numpy as np
import pytest

from paligemma_seg import metrics

# 3x4 masks: pred has 4 pixels, gt has 5, they share 3.
PRED = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
GT = np.array([[0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
EMPTY = np.zeros((3, 4), bool)


def test_mask_iou_hand_computed():
    assert metrics.mask_iou(PRED, GT) == pytest.approx(3 / 6)
    assert metrics.mask_dice(PRED, GT) == pytest.approx(2 * 3 / (4 + 5))
    counts = metrics.pixel_counts(PRED, GT)
    assert (counts.true_pos, counts.false_pos, counts.false_neg, counts.union) == (3, 1, 2, 6)


def test_mask_iou_empty_conventions():
    assert metrics.mask_iou(EMPTY, EMPTY) == 1.0
    assert metrics.mask_dice(EMPTY, EMPTY) == 1.0
    assert metrics.mask_iou(EMPTY, GT) == 0.0
    assert metrics.mask_iou(PRED, EMPTY) == 0.0


def test_mask_iou_accepts_grey_levels_and_rejects_shape_mismatch():
    assert metrics.mask_iou(PRED.astype(np.uint8) * 255, GT) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differs from ground truth shape"):
        metrics.mask_iou(PRED, GT[:, :3])


def test_box_iou_hand_computed():
    assert metrics.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert metrics.box_iou((0, 0, 2, 2), (2, 2, 4, 4)) == 0.0
    assert metrics.box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0


def test_segmentation_metrics_dataset_values():
    acc = metrics.SegmentationMetrics()
    assert acc.add(PRED, GT, valid=True, pred_objects=1, gt_objects=2) == pytest.approx(0.5)
    assert acc.add(EMPTY, EMPTY, valid=True, pred_objects=0, gt_objects=0) == 1.0
    assert acc.add(PRED, EMPTY, valid=False, pred_objects=3, gt_objects=0) == 0.0
    result = acc.result()
    assert result["num_images"] == 3
    assert result["miou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert result["dice"] == pytest.approx((6 / 9 + 1.0 + 0.0) / 3)
    # Cumulative: intersections 3 + 0 + 0; unions 6 + 0 + 4.
    assert result["ciou"] == pytest.approx(3 / 10)
    # Predicted pixels 4 + 0 + 4, ground-truth pixels 5.
    assert result["precision"] == pytest.approx(3 / 8)
    assert result["recall"] == pytest.approx(3 / 5)
    assert result["valid_rate"] == pytest.approx(2 / 3)
    assert result["object_count_mae"] == pytest.approx((1 + 0 + 3) / 3)
    assert result["object_count_bias"] == pytest.approx((-1 + 0 + 3) / 3)


def test_segmentation_metrics_all_empty_is_perfect():
    acc = metrics.SegmentationMetrics()
    acc.add(EMPTY, EMPTY)
    result = acc.result()
    assert result["miou"] == result["ciou"] == result["precision"] == result["recall"] == 1.0


def test_segmentation_metrics_no_images_gives_zeros():
    result = metrics.SegmentationMetrics().result()
    assert result["num_images"] == 0
    assert all(result[name] == 0.0 for name in metrics.METRIC_NAMES)
