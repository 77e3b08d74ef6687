"""ckpt.keep_best / ckpt.early_stop_patience (train/best.py) and TensorBoard events
(train/tensorboard.py): the tracker's rules, a tiny run that stops early and keeps its best
checkpoint, and the event files TensorBoard reads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from train_fixtures import reference_data, tiny_config

from paligemma_seg.train import best as best_lib
from paligemma_seg.train import loop as train_loop
from paligemma_seg.train.tensorboard import EventWriter


def _events(logdir) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(step, value)] of every event file in `logdir`."""
    import tensorflow as tf

    found: dict[str, list] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                content = tf.make_ndarray(value.tensor)
                found.setdefault(value.tag, []).append((event.step, content))
    return found


def test_tracker_keeps_the_best_and_counts_patience():
    records = [
        {"step": 1, "loss": 9.0},
        {"step": 2, "val_loss": 3.0},
        {"step": 4, "val_loss": 2.5},  # best
        {"step": 6, "val_loss": 2.5},  # equal is not better
        {"step": 8, "val_loss": 2.7},
    ]
    tracker = best_lib.BestTracker("val_loss", patience=2, records=records)
    assert (tracker.best, tracker.best_step, tracker.since) == (2.5, 4, 2)
    assert tracker.should_stop
    miou = best_lib.BestTracker("miou", patience=0, records=[{"step": 2, "eval_miou": 0.4}])
    assert miou.update({"step": 4, "eval_miou": 0.5}) and not miou.update(
        {"step": 6, "eval_miou": 0.45}
    )
    assert not miou.should_stop  # patience 0: never


def test_config_errors_say_what_to_set(tmp_path):
    cases = {
        (("ckpt.keep_best", "loss"),): "use 'val_loss', 'miou'",
        (("ckpt.early_stop_patience", 2),): "needs a metric to watch",
        (("ckpt.keep_best", "val_loss"), ("val_steps", 0)): "set val_steps > 0",
        (("ckpt.keep_best", "miou"), ("eval_steps", 0)): "set eval_steps > 0",
    }
    for settings, message in cases.items():
        cfg = tiny_config(tmp_path, **dict(settings))
        with pytest.raises(ValueError, match=message):
            best_lib.from_config(cfg, [])


def test_run_stops_early_keeps_best_and_writes_tensorboard(tmp_path_factory):
    """lr 0: the validation loss never improves after step 1, so patience 2 stops after step 3."""
    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path_factory.mktemp("early_stop")
    cfg = tiny_config(
        reference_data(base), total_steps=8, val_steps=1, ckpt_steps=0,
        **{"optim.lr": 0.0, "ckpt.keep_best": "val_loss", "ckpt.early_stop_patience": 2},
    )  # fmt: skip
    result = train_loop.run(cfg, str(workdir))
    assert result["early_stopped_at"] == 3
    assert (workdir / "params.npz").exists() and (workdir / "params_best.npz").exists()
    assert sorted(p.name for p in (workdir / "checkpoints_best").iterdir() if p.name.isdigit()) == [
        "1"
    ]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    with np.load(workdir / "params_best.npz") as best, np.load(workdir / "params.npz") as last:
        for key in best.files:  # lr 0: the best (step 1) and the last (step 3) weights agree
            np.testing.assert_array_equal(best[key], last[key])
    events = _events(workdir)
    for tag in ("loss", "lr", "grad_norm", "examples_per_s", "val_loss"):
        assert [step for step, _ in events[tag]] == [1, 2, 3], tag
    # Resuming the stopped run stops again at once (the tracker replays metrics.jsonl).
    again = train_loop.run(cfg, str(workdir))
    assert again["early_stopped_at"] == 3


def test_event_writer_logs_evaluation_numbers_and_the_contact_sheet(tmp_path):
    sheet = tmp_path / "contact_sheet.png"
    Image.fromarray(np.full((12, 20, 3), 200, np.uint8)).save(sheet)
    writer = EventWriter(tmp_path)
    writer.evaluation({"miou": 0.5, "ciou": 0.25, "dice": 0.75, "contact_sheet": str(sheet)}, 7)
    writer.close()
    events = _events(tmp_path)
    assert float(events["eval_miou"][0][1]) == 0.5 and events["eval_miou"][0][0] == 7
    width, height, png = events["contact_sheet"][0][1]  # image summaries: (width, height, PNG)
    assert (int(width), int(height)) == (20, 12) and png.startswith(b"\x89PNG")
