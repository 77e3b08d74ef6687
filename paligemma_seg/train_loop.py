"""The training run: setup (mesh, model, data, state) -> jitted sharded steps -> logs, checkpoints, eval.

Owns the order of things in a run and what it writes to WORKDIR: config.json, metrics.jsonl (process 0),
checkpoints/ (all processes), params.npz at the end (process 0) and whatever evaluation writes. Where the
run starts is documented in `checkpoint.py` (workdir checkpoint -> `init` -> random init).
SIGTERM/SIGINT (single process) or a JAX preemption notice (multi-process) save a checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from paligemma_seg import checkpoint, experiment, optim, sharding
from paligemma_seg.data import pipeline
from paligemma_seg.model import logical_axes, param_shapes
from paligemma_seg.train_step import TrainState, make_eval_step, make_train_step

# Test hook for preemption tests: after this step (and its checkpoint) the run waits for a signal.
PAUSE_ENV = "PALIGEMMA_SEG_PAUSE_AFTER_STEP"


def every(step: int, period: int, last: int) -> bool:
    """True at multiples of `period` (> 0) and at the last step."""
    return period > 0 and (step % period == 0 or step == last)


@dataclasses.dataclass
class Setup:
    """Everything built before the first step."""

    mesh: Any
    model: Any
    train_step: Any  # jitted (state, batch, rng) -> (state, metrics)
    eval_step: Any  # jitted (params, batch) -> (loss sum, tokens)
    state: TrainState
    state_shardings: TrainState
    abstract_state: TrainState
    rng: jax.Array
    start_step: int
    checkpointer: checkpoint.Checkpointer
    train_table: pipeline.TokenTable
    val_table: pipeline.TokenTable | None
    image_size: int


class _StopFlag:
    """Set by SIGTERM/SIGINT (single process); the loop saves and stops at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if jax.process_count() > 1:
            return  # JAX's preemption notifier owns SIGTERM; see `_should_stop`.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _should_stop(flag: _StopFlag, step: int) -> bool:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(step))
    return flag.signal is not None


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _load_tables(
    cfg: ml_collections.ConfigDict, tokenizer: Any
) -> tuple[pipeline.TokenTable, pipeline.TokenTable | None]:
    splits = (cfg.data.train_split,) + ((cfg.data.val_split,) if cfg.val_steps > 0 else ())
    paths = experiment.prepare_data(cfg, tuple(dict.fromkeys(splits)))
    tables = {}
    for split, path in paths.items():
        tables[split] = pipeline.tokenize(pipeline.read_jsonl(path), tokenizer, cfg.seq_len)
        if tables[split].dropped_objects:
            logging.warning(
                "%s: %d objects did not fit seq_len=%d and were dropped",
                path, tables[split].dropped_objects, cfg.seq_len,
            )  # fmt: skip
    return tables[cfg.data.train_split], tables.get(
        cfg.data.val_split
    ) if cfg.val_steps > 0 else None


def setup(cfg: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Builds mesh, model, data tables, optimizer, shardings and the (restored or fresh) state."""
    optim_cfg = optim.OptimConfig(**cfg.optim.to_dict())
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    rules = sharding.get_rules(cfg.mesh.strategy)
    sharding.check_batch(mesh, cfg.batch_size, optim_cfg.grad_accum)
    model, model_cfg = experiment.build_model(cfg)
    tokenizer = experiment.load_tokenizer(cfg)
    experiment.check_init(cfg)
    train_table, val_table = _load_tables(cfg, tokenizer)

    abstract_params = param_shapes(model_cfg)
    mask = optim.trainable_mask(abstract_params, optim_cfg.trainable)
    if optim_cfg.frozen_dtype:
        abstract_params = jax.eval_shape(
            lambda p: optim.cast_frozen(p, mask, optim_cfg.frozen_dtype), abstract_params
        )
    tx, schedule = optim.make_optimizer(optim_cfg, cfg.total_steps)
    specs, rows = sharding.param_specs(abstract_params, logical_axes(model_cfg), mesh, rules)
    sharding.log_table(rows, mesh)
    trainable_abstract, _ = optim.split_params(abstract_params, mask)
    trainable_specs, _ = optim.split_params(specs, mask)
    abstract_opt = jax.eval_shape(tx.init, trainable_abstract)
    opt_specs = sharding.opt_state_specs(tx, abstract_opt, trainable_specs, trainable_abstract)
    state_shardings = TrainState(
        step=sharding.replicated(mesh),
        params=sharding.to_shardings(mesh, specs),
        opt_state=sharding.to_shardings(mesh, opt_specs),
    )
    abstract_state = _abstract(
        TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt
        ),
        state_shardings,
    )
    _log_sizes(abstract_params, mask, abstract_opt)

    checkpointer = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=cfg.ckpt.keep, async_save=cfg.ckpt.async_save
    )
    rng = jax.device_put(jax.random.PRNGKey(cfg.seed), sharding.replicated(mesh))
    state, rng, start = _start_state(
        cfg, checkpointer, abstract_state, state_shardings, model, mask, tx, rng
    )

    batch_shardings = {k: sharding.batch_sharding(mesh) for k in pipeline.BATCH_KEYS}
    step_fn = make_train_step(
        model, tx, schedule, mask, grad_accum=optim_cfg.grad_accum, rules=rules
    )
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(model, rules),
        in_shardings=(state_shardings.params, batch_shardings),
        out_shardings=sharding.replicated(mesh),
    )
    return Setup(
        mesh=mesh, model=model, train_step=train_step, eval_step=eval_step, state=state,
        state_shardings=state_shardings, abstract_state=abstract_state, rng=rng, start_step=start,
        checkpointer=checkpointer, train_table=train_table, val_table=val_table,
        image_size=model_cfg.vision.image_size,
    )  # fmt: skip


def _log_sizes(abstract_params: Any, mask: Any, abstract_opt: Any) -> None:
    trainable, _ = optim.split_params(abstract_params, mask)
    logging.info(
        "Parameters: %s total, %s trainable; optimizer state: %s scalars",
        f"{optim.count_params(abstract_params):,}", f"{optim.count_params(trainable):,}",
        f"{optim.count_params(abstract_opt):,}",
    )  # fmt: skip


def _start_state(
    cfg: ml_collections.ConfigDict,
    checkpointer: checkpoint.Checkpointer,
    abstract_state: TrainState,
    shardings: TrainState,
    model: Any,
    mask: Any,
    tx: Any,
    rng: jax.Array,
) -> tuple[TrainState, jax.Array, int]:
    """Resume order (checkpoint.py): 1. workdir checkpoint, 2. cfg.init, 3. random init."""
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract = {
            "state": abstract_state,
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rng.sharding),
        }
        restored, meta = checkpointer.restore(latest, abstract)
        _check_meta(cfg, meta)
        logging.info(
            "Resuming from %s/%d (data position: %d examples)",
            checkpointer.directory,
            latest,
            meta["examples_seen"],
        )
        return restored["state"], restored["rng"], latest
    init_key, _ = jax.random.split(jax.random.PRNGKey(cfg.seed))
    logging.info("Starting from %s", cfg.init or "random initialisation")
    params = experiment.initial_params(cfg, model, init_key, shardings.params)
    frozen_dtype = cfg.optim.frozen_dtype
    cast = jax.jit(
        lambda p: optim.cast_frozen(p, mask, frozen_dtype), out_shardings=shardings.params
    )
    params = cast(params)
    init_opt = jax.jit(
        lambda p: tx.init(optim.split_params(p, mask)[0]), out_shardings=shardings.opt_state
    )
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
        params=params,
        opt_state=init_opt(params),
    )
    return state, rng, 0


def _check_meta(cfg: ml_collections.ConfigDict, meta: dict[str, Any]) -> None:
    """The data position is only meaningful for the same batch size and seed."""
    for key in ("batch_size", "seed"):
        if meta.get(key) != cfg[key]:
            raise ValueError(
                f"the checkpoint was written with {key}={meta.get(key)} but the config says {cfg[key]}; "
                f"resume with --config.{key}={meta.get(key)} or use a new --workdir."
            )


def _meta(cfg: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "examples_seen": step * cfg.batch_size,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }


class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl (process 0 only)."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        self.enabled = jax.process_index() == 0
        if self.enabled and os.path.exists(
            path
        ):  # Drop lines a killed run wrote after its last checkpoint.
            with open(path, encoding="utf-8") as f:
                kept = [
                    line
                    for line in f
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                ]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _batches(cfg: ml_collections.ConfigDict, s: Setup) -> Iterator[dict[str, jax.Array]]:
    rows = sharding.local_batch_rows(s.mesh, cfg.batch_size)
    local = pipeline.train_batches(
        s.train_table, batch_size=cfg.batch_size, rows=rows, image_size=s.image_size, seed=cfg.seed,
        shuffle=cfg.data.shuffle_buffer > 0, start_step=s.start_step,
        num_parallel_calls=cfg.data.num_parallel_calls, prefetch=cfg.data.prefetch,
    )  # fmt: skip
    batch_sharding = sharding.batch_sharding(s.mesh)
    for batch in local:
        yield pipeline.to_global(batch, batch_sharding, cfg.batch_size)


def validation_loss(cfg: ml_collections.ConfigDict, s: Setup, params: Any) -> float:
    """Mean cross-entropy over the supervised tokens of the validation split."""
    rows = sharding.local_batch_rows(s.mesh, cfg.batch_size)
    batches = pipeline.eval_batches(
        s.val_table, batch_size=cfg.batch_size, rows=rows, image_size=s.image_size,
        max_examples=cfg.val_max_examples, num_parallel_calls=cfg.data.num_parallel_calls,
    )  # fmt: skip
    total = tokens = 0.0
    for batch in batches:
        loss_sum, count = jax.device_get(
            s.eval_step(
                params, pipeline.to_global(batch, sharding.batch_sharding(s.mesh), cfg.batch_size)
            )
        )
        total, tokens = total + float(loss_sum), tokens + float(count)
    return total / max(tokens, 1.0)


def _evaluate(
    cfg: ml_collections.ConfigDict, s: Setup, params: Any, workdir: str, step: int
) -> dict[str, Any] | None:
    """Calls paligemma_seg.evaluate.run_evaluation when that module exists."""
    if importlib.util.find_spec("paligemma_seg.evaluate") is None:
        logging.info(
            "Step %d: paligemma_seg.evaluate is not available yet; skipping evaluation.", step
        )
        return None
    from paligemma_seg import evaluate

    return evaluate.run_evaluation(cfg, s.model, params, workdir, cfg.eval.split, step=step)


def _save(cfg: ml_collections.ConfigDict, s: Setup, state: TrainState, step: int) -> None:
    s.checkpointer.save(step, {"state": state, "rng": s.rng}, _meta(cfg, step))


def _export(cfg: ml_collections.ConfigDict, params: Any, workdir: str) -> None:
    """WORKDIR/params.npz in big_vision's format (process 0 writes; all processes gather)."""
    from jax.experimental import multihost_utils

    from paligemma_seg import weights

    host = (
        params
        if jax.process_count() == 1
        else multihost_utils.process_allgather(params, tiled=True)
    )
    if jax.process_index() == 0:
        path = weights.save_npz(jax.device_get(host), os.path.join(workdir, "params.npz"))
        logging.info("Exported trained weights to %s", path)


def _pause_for_signal(step: int, flag: _StopFlag) -> None:
    """Test hook (PAUSE_ENV): announce and wait until a signal arrives (or the process is killed)."""
    print(f"PAUSED after step {step}", file=sys.stderr, flush=True)
    while flag.signal is None:
        time.sleep(0.05)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `cfg` in `workdir`; returns the last logged metrics (and eval results, if any)."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    s = setup(cfg, workdir)
    with jax.set_mesh(s.mesh):
        return _loop(cfg, s, workdir)


def _loop(cfg: ml_collections.ConfigDict, s: Setup, workdir: str) -> dict[str, Any]:
    total, state, step = cfg.total_steps, s.state, s.start_step
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), step)
    flag = _StopFlag()
    flag.install()
    pause_after = int(os.environ.get(PAUSE_ENV, "-1"))
    tokens_per_example = cfg.seq_len + s.model.config.num_image_tokens
    bar = tqdm.tqdm(
        total=total, initial=step, disable=jax.process_index() != 0, unit="step", dynamic_ncols=True
    )
    batches = _batches(cfg, s)
    last: dict[str, Any] = {}
    window_start, window_steps, pending = time.perf_counter(), 0, None
    try:
        with jax.transfer_guard("disallow"):
            while step < total:
                if _should_stop(flag, step):
                    logging.warning(
                        "Stop requested (signal %s): saving step %d and exiting.", flag.signal, step
                    )
                    break
                state, metrics = s.train_step(state, next(batches), s.rng)
                step, window_steps, pending = step + 1, window_steps + 1, metrics
                bar.update(1)
                if every(step, cfg.log_steps, total):
                    values = {k: float(v) for k, v in jax.device_get(pending).items()}
                    if not np.isfinite(values["loss"]):
                        raise RuntimeError(
                            f"loss is {values['loss']} at a step in ({step - window_steps}, {step}]; "
                            "lower optim.lr or raise optim.warmup_steps."
                        )
                    seconds = time.perf_counter() - window_start
                    rate = window_steps * cfg.batch_size / seconds
                    last = {
                        "step": step,
                        **values,
                        "examples_per_s": rate,
                        "tokens_per_s": rate * tokens_per_example,
                    }
                    writer.write(last)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", ex_s=f"{rate:.1f}")
                    window_start, window_steps = time.perf_counter(), 0
                if cfg.val_steps > 0 and every(step, cfg.val_steps, total):
                    with jax.transfer_guard("allow"):
                        val = validation_loss(cfg, s, state.params)
                    writer.write({"step": step, "val_loss": val})
                    if jax.process_index() == 0:
                        bar.write(f"step {step}: val_loss {val:.4f}")
                    window_start = time.perf_counter()
                if every(step, cfg.ckpt_steps, total) and step < total:
                    _save(cfg, s, state, step)
                if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < total:
                    with jax.transfer_guard("allow"):
                        _evaluate(cfg, s, state.params, workdir, step)
                if step == pause_after:
                    s.checkpointer.wait()
                    _pause_for_signal(step, flag)
    finally:
        bar.close()
        flag.restore()
    _save(cfg, s, state, step)
    s.checkpointer.close()
    if step < total:
        logging.info("Saved step %d after a stop request; rerun the same command to resume.", step)
        return {**last, "stopped_at": step}
    if cfg.ckpt.export_npz:
        _export(cfg, state.params, workdir)
    if cfg.eval_steps > 0:
        result = _evaluate(cfg, s, state.params, workdir, step)
        if result is not None:
            last = {**last, "eval": result}
    return last
