"""Two classes end to end: configs/landcover_tiny.py on generated water + built-up tiles (class-id
masks -> convert with data.classes -> joint prompts -> training -> per-class evaluation), and the
per-class outputs of predict."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from train_fixtures import REPO

from paligemma_seg import predict
from paligemma_seg.infer import segmenter
from paligemma_seg.segtokens import codec as codec_lib


@pytest.mark.slow
def test_landcover_tiny_short_run_reports_per_class_iou(tmp_path):
    tiles = tmp_path / "tiles"
    flags = {
        "total_steps": 40, "val_steps": 20, "ckpt_steps": 0, "log_steps": 10, "batch_size": 8,
        "data.synthetic.num_images": 200, "data.images": tiles / "images",
        "data.masks": tiles / "masks", "data.splits.train": tiles / "train_images.txt",
        "data.splits.test": tiles / "test_images.txt", "data.jsonl_dir": tmp_path / "jsonl",
        "data.num_parallel_calls": 1,
    }  # fmt: skip
    args = [
        sys.executable, "-m", "paligemma_seg.train",
        "--config", str(REPO / "configs" / "landcover_tiny.py"),
        "--workdir", str(tmp_path / "run"), *(f"--config.{k}={v}" for k, v in flags.items()),
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "jsonl" / "report.json").read_text())
    assert set(report["classes"]) == {"water", "building"}
    assert report["classes"]["building"]["images"] > 40  # about half of the 200 tiles
    line = json.loads((tmp_path / "jsonl" / "train.jsonl").read_text().splitlines()[0])
    assert line["prefix"] == "segment water ; building" and line["classes"] == ["water", "building"]
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < 0.9 * val[0], val
    scores = json.loads((run / "eval.json").read_text())
    assert set(scores["per_class_iou"]) == {"water", "building"}
    # 40 steps learn little (the IoUs of such short runs swing between 0.0 and 0.3): the test is
    # that both classes are scored, not how well.
    assert all(0.0 <= v <= 1.0 for v in scores["per_class_iou"].values()), scores
    assert scores["miou_classes"] == pytest.approx(np.mean(list(scores["per_class_iou"].values())))
    assert scores["valid_rate"] >= 0.9 and 0 <= scores["miou_nonempty"] <= 1
    examples = [json.loads(x) for x in (run / "eval_examples.jsonl").read_text().splitlines()]
    assert all(set(e["class_iou"]) == {"water", "building"} for e in examples)


def test_predict_writes_a_mask_per_class(tmp_path):
    """Two labelled objects -> NAME_mask_water.png, NAME_mask_building.png and an index PNG."""
    water = codec_lib.format_object([0, 0, 511, 1023], [3] * 16, "water")
    building = codec_lib.format_object([600, 100, 1000, 500], [9] * 16, "building")
    codec = codec_lib.MaskCodec(_FullVQ())
    text = codec_lib.join_objects([water, building])
    prediction = segmenter.to_prediction(codec, text, True, 40, 60)
    assert prediction.labels == ["water", "building"] and prediction.valid
    image = np.zeros((40, 60, 3), np.uint8)
    record = predict.write_outputs(tmp_path, "tile", image, prediction)
    assert record["classes"] == {
        "tile_mask_water.png": "water",
        "tile_mask_building.png": "building",
    }
    water_mask = np.asarray(Image.open(tmp_path / "tile_mask_water.png")) > 0
    building_mask = np.asarray(Image.open(tmp_path / "tile_mask_building.png")) > 0
    index = np.asarray(Image.open(tmp_path / "tile_index.png"))
    y1, x1, y2, x2 = codec_lib.locs_to_box(np.array([0, 0, 511, 1023]), 40, 60)
    assert water_mask[y1:y2, x1:x2].all() and water_mask.sum() == (y2 - y1) * (x2 - x1)
    np.testing.assert_array_equal(index == 1, water_mask)
    np.testing.assert_array_equal(index == 2, building_mask & ~water_mask)
    np.testing.assert_array_equal(prediction.mask, water_mask | building_mask)


class _FullVQ:
    """A stand-in VQ-VAE whose every code decodes to a full box (positive logits)."""

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.ones((len(codes), 64, 64, 1), np.float32)
