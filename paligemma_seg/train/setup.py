"""What a run builds before its first step: the plan (shapes, shardings, jitted steps), the state.

`make_plan` allocates nothing and reads no file unless soft `<loc>`/`<seg>` targets are on (their
tables come from the tokenizer and codec), so scripts/memory_plan.py compiles its step on abstract
arrays; `setup` adds the data tables, the checkpoint manager and the starting state, in the resume
order documented in train/checkpoint.py (workdir checkpoint -> `init` -> random init).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from paligemma_seg import experiment, sharding
from paligemma_seg.data import pipeline, prepare
from paligemma_seg.model import logical_axes, param_shapes
from paligemma_seg.train import checkpoint, loss, optim
from paligemma_seg.train.step import TrainState, make_eval_step, make_train_step


@dataclasses.dataclass
class Plan:
    """Shapes, shardings and jitted steps of a config on a mesh; no arrays yet."""

    mesh: Any
    model: Any
    mask: Any  # bool tree: trainable parameters
    tx: Any  # optax transform of the trainable subtree
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    batch_shardings: dict[str, Any]
    train_step: Any  # jitted (state, batch, rng) -> (state, metrics); donates the state
    eval_step: Any  # jitted (params, batch) -> (loss sum, supervised tokens)
    table: list[tuple[str, tuple[int, ...], str, str]]  # parameter sharding table

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs of one global batch (for compiling without data)."""
        side = self.model.config.vision.image_size
        shapes = {"image": ((batch_size, side, side, 3), jnp.float32)}
        shapes.update({k: ((batch_size, seq_len), jnp.int32) for k in pipeline.TEXT_KEYS})
        return {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_shardings[k])
            for k, (shape, dtype) in shapes.items()
        }


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def make_plan(cfg: ml_collections.ConfigDict, mesh: Any) -> Plan:
    """Model, trainable mask, optimizer, state shardings and jitted steps for `cfg` on `mesh`."""
    optim_cfg = optim.OptimConfig(**cfg.optim.to_dict())
    rules = sharding.get_rules(cfg.mesh.strategy)
    sharding.check_batch(mesh, cfg.batch_size, optim_cfg.grad_accum)
    model, model_cfg = experiment.build_model(cfg)
    abstract_params, axes = param_shapes(model_cfg), logical_axes(model_cfg)
    if optim_cfg.lora.rank:  # Adapters in params['lora'] (model/lora.py).
        abstract_params, axes = optim.with_adapters(abstract_params, axes, optim_cfg.lora)
    mask = optim.trainable_mask(abstract_params, optim_cfg.trainable)
    if optim_cfg.frozen_dtype:
        abstract_params = optim.frozen_storage(abstract_params, mask, optim_cfg.frozen_dtype)
        axes = optim.storage_axes(axes, abstract_params)
    tx, schedule = optim.make_optimizer(optim_cfg, cfg.total_steps)
    specs, table = sharding.param_specs(abstract_params, axes, mesh, rules)
    trainable_abstract, _ = optim.split_params(abstract_params, mask)
    trainable_specs, _ = optim.split_params(specs, mask)
    abstract_opt = jax.eval_shape(tx.init, trainable_abstract)
    opt_specs = sharding.opt_state_specs(tx, abstract_opt, trainable_specs, trainable_abstract)
    replicated = sharding.replicated(mesh)
    state_shardings = TrainState(
        step=replicated,
        params=sharding.to_shardings(mesh, specs),
        opt_state=sharding.to_shardings(mesh, opt_specs),
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract_state = _with_shardings(
        TrainState(step=scalar, params=abstract_params, opt_state=abstract_opt), state_shardings
    )
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in pipeline.BATCH_KEYS}
    step_fn = make_train_step(
        model, tx, schedule, mask, grad_accum=optim_cfg.grad_accum, rules=rules,
        soft=loss.from_config(cfg), normalize=cfg.loss.normalize, chunks=cfg.loss.vocab_chunks,
    )  # fmt: skip
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        # Validation: a per-token mean, always.
        make_eval_step(model, rules, normalize="token", chunks=cfg.loss.vocab_chunks),
        in_shardings=(state_shardings.params, batch_shardings),
        out_shardings=replicated,
    )
    return Plan(
        mesh=mesh, model=model, mask=mask, tx=tx, abstract_state=abstract_state,
        state_shardings=state_shardings, batch_shardings=batch_shardings, train_step=train_step,
        eval_step=eval_step, table=table,
    )  # fmt: skip


@dataclasses.dataclass
class Setup:
    """A plan plus everything needed to run it."""

    plan: Plan
    state: TrainState
    rng: jax.Array  # The run's base key (replicated); each step folds in its number.
    start_step: int
    checkpointer: checkpoint.Checkpointer
    train_table: pipeline.TokenTable
    val_table: pipeline.TokenTable | None


def _load_tables(
    cfg: ml_collections.ConfigDict, tokenizer: Any, image_size: int
) -> tuple[pipeline.TokenTable, pipeline.TokenTable | None]:
    """Tokenized train (and validation, if val_steps > 0) splits; converts the data if needed.
    Images pre-resized to `image_size` (convert --resize) are used where the JSONL has them."""
    wanted = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.val_steps > 0 else [])
    paths = prepare.prepare_data(cfg, tuple(dict.fromkeys(wanted)))
    _train_data(cfg, read=True)  # The hash of what is trained on, for checkpoint_meta.
    tables = {}
    for split, path in paths.items():
        examples = prepare.split_examples(cfg, path, train=split == cfg.data.train_split)
        tables[split] = pipeline.tokenize(examples, tokenizer, cfg.seq_len, image_size)
        if tables[split].dropped_objects:
            logging.warning(
                "%s: %d objects did not fit seq_len=%d and were dropped",
                path, tables[split].dropped_objects, cfg.seq_len,
            )  # fmt: skip
    val = tables[cfg.data.val_split] if cfg.val_steps > 0 else None
    return tables[cfg.data.train_split], val


def setup(cfg: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Mesh, plan, data tables and the (restored or fresh) state of a run in `workdir`."""
    tokenizer = experiment.load_tokenizer(cfg)  # Missing files fail first, before any work.
    experiment.check_init(cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    plan = make_plan(cfg, mesh)
    train_table, val_table = _load_tables(cfg, tokenizer, plan.model.config.vision.image_size)
    sharding.log_table(plan.table, mesh)
    _log_sizes(plan)
    checkpointer = checkpoint.Checkpointer(
        epath.Path(workdir) / "checkpoints", keep=cfg.ckpt.keep, async_save=cfg.ckpt.async_save
    )
    # From numpy: device_put of a (local) jax array onto a multi-process sharding is broken.
    rng = jax.device_put(np.asarray(jax.random.PRNGKey(cfg.seed)), sharding.replicated(mesh))
    state, rng, start = _start_state(cfg, plan, checkpointer, rng)
    return Setup(plan, state, rng, start, checkpointer, train_table, val_table)


def _log_sizes(plan: Plan) -> None:
    params = plan.abstract_state.params
    trainable, _ = optim.split_params(params, plan.mask)
    logging.info(
        "Parameters: %s total, %s trainable; optimizer state: %s scalars",
        f"{optim.count_params(params):,}", f"{optim.count_params(trainable):,}",
        f"{optim.count_params(plan.abstract_state.opt_state):,}",
    )  # fmt: skip


def _start_state(
    cfg: ml_collections.ConfigDict,
    plan: Plan,
    checkpointer: checkpoint.Checkpointer,
    rng: jax.Array,
) -> tuple[TrainState, jax.Array, int]:
    """Resume order (train/checkpoint.py): 1. workdir checkpoint, 2. cfg.init, 3. random init."""
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rng.sharding)
        abstract = checkpoint_tree(plan.abstract_state, abstract_rng)
        restored, meta = checkpointer.restore(latest, abstract)
        _check_meta(cfg, meta)
        logging.info(
            "Resuming from %s/%d (data position: %d examples)",
            checkpointer.directory, latest, meta["examples_seen"],
        )  # fmt: skip
        state = TrainState(restored["step"], restored["params"], restored["opt_state"])
        return state, restored["rng"], latest
    logging.info("Starting from %s", cfg.init or "random initialisation")
    shardings, mask, tx = plan.state_shardings, plan.mask, plan.tx
    init_key, _ = jax.random.split(jax.random.PRNGKey(cfg.seed))
    # Frozen weights arrive already in optim.frozen_dtype and split over the mesh.
    target = dict(plan.abstract_state.params)
    adapters = target.pop("lora", None)
    params = experiment.initial_params(cfg, plan.model, init_key, target)
    if adapters is not None:  # LoRA: A random, B = 0 (the run starts from the base model).
        params["lora"] = optim.init_adapters(adapters, jax.random.fold_in(init_key, 1))
    init_opt = jax.jit(
        lambda p: tx.init(optim.split_params(p, mask)[0]), out_shardings=shardings.opt_state
    )
    step = jax.device_put(np.zeros((), np.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=init_opt(params)), rng, 0


def _check_meta(cfg: ml_collections.ConfigDict, meta: dict[str, Any]) -> None:
    """The data position is only meaningful for the same batch size, seed and training data."""
    for key in ("batch_size", "seed"):
        if meta.get(key) != cfg[key]:
            raise ValueError(
                f"the checkpoint was written with {key}={meta.get(key)} but the config says "
                f"{cfg[key]}; resume with --config.{key}={meta.get(key)} or use a new --workdir."
            )
    now, then = _train_data(cfg), meta.get("train_data")
    if not then:
        logging.warning(
            "The checkpoint does not record its training data (written by an older version); "
            "resuming on %s without checking that it is the same data.", now["path"],
        )  # fmt: skip
    elif then.get("sha256") != now["sha256"]:
        where = "it" if then.get("path") == now["path"] else f"the training JSONL {now['path']}"
        raise ValueError(
            f"the checkpoint was trained on {then.get('path')} (sha256 "
            f"{str(then.get('sha256'))[:12]}) but {where} now has sha256 {now['sha256'][:12]}; "
            "restore the data it was trained on, or start a new --workdir."
        )


# Training JSONL path -> sha256 of its content when setup read it (see `_train_data`).
_TRAIN_DATA_SHA256: dict[str, str] = {}


def _train_data(cfg: ml_collections.ConfigDict, read: bool = False) -> dict[str, str]:
    """{path, sha256} of the training JSONL: hashed when `read` (setup reads the data), else the
    hash taken then (hashed now if this process never read it)."""
    from paligemma_seg.data import convert

    path = prepare.split_jsonl(cfg, cfg.data.train_split)
    path = path if "://" in path else os.path.abspath(path)
    if read or path not in _TRAIN_DATA_SHA256:
        _TRAIN_DATA_SHA256[path] = convert.file_sha256(path)
    return {"path": path, "sha256": _TRAIN_DATA_SHA256[path]}


def checkpoint_tree(state: TrainState, rng: Any) -> dict[str, Any]:
    """What a checkpoint holds: {step, params, opt_state, rng} (`params` at the top, so
    `checkpoint.restore_params` and other tools find the weights by name)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": rng}


def checkpoint_meta(cfg: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    """The JSON stored next to a checkpoint: step, data position and the training data's hash."""
    return {
        "step": step,
        "examples_seen": step * cfg.batch_size,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "train_data": _train_data(cfg),
    }
