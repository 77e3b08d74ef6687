"""Per-class IoU and mIoU over images with ground truth, computed by hand on small arrays."""

import numpy as np
import pytest

from paligemma_seg import metrics


def test_class_iou_by_hand():
    scores = metrics.ClassIoU(("water", "road", "building"))
    gt_water = np.zeros((4, 4), bool)
    gt_water[:2] = True  # 8 px
    pred_water = np.zeros((4, 4), bool)
    pred_water[:1] = True  # 4 px, all inside
    gt_road = np.zeros((4, 4), bool)
    gt_road[3, :2] = True  # 2 px
    pred_road = np.zeros((4, 4), bool)
    pred_road[3, 1:3] = True  # 1 inside, 1 outside
    assert scores.add("water", pred_water, gt_water) == pytest.approx(4 / 8)
    assert scores.add("road", pred_road, gt_road) == pytest.approx(1 / 3)
    assert scores.add("building", np.zeros((4, 4), bool), np.zeros((4, 4), bool)) is None
    # A second image: water perfect (8 of 8), road missed entirely (0 of 2).
    assert scores.add("water", gt_water, gt_water) == 1.0
    assert scores.add("road", np.zeros((4, 4), bool), gt_road) == 0.0
    result = scores.result()
    # Cumulative: water (4 + 8) / (8 + 8), road (1 + 0) / (3 + 2).
    assert result["per_class_iou"] == pytest.approx({"water": 12 / 16, "road": 1 / 5})
    assert result["per_class_image_iou"] == pytest.approx({"water": 0.75, "road": 1 / 6})
    assert result["miou_classes"] == pytest.approx((12 / 16 + 1 / 5) / 2)
    assert result["absent_classes"] == ["building"]
    with pytest.raises(ValueError, match="not one of"):
        scores.add("cloud", pred_water, gt_water)


def test_miou_nonempty_leaves_out_empty_ground_truths():
    acc = metrics.SegmentationMetrics()
    empty = np.zeros((2, 2), bool)
    full = np.ones((2, 2), bool)
    half = np.array([[True, False], [False, False]])
    acc.add(empty, empty)  # 1.0, empty ground truth
    acc.add(half, full)  # 0.25
    acc.add(full, empty)  # 0.0, empty ground truth (false alarm)
    result = acc.result()
    assert result["miou"] == pytest.approx(1.25 / 3)
    assert result["miou_nonempty"] == pytest.approx(0.25)
    only_empty = metrics.SegmentationMetrics()
    only_empty.add(empty, empty)
    assert only_empty.result()["miou_nonempty"] == 0.0
