"""The training loop: batches -> jitted sharded steps -> logs, validation, checkpoints, evaluation.

Owns what a run writes to WORKDIR (a local path or gs://...): config.json, metrics.jsonl and the
same numbers as TensorBoard events (process 0), checkpoints/ (all processes), params.npz at the end
(process 0), with ckpt.keep_best checkpoints_best/ and params_best.npz (`train/best.py`), and
whatever evaluation writes.
Setup (shapes, shardings, where the run starts) lives in train/setup.py. SIGTERM/SIGINT (one
process) or JAX's preemption notice (several processes) make the loop save a checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath

from paligemma_seg import sharding, weights
from paligemma_seg.data import pipeline
from paligemma_seg.infer import evaluation
from paligemma_seg.model import lora
from paligemma_seg.train import best as best_lib
from paligemma_seg.train import checkpoint
from paligemma_seg.train.setup import Setup, checkpoint_meta, checkpoint_tree, setup
from paligemma_seg.train.step import TrainState
from paligemma_seg.train.tensorboard import EventWriter

# Test hook of the preemption tests: after this step (and its checkpoint) wait for a signal.
PAUSE_ENV = "PALIGEMMA_SEG_PAUSE_AFTER_STEP"


def every(step: int, period: int, last: int) -> bool:
    """True at multiples of `period` (> 0) and at the last step."""
    return period > 0 and (step % period == 0 or step == last)


class StopFlag:
    """Set by SIGTERM/SIGINT (single process); the loop saves and stops at the next step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if jax.process_count() > 1:
            return  # JAX's preemption notifier owns SIGTERM; see `should_stop`.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        """Single process: a signal arrived. Several: all processes agree on a preemption notice."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signal is not None


class MetricsWriter:
    """One JSON object per line in WORKDIR/metrics.jsonl (process 0 only; local or gs://)."""

    def __init__(self, path: epath.Path, resume_step: int, board: EventWriter | None = None):
        self.path, self.board = path, board  # board: the same records as TensorBoard scalars
        self.enabled = jax.process_index() == 0
        self.remote = "://" in os.fspath(path)  # Object stores cannot append: rewrite the file.
        self.lines: list[str] = []
        if self.enabled and path.exists():  # Drop what a killed run logged after its checkpoint.
            lines = [line + "\n" for line in path.read_text().splitlines() if line.strip()]
            self.lines = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(self.lines))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        self.lines.append(line)
        if self.board is not None:
            self.board.scalars(record)
        if self.remote:
            self.path.write_text("".join(self.lines))
        else:
            with self.path.open("a") as f:
                f.write(line)


@dataclasses.dataclass
class Throughput:
    """Examples/s and tokens/s since the last log."""

    tokens_per_example: int  # image tokens + text tokens
    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0

    def rates(self, batch_size: int) -> dict[str, float]:
        examples = self.steps * batch_size / (time.perf_counter() - self.start)
        return {"examples_per_s": examples, "tokens_per_s": examples * self.tokens_per_example}

    def reset(self) -> None:
        self.start, self.steps = time.perf_counter(), 0


def _batches(cfg: ml_collections.ConfigDict, s: Setup) -> Iterator[dict[str, jax.Array]]:
    """Global batches start_step, start_step + 1, ... (each process feeds its own rows)."""
    mesh = s.plan.mesh
    rows = sharding.local_batch_rows(mesh, cfg.batch_size)
    local = pipeline.train_batches(
        s.train_table, batch_size=cfg.batch_size, rows=rows,
        image_size=s.plan.model.config.vision.image_size, seed=cfg.seed,
        shuffle=cfg.data.shuffle_buffer > 0, start_step=s.start_step,
        num_parallel_calls=cfg.data.num_parallel_calls, prefetch=cfg.data.prefetch,
    )  # fmt: skip
    for batch in local:
        yield pipeline.to_global(batch, sharding.batch_sharding(mesh), cfg.batch_size)


def validation_loss(cfg: ml_collections.ConfigDict, s: Setup, params: Any) -> float:
    """Mean cross-entropy over the supervised tokens of the validation split."""
    mesh = s.plan.mesh
    rows = sharding.local_batch_rows(mesh, cfg.batch_size)
    batches = pipeline.eval_batches(
        s.val_table, batch_size=cfg.batch_size, rows=rows,
        image_size=s.plan.model.config.vision.image_size, max_examples=cfg.val_max_examples,
        num_parallel_calls=cfg.data.num_parallel_calls,
    )  # fmt: skip
    total = tokens = 0.0
    for batch in batches:
        batch = pipeline.to_global(batch, sharding.batch_sharding(mesh), cfg.batch_size)
        loss_sum, count = jax.device_get(s.plan.eval_step(params, batch))
        total, tokens = total + float(loss_sum), tokens + float(count)
    return total / max(tokens, 1.0)


def evaluate(
    cfg: ml_collections.ConfigDict, s: Setup, params: Any, workdir: str, step: int
) -> dict[str, Any]:
    """Decodes and scores the eval split (`infer.evaluation.run_evaluation`)."""
    return evaluation.run_evaluation(cfg, s.plan.model, params, workdir, cfg.eval.split, step=step)


def _export(params: Any, workdir: str, name: str = "params.npz") -> None:
    """WORKDIR/params.npz in big_vision's format, streamed: one leaf on the host at a time.

    Several processes: each leaf is gathered (every process takes part, in the same sorted key
    order) and process 0 writes it; nobody holds the whole tree.
    """
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        gather = lambda leaf: np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    else:
        gather = lambda leaf: np.asarray(jax.device_get(leaf))
    # LoRA adapters folded in (W + alpha/r B A) and int8 leaves dequantised, one leaf at a time.
    merged = lora.merged_leaves(params)
    lazy = {key: (lambda build=build: gather(build())) for key, build in merged.items()}
    if jax.process_index() != 0:
        for key in sorted(lazy):
            lazy[key]()
        return
    target = epath.Path(workdir) / name
    if "://" not in os.fspath(target):
        weights.save_npz(lazy, target)
    else:  # weights.save_npz writes local files: stage, then copy to the bucket.
        with tempfile.TemporaryDirectory() as staging:
            local = weights.save_npz(lazy, os.path.join(staging, name))
            epath.Path(local).copy(target, overwrite=True)
    logging.info("Exported trained weights to %s", target)


def _export_adapters(params: Any, workdir: str) -> None:
    """LoRA runs: WORKDIR/adapter/, the adapters alone in PEFT's format (`weights.peft`), which
    `peft.PeftModel.from_pretrained(hf_base, WORKDIR/adapter)` serves over the base's HF export."""
    from jax.experimental import multihost_utils

    from paligemma_seg.weights import peft

    if not lora.flatten_adapters(params):
        return
    adapters = params[lora.COLLECTION]
    if jax.process_count() > 1:
        adapters = multihost_utils.process_allgather(adapters, tiled=True)
    adapters = jax.device_get(adapters)
    if jax.process_index() != 0:
        return
    base = {k: v for k, v in params.items() if k != lora.COLLECTION}
    target = epath.Path(workdir) / "adapter"
    with tempfile.TemporaryDirectory() as staging:
        local = peft.save_peft({**base, lora.COLLECTION: adapters}, staging)
        target.mkdir(parents=True, exist_ok=True)
        for name in (peft.CONFIG_FILE, peft.WEIGHTS_FILE):
            epath.Path(local / name).copy(target / name, overwrite=True)
    logging.info("Exported the LoRA adapters (PEFT format) to %s", target)


def _log_metrics(
    cfg: ml_collections.ConfigDict, metrics: dict[str, jax.Array], step: int, speed: Throughput
) -> dict[str, Any]:
    """Fetches the step's metrics, checks the loss is finite, adds the throughput."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(values["loss"]):
        raise RuntimeError(
            f"loss is {values['loss']} at a step in ({step - speed.steps}, {step}]; "
            "lower optim.lr, raise optim.warmup_steps or set optim.clip_norm."
        )
    record = {"step": step, **values, **speed.rates(cfg.batch_size)}
    speed.reset()
    return record


class Watch:
    """TensorBoard events, the best checkpoint (ckpt.keep_best) and early stopping of one run."""

    def __init__(self, cfg: ml_collections.ConfigDict, s: Setup, workdir: str):
        self.cfg, self.s, self.workdir = cfg, s, workdir
        path = epath.Path(workdir) / "metrics.jsonl"  # every process reads: same decisions
        lines = path.read_text().splitlines() if path.exists() else []
        records = [r for r in map(json.loads, filter(str.strip, lines))]
        self.tracker = best_lib.from_config(
            cfg, [r for r in records if r.get("step", 0) <= s.start_step]
        )
        self.board = EventWriter(workdir)
        self.keeper = None
        if self.tracker.key:
            self.keeper = checkpoint.Checkpointer(
                epath.Path(workdir) / best_lib.BEST_DIR, keep=1, async_save=cfg.ckpt.async_save
            )

    def record(self, record: dict[str, Any], state: TrainState) -> None:
        """A validation or evaluation record; keeps the state if it is the best so far."""
        if not self.tracker.update(record):
            return
        step = int(record["step"])
        logging.info("New best %s %.4f at step %d: keeping it", self.tracker.key,
                     self.tracker.best, step)  # fmt: skip
        tree = checkpoint_tree(state, self.s.rng)
        self.keeper.save(step, tree, checkpoint_meta(self.cfg, step))
        _export(state.params, self.workdir, best_lib.BEST_NPZ)

    def evaluation(self, result: dict[str, Any], step: int, state: TrainState) -> None:
        self.board.evaluation(result, step)
        self.record({"step": step, "eval_miou": result["miou"]}, state)

    def close(self) -> None:
        self.board.close()
        if self.keeper is not None:
            self.keeper.close()


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `cfg` in `workdir`; returns the last logged metrics (and eval results, if any)."""
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (epath.Path(workdir) / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    s = setup(cfg, workdir)
    watch = Watch(cfg, s, workdir)
    flag = StopFlag()
    flag.install()
    try:
        with jax.set_mesh(s.plan.mesh):
            state, last = _loop(cfg, s, workdir, flag, watch)
    finally:
        flag.restore()
    step = int(jax.device_get(state.step))
    logging.info("Saving the checkpoint of step %d", step)
    s.checkpointer.save(step, checkpoint_tree(state, s.rng), checkpoint_meta(cfg, step))
    s.checkpointer.close()
    logging.info("Checkpoint of step %d written", step)
    stopped_early = watch.tracker.should_stop
    if step < cfg.total_steps and not stopped_early:
        watch.close()
        logging.info("Saved step %d after a stop request; rerun the same command to resume.", step)
        return {**last, "stopped_at": step}
    if cfg.ckpt.export_npz:
        _export(state.params, workdir)
        _export_adapters(state.params, workdir)
    if cfg.eval_steps > 0 and not (stopped_early and step % cfg.eval_steps == 0):
        last = {**last, "eval": evaluate(cfg, s, state.params, workdir, step)}
        watch.evaluation(last["eval"], step, state)
    watch.close()
    return {**last, "early_stopped_at": step} if stopped_early else last


def _loop(
    cfg: ml_collections.ConfigDict, s: Setup, workdir: str, flag: StopFlag, watch: Watch
) -> tuple[TrainState, dict[str, Any]]:
    """Steps until total_steps or a stop request; returns the state and the last logged metrics."""
    total, state, step = cfg.total_steps, s.state, s.start_step
    writer = MetricsWriter(epath.Path(workdir) / "metrics.jsonl", step, watch.board)
    pause_after = int(os.environ.get(PAUSE_ENV, "-1"))
    speed = Throughput(cfg.seq_len + s.plan.model.config.num_image_tokens)
    bar = tqdm.tqdm(total=total, initial=step, unit="step", disable=jax.process_index() != 0)
    batches, last = _batches(cfg, s), {}
    with bar, jax.transfer_guard("disallow"):
        while step < total and not flag.should_stop(step) and not watch.tracker.should_stop:
            state, metrics = s.plan.train_step(state, next(batches), s.rng)
            step, speed.steps = step + 1, speed.steps + 1
            bar.update(1)
            if every(step, cfg.log_steps, total):
                last = _log_metrics(cfg, metrics, step, speed)
                writer.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", ex_s=f"{last['examples_per_s']:.1f}")
            if cfg.val_steps > 0 and every(step, cfg.val_steps, total):
                with jax.transfer_guard("allow"):
                    val_loss = validation_loss(cfg, s, state.params)
                writer.write({"step": step, "val_loss": val_loss})
                logging.info("Step %d: validation loss %.4f", step, val_loss)
                with jax.transfer_guard("allow"):
                    watch.record({"step": step, "val_loss": val_loss}, state)
                speed.reset()
            if every(step, cfg.ckpt_steps, total) and step < total:
                s.checkpointer.save(step, checkpoint_tree(state, s.rng), checkpoint_meta(cfg, step))
            if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < total:
                with jax.transfer_guard("allow"):
                    watch.evaluation(evaluate(cfg, s, state.params, workdir, step), step, state)
                speed.reset()
            if step == pause_after:
                s.checkpointer.wait()
                print(f"PAUSED after step {step}", file=sys.stderr, flush=True)
                while flag.signal is None:
                    time.sleep(0.05)
    started = time.perf_counter()
    batches.close()  # Stops the input pipeline's threads now, not whenever it is collected.
    logging.info("Training stopped at step %d; input pipeline closed in %.1f s", step,
                 time.perf_counter() - started)  # fmt: skip
    if watch.tracker.should_stop:
        logging.info("Early stop at step %d: %d evaluations without a better %s (best %.4f at step "
                     "%d)", step, watch.tracker.since, watch.tracker.key, watch.tracker.best,
                     watch.tracker.best_step)  # fmt: skip
    elif step < total:
        logging.warning("Stop requested (signal %s) at step %d: saving.", flag.signal, step)
    return state, last
