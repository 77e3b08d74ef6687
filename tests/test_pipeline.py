"""JSONL -> tf.data batches: the batch contract, a restartable order independent of the host split, and
errors that name the file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from train_fixtures import PREFIX, TOKENIZER, write_dataset

from paligemma_seg.data import pipeline
from paligemma_seg.tokenizer import Tokenizer

SEQ_LEN = 32
SIZE = 28


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("pipeline"), num=12)
    examples = pipeline.read_jsonl(root / "train.jsonl")
    return pipeline.tokenize(examples, Tokenizer.load(TOKENIZER), SEQ_LEN)


def _batches(table, rows, start_step=0, count=3, batch_size=4):
    it = pipeline.train_batches(
        table, batch_size=batch_size, rows=rows, image_size=SIZE, seed=7, start_step=start_step,
        num_parallel_calls=2,
    )  # fmt: skip
    return [next(it) for _ in range(count)]


def test_pipeline_batch_contract(table):
    (batch,) = _batches(table, slice(0, 4), count=1)
    assert set(batch) == set(pipeline.BATCH_KEYS)
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() < -0.9 and 0.9 < batch["image"].max() <= 1.0
    for key in pipeline.TEXT_KEYS:
        assert batch[key].shape == (4, SEQ_LEN) and batch[key].dtype == np.int32
    # [BOS] prefix "\n" suffix [EOS] pad: loss only on suffix + EOS, which is causal and real.
    tokenizer = Tokenizer.load(TOKENIZER)
    head = 2 + len(tokenizer.encode(PREFIX))
    assert (batch["text"][:, 0] == tokenizer.bos_id).all()
    assert (batch["mask_loss"][:, :head] == 0).all() and (batch["mask_ar"][:, :head] == 0).all()
    assert (batch["mask_loss"] <= batch["mask_ar"] * batch["mask_input"]).all()
    assert (batch["mask_loss"].sum(1) > 16).all()


def test_pipeline_order_independent_of_process_split(table):
    whole = _batches(table, slice(0, 4))
    first, second = _batches(table, slice(0, 2)), _batches(table, slice(2, 4))
    for full, a, b in zip(whole, first, second, strict=True):
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(full[key], np.concatenate([a[key], b[key]]))


def test_pipeline_resumes_at_step(table):
    fresh = _batches(table, slice(0, 4), count=5)
    resumed = _batches(table, slice(0, 4), start_step=3, count=2)
    for key in pipeline.BATCH_KEYS:
        np.testing.assert_array_equal(fresh[3][key], resumed[0][key])
        np.testing.assert_array_equal(fresh[4][key], resumed[1][key])


def test_pipeline_epochs_are_seeded_permutations():
    order = pipeline.example_indices(8, seed=3, shuffle=True, start=0, count=24)
    for epoch in range(3):
        assert sorted(order[8 * epoch : 8 * epoch + 8]) == list(range(8))
    assert not np.array_equal(order[:8], order[8:16])  # reshuffled every epoch
    np.testing.assert_array_equal(order, pipeline.example_indices(8, 3, True, 0, 24))
    np.testing.assert_array_equal(order[5:13], pipeline.example_indices(8, 3, True, 5, 8))
    assert not np.array_equal(order, pipeline.example_indices(8, 4, True, 0, 24))
    np.testing.assert_array_equal(pipeline.example_indices(8, 3, False, 6, 4), [6, 7, 0, 1])


def test_pipeline_eval_batches_pad_without_loss(table):
    batches = list(
        pipeline.eval_batches(
            table, batch_size=5, rows=slice(0, 5), image_size=SIZE, max_examples=7
        )
    )
    assert len(batches) == 2
    assert batches[1]["image"].shape[0] == 5
    assert (batches[1]["mask_loss"][2:] == 0).all() and (
        batches[1]["mask_loss"][:2].sum(1) > 0
    ).all()
    np.testing.assert_array_equal(batches[0]["text"], table.text[:5])


def test_pipeline_image_values_match_numpy_resize(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    tf.io.write_file(str(path), tf.io.encode_png(pixels))
    np.testing.assert_allclose(pipeline.load_image(str(path), 28), pixels / 127.5 - 1.0, atol=1e-6)


def test_pipeline_malformed_line_names_file_and_line(tmp_path):
    root = write_dataset(tmp_path, num=6)
    path = root / "train.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"image": "images/0.png", "prefix": ', lines[1]]) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not valid JSON"):
        pipeline.read_jsonl(path)
    path.write_text(lines[0] + "\n" + json.dumps({"image": "images/0.png"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: expected an object with keys"):
        pipeline.read_jsonl(path)


def test_pipeline_missing_image_names_file_and_line(tmp_path):
    root = write_dataset(tmp_path, num=6)
    (root / "images" / "1.png").unlink()
    with pytest.raises(ValueError, match=r"train\.jsonl:2: image .*1\.png not found"):
        pipeline.read_jsonl(root / "train.jsonl")
    with pytest.raises(ValueError, match=r"nope\.jsonl not found; write it with"):
        pipeline.read_jsonl(root / "nope.jsonl")


def test_pipeline_keeps_tensorflow_off_accelerators():
    assert tf.config.get_visible_devices("GPU") == []
