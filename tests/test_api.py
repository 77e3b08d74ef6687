"""The Python API (`Segmenter.from_pretrained` + `predict`) on the tiny trained run, the predict and
evaluate CLIs given a workdir, and quiet command lines (no TensorFlow/absl C++ start-up lines)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from train_fixtures import REPO, reference_run, subprocess_env

from paligemma_seg import Segmenter, evaluate, predict

WATER = "water_body_2375.jpg"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return reference_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def seg(run_dir):
    return Segmenter.from_pretrained(run_dir)


def test_from_pretrained_workdir_predicts_masks_at_image_size(seg, water_dir):
    """README example: a workdir in, a Prediction with mask, boxes, labels, masks, text, valid."""
    path = water_dir / "images" / WATER
    result = seg.predict(path, prompt="segment water")
    with Image.open(path) as image:
        width, height = image.size
    assert result.mask.shape == (height, width) and result.mask.dtype == bool
    assert len(result.boxes) == len(result.labels) == len(result.masks) == result.objects
    union = np.zeros_like(result.mask)
    for box, label, mask in zip(result.boxes, result.labels, result.masks, strict=True):
        y1, x1, y2, x2 = box
        assert label == "water" and mask.shape == result.mask.shape
        assert not mask[:y1].any() and not mask[y2:].any()  # each object stays inside its box
        assert not mask[:, :x1].any() and not mask[:, x2:].any()
        union |= mask
    np.testing.assert_array_equal(union, result.mask)
    assert result.valid and isinstance(result.text, str)


def test_predict_batch_takes_paths_pil_and_arrays_like_predict(seg, water_dir):
    path = water_dir / "images" / WATER
    pixels = np.asarray(Image.open(path).convert("RGB"))
    grey = np.asarray(Image.open(path).convert("L"))
    batch = seg.predict_batch([path, Image.open(path), pixels, grey])
    single = seg.predict(str(path))
    for result in batch[:3]:
        assert result.text == single.text
        np.testing.assert_array_equal(result.mask, single.mask)
    assert batch[3].mask.shape == grey.shape
    with pytest.raises(ValueError, match=r"uint8\[H, W, 3\].*float32"):
        seg.predict(pixels.astype(np.float32))


def test_every_kind_of_path_loads_the_same_weights(seg, run_dir, water_dir):
    """The workdir, its params.npz, its checkpoints/ dir and a step dir give the same outputs
    (the 6-step run's newest checkpoint is its exported params)."""
    image = water_dir / "images" / WATER
    expected = seg.predict(image).text
    for path in (run_dir / "params.npz", run_dir / "checkpoints", run_dir / "checkpoints" / "6"):
        assert Segmenter.from_pretrained(path).predict(image).text == expected, path
    other = Segmenter.from_pretrained(run_dir / "checkpoints" / "3").predict(image)
    assert other.mask.shape == seg.predict(image).mask.shape


def test_from_pretrained_errors_name_the_path_and_the_fix(tmp_path, run_dir):
    with pytest.raises(
        ValueError,
        match=r"holds no weights: looked for .*checkpoints/STEP/state.*params\.npz.*paligemma_seg\.train",
    ):
        Segmenter.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        Segmenter.from_pretrained(tmp_path / "missing")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "params.npz").write_bytes((run_dir / "params.npz").read_bytes())
    with pytest.raises(ValueError, match=r"no training config found .*config='configs/NAME\.py'"):
        Segmenter.from_pretrained(alone / "params.npz")
    config = run_dir / "config.json"  # params.npz + config: the config given explicitly
    result = Segmenter.from_pretrained(alone / "params.npz", config=config)
    assert result.cfg.model.preset == "tiny"


def test_predict_cli_with_workdir_and_no_config_logs_the_file(
    seg, run_dir, water_dir, tmp_path, capfd
):
    image = water_dir / "images" / WATER
    out = tmp_path / "out"
    assert predict.main(["predict", "--workdir", str(run_dir), str(image), "--out", str(out)]) == 0
    assert f"Weights: {run_dir / 'checkpoints' / '6'}" in capfd.readouterr().err
    mask = np.asarray(Image.open(out / f"{image.stem}_mask.png")) > 0
    np.testing.assert_array_equal(mask, seg.predict(image).mask)
    # --checkpoint accepts the workdir too (it used to demand model.safetensors there).
    out2 = tmp_path / "out2"
    assert (
        predict.main(["predict", "--checkpoint", str(run_dir), str(image), "--out", str(out2)]) == 0
    )
    assert (out2 / f"{image.stem}_mask.png").read_bytes() == (
        out / f"{image.stem}_mask.png"
    ).read_bytes()


def test_evaluate_takes_a_workdir_as_checkpoint_and_its_config(seg, run_dir, tmp_path, capfd):
    """(The tiny run's data has no mask files to score, so this checks what evaluate loads.)"""
    from paligemma_seg.infer import segmenter as segmenter_lib

    step_dir = str(run_dir / "checkpoints" / "6")
    assert segmenter_lib.params_source(seg.cfg, str(run_dir)) == step_dir
    assert segmenter_lib.params_source(seg.cfg, None, str(run_dir)) == step_dir
    assert evaluate.main(["evaluate", "--checkpoint", str(run_dir), f"--workdir={tmp_path}"]) == 1
    err = capfd.readouterr().err
    assert f"Config: {run_dir / 'config.json'}" in err and f"Weights: {step_dir}" in err
    assert "have no 'mask'" in err  # the data's problem, reached after loading
    assert evaluate.main(["evaluate", f"--workdir={tmp_path / 'empty'}"]) == 1
    assert f"{tmp_path / 'empty'} not found" in capfd.readouterr().err


STARTUP_CHATTER = ("oneDNN custom operations", "absl::InitializeLog()", "cpu_feature_guard")


def test_cli_output_has_no_tensorflow_startup_lines_but_keeps_our_warnings(
    run_dir, water_dir, tmp_path
):
    env = subprocess_env()
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
        env.pop(name, None)  # what a user's shell has
    image = str(water_dir / "images" / WATER)
    base = [sys.executable, "-m", "paligemma_seg.predict", image]
    runs = {
        "workdir": base + ["--workdir", str(run_dir), "--out", str(tmp_path / "a")],
        "random": base
        + ["--config", str(REPO / "configs" / "water_micro.py"), "--out", str(tmp_path / "b")],
    }
    children = {
        name: subprocess.Popen(
            args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, args in runs.items()
    }
    output = {name: child.communicate(timeout=300)[0] for name, child in children.items()}
    assert children["workdir"].returncode == 0, output["workdir"][-3000:]
    assert children["random"].returncode == 0, output["random"][-3000:]
    for text in output.values():
        for line in STARTUP_CHATTER:
            assert line not in text, text[:2000]
    assert "Weights: " in output["workdir"] and "1 images predicted" in output["workdir"]
    assert (
        "WARNING No --checkpoint and no init in the config: using RANDOM weights"
        in output["random"]
    )
    assert os.path.exists(tmp_path / "b" / "predictions.jsonl")
