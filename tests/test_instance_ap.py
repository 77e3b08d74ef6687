"""Instance AP (`metrics.InstanceAP`, pycocotools' COCOeval) on hand-computed cases, and its fields
in eval.json.

COCO's AP: detections ranked by score (stable sort: ties keep the order added), precision made
non-increasing from the right, then read at 101 recall points 0, 0.01, ..., 1 (the first rank
whose recall reaches each point; 0 past the last recall) and averaged; mask_ap / box_ap average
that over IoU thresholds 0.5, 0.55, ..., 0.95, *_ap50 and *_ap75 are one threshold.
"""

import json
import types

import ml_collections
import numpy as np
import pytest
from test_evaluate import _PerfectSegmenter, setup  # noqa: F401 (setup: a fixture)

from paligemma_seg import metrics
from paligemma_seg.data import classes as classes_lib
from paligemma_seg.data import pipeline
from paligemma_seg.infer import evaluation
from paligemma_seg.infer import segmenter as segmenter_lib
from paligemma_seg.segtokens import codec as codec_lib

SIZE = (64, 64)


def square(y: int, x: int, side: int = 20) -> np.ndarray:
    mask = np.zeros(SIZE, bool)
    mask[y : y + side, x : x + side] = True
    return mask


def box(y: int, x: int, side: int = 20) -> tuple[int, int, int, int]:
    return (y, x, y + side, x + side)


def test_perfect_predictions_score_one():
    ap = metrics.InstanceAP()
    truths = [square(0, 0), square(30, 30)]
    ap.add(truths, ["water", "building"], truths, ["water", "building"], [box(0, 0), box(30, 30)])
    ap.add([square(5, 40)], ["water"], [square(5, 40)], ["water"])  # boxes from the masks
    result = ap.result()
    assert [result[k] for k in metrics.AP_NAMES] == pytest.approx([1.0] * len(metrics.AP_NAMES))
    assert result["num_instances"] == 3


def test_one_of_two_missed_is_51_of_101_recall_points():
    """One perfect detection, one ground truth missed: precision 1 up to recall 0.5, nothing
    beyond; 51 of the 101 recall points (0, 0.01, ..., 0.5) read precision 1 -> 51/101."""
    ap = metrics.InstanceAP()
    ap.add([square(0, 0), square(30, 30)], ["water"] * 2, [square(0, 0)], ["water"])
    result = ap.result()
    for name in metrics.AP_NAMES:
        assert result[name] == pytest.approx(51 / 101), name


def test_a_box_at_iou_0_6_counts_at_0_5_not_at_0_75():
    """20x20 squares 5 px apart: IoU 15*20 / (800 - 300) = 0.6, matched at the thresholds 0.5
    and 0.55 (and 0.6 itself: COCOeval skips an IoU only when it is below the threshold), so 3 of
    the 10 thresholds score 1 -> AP 0.3."""
    ap = metrics.InstanceAP()
    ap.add([square(10, 10)], ["water"], [square(10, 15)], ["water"], [box(10, 15)])
    result = ap.result()
    for kind in ("mask", "box"):
        assert result[f"{kind}_ap50"] == pytest.approx(1.0) and result[f"{kind}_ap75"] == 0.0
        assert result[f"{kind}_ap"] == pytest.approx(0.3)


def test_a_wrong_label_is_not_matched():
    ap = metrics.InstanceAP(["water", "building"])
    ap.add([square(0, 0)], ["water"], [square(0, 0)], ["building"])
    result = ap.result()
    assert result["mask_ap"] == result["box_ap50"] == 0.0  # 'building' has no truth: not scored


def test_a_false_positive_on_an_empty_image_lowers_precision():
    """Ranked first, the false positive gives precision 0 at recall 0 and 1/2 at recall 1; made
    non-increasing, precision is 1/2 at every recall point -> AP 0.5."""
    ranked = metrics.InstanceAP()
    ranked.add([square(0, 0)], ["water"], [square(0, 0)], ["water"], scores=[0.8])
    ranked.add([], [], [square(30, 30)], ["water"], scores=[0.9], shape=SIZE)
    assert ranked.result()["mask_ap"] == pytest.approx(0.5)
    # Constant scores (the default): ties keep the order added, so the same false positive after
    # the true one costs nothing (precision 1 at recall 1) and before it halves AP.
    for empty_first, expected in ((False, 1.0), (True, 0.5)):
        ap = metrics.InstanceAP()
        calls = [
            ([square(0, 0)], ["water"], [square(0, 0)], ["water"]),
            ([], [], [square(30, 30)], ["water"]),
        ]
        for call in reversed(calls) if empty_first else calls:
            ap.add(*call, shape=SIZE)
        assert ap.result()["box_ap"] == pytest.approx(expected), empty_first


def test_crowd_regions_are_ignored_and_no_truth_gives_minus_one():
    ap = metrics.InstanceAP()
    ap.add(
        [square(0, 0), square(30, 30)], ["water"] * 2, [square(0, 0), square(30, 30)],
        ["water"] * 2, gt_crowd=[False, True],
    )  # fmt: skip
    assert ap.result()["mask_ap"] == pytest.approx(1.0) and ap.result()["num_instances"] == 1
    empty = metrics.InstanceAP()
    empty.add([], [], [], [], shape=SIZE)
    assert empty.result() == dict.fromkeys(metrics.AP_NAMES, -1.0) | {"num_instances": 0}


def test_eval_json_has_instance_ap(setup, tmp_path, monkeypatch):  # noqa: F811
    """Ground-truth answers (test_evaluate's split: 0, 1 or 2 rectangles per image, one instance
    each): every box is found at its place; the masks are the test codec's round trip, whose random
    VQ-VAE decodes nothing like the truth (IoU < 0.5 on every image with water), so no mask
    matches."""
    cfg, model, params, _, rows = setup
    _PerfectSegmenter.answers = [row["suffix"] for row in rows]
    monkeypatch.setattr(segmenter_lib, "Segmenter", _PerfectSegmenter)
    evaluation.run_evaluation(cfg, model, params, str(tmp_path), "test")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_instances"] == sum(i % 3 for i in range(len(rows)))
    assert result["box_ap50"] == pytest.approx(1.0) and result["box_ap"] == pytest.approx(1.0)
    examples = [json.loads(x) for x in (tmp_path / "eval_examples.jsonl").read_text().splitlines()]
    assert all(e["ceiling_iou"] < 0.5 for e in examples if e["gt_objects"])
    assert result["mask_ap50"] == result["mask_ap"] == 0.0


def test_ground_truth_instances_of_coco_lines_and_class_id_masks(tmp_path):
    """COCO lines take their annotations (a polygon, a crowd RLE) from data.coco[split]; class-id
    masks are cut into connected parts per class, ignored pixels a crowd region per class."""
    from pycocotools import mask as mask_utils

    crowd = np.zeros(SIZE, np.uint8)
    crowd[40:50, 40:50] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd))
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": SIZE[0], "width": SIZE[1]}],
        "categories": [{"id": 1, "name": "water"}, {"id": 2, "name": "building"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 2, "iscrowd": 0,
             "segmentation": [[0, 0, 20, 0, 20, 10, 0, 10]]},
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": list(SIZE), "counts": rle["counts"].decode()}},
        ],
    }  # fmt: skip
    (tmp_path / "test.json").write_text(json.dumps(coco))
    cfg = ml_collections.ConfigDict({"data": {"coco": {"test": str(tmp_path / "test.json")}}})
    codec = types.SimpleNamespace(config=codec_lib.CodecConfig())
    line = pipeline.Example("a.png", "segment water ; building", "", "m.png", "x:1", None, 7)
    masks, labels, crowds = evaluation._instances(cfg, "test", codec, line, np.zeros(SIZE))
    assert labels == ["building", "water"] and crowds == [False, True]
    assert masks[0][:10, :20].all() and masks[1].sum() == 100

    index = np.zeros(SIZE, np.uint8)
    index[:5, :5] = index[20:30, 20:30] = 1  # two parts of water
    index[50:, 50:] = 2
    index[60:, :3] = classes_lib.IGNORE
    line = pipeline.Example("b.png", "segment water ; building", "", "b.png", "x:2",
                            ("water", "building"))  # fmt: skip
    masks, labels, crowds = evaluation._instances(cfg, "test", codec, line, index)
    assert labels == ["water", "water", "building", "water", "building"]
    assert crowds == [False, False, False, True, True]
    assert [int(m.sum()) for m in masks] == [25, 100, 196, 12, 12]
    whole = types.SimpleNamespace(config=codec_lib.CodecConfig(whole_mask=True))
    assert len(evaluation._instances(cfg, "test", whole, line, index)[0]) == 2 + 2
