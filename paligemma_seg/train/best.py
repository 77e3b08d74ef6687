"""The best checkpoint and early stopping: `ckpt.keep_best` and `ckpt.early_stop_patience`.

`BestTracker` follows one metric of metrics.jsonl ('val_loss': lower is better; 'miou': the eval
split's mIoU, higher is better). A new best is kept beside the last K checkpoints, in
WORKDIR/checkpoints_best (one orbax step, the full training state) and exported as
WORKDIR/params_best.npz. After `early_stop_patience` evaluations without a new best, training stops
cleanly. On resume the tracker replays the metrics.jsonl records kept up to the resumed step, so
the best value and the patience count carry over.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import ml_collections

METRICS = {
    "val_loss": ("val_loss", min),
    "miou": ("eval_miou", max),
}  # name -> (record key, better)
BEST_DIR = "checkpoints_best"
BEST_NPZ = "params_best.npz"


class BestTracker:
    """Best value of `metric` so far, the step it came at, evaluations since then."""

    def __init__(self, metric: str, patience: int, records: Iterable[dict[str, Any]] = ()):
        self.key, self.better = METRICS[metric] if metric else (None, None)
        self.patience = patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.since = 0  # evaluations of `key` since the best
        for record in records:
            self.update(record)

    def update(self, record: dict[str, Any]) -> bool:
        """Takes one metrics record; True when it holds a new best of the tracked metric."""
        if self.key is None or self.key not in record:
            return False
        value = float(record[self.key])
        if not math.isfinite(value):
            self.since += 1
            return False
        if self.best is None or (self.better(value, self.best) == value and value != self.best):
            self.best, self.best_step, self.since = value, int(record["step"]), 0
            return True
        self.since += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since >= self.patience


def from_config(cfg: ml_collections.ConfigDict, records: Iterable[dict[str, Any]]) -> BestTracker:
    """The tracker of `ckpt.keep_best`/`ckpt.early_stop_patience`; inconsistent keys raise."""
    metric, patience = str(cfg.ckpt.keep_best), int(cfg.ckpt.early_stop_patience)
    if metric not in ("", *METRICS):
        raise ValueError(f"ckpt.keep_best={metric!r}; use 'val_loss', 'miou' or '' (off).")
    if patience < 0:
        raise ValueError(
            f"ckpt.early_stop_patience={patience} must be >= 0 (0 = never stop early)."
        )
    if patience and not metric:
        raise ValueError(
            "ckpt.early_stop_patience needs a metric to watch: set ckpt.keep_best to 'val_loss' or "
            "'miou'."
        )
    if metric == "val_loss" and cfg.val_steps <= 0:
        raise ValueError("ckpt.keep_best='val_loss' needs validation: set val_steps > 0.")
    if metric == "miou" and cfg.eval_steps <= 0:
        raise ValueError("ckpt.keep_best='miou' needs evaluation: set eval_steps > 0.")
    tracker = BestTracker(metric, patience, records)
    if tracker.best is not None:
        logging.info("Best %s so far: %.4f at step %d", metric, tracker.best, tracker.best_step)
    return tracker
