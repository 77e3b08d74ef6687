"""The pure training and validation steps: masked next-token loss, trainable-only gradients.

Owns `TrainState` and the step functions built by `make_train_step` / `make_eval_step`; the loss
itself is `loss.py`. Nothing here reads configs, touches files or names a mesh axis: the caller
jits the steps with explicit shardings (train/setup.py) and activates the logical-axis rules given
here at trace time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from paligemma_seg.model import lora
from paligemma_seg.train import optim
from paligemma_seg.train.loss import (
    SoftTargets,
    check_normalize,
    next_token_loss,
    next_token_loss_from_hidden,
    vocab_chunks,
)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
_MODEL_INPUTS = ("image", "text", "mask_ar", "mask_input")


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `params` holds trainable (f32 master) and frozen leaves together;
    `opt_state` covers the trainable ones only."""

    step: jax.Array  # int32[]: updates done so far.
    params: Any
    opt_state: Any


def _forward_loss(
    model: nn.Module,
    params: Any,
    batch: Batch,
    rules: Sequence[Any],
    soft: SoftTargets | None = None,
    normalize: str = "token",
    dropout_rng: jax.Array | None = None,
    chunks: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """(numerator, denominator) of the batch's loss; `chunks` > 1: the logits are taken that many
    vocabulary slices at a time from the text hidden states (train/loss.py)."""
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}  # None: deterministic.
    variables = lora.variables(params)
    inputs = [batch[k] for k in _MODEL_INPUTS]
    with nn.logical_axis_rules(rules):
        if chunks <= 1:
            logits = model.apply(variables, *inputs, rngs=rngs)
            return next_token_loss(logits, batch["text"], batch["mask_loss"], soft, normalize)
        hidden = model.apply(variables, *inputs, rngs=rngs, method="text_hidden")
    table = variables["params"]["llm"]["embedder"]["input_embedding"]
    cap = model.config.llm.final_logits_softcap
    return next_token_loss_from_hidden(
        hidden, table, cap, chunks, batch["text"], batch["mask_loss"], soft, normalize
    )


def _micro_batches(batch: Batch, count: int, rules: Sequence[Any]) -> Batch:
    """[B, ...] -> [count, B / count, ...]: micro-batch j takes rows j, count + j, ... so that each
    device keeps its own rows (the batch dimension stays split the same way)."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
        with nn.logical_axis_rules(rules):
            return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree_util.tree_map(split, batch)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    trainable: Any,
    *,
    grad_accum: int = 1,
    rules: Sequence[Any] = (),
    soft: SoftTargets | None = None,
    normalize: str = "token",
    chunks: int = 1,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Returns the pure `train_step(state, batch, rng) -> (state, metrics)`.

    `trainable`: bool tree from `optim.trainable_mask`. `rng` is the run's base key; the step
    folds in its number (then the micro-batch's) to seed LoRA dropout, the only stochastic layer.
    `soft`: soft `<loc>`/`<seg>` targets for the training loss (`loss.from_config`); the
    loss metric is then that soft cross-entropy. `normalize`: 'token' or 'example'
    (`loss.normalize`), how the batch's cross-entropy is averaged (train/loss.py); the loss's
    numerator and denominator are summed over the `grad_accum` micro-batches and divided once, so
    accumulation gives the same loss and gradients as one batch. Metrics (float32 scalars): loss,
    lr, grad_norm (before clipping), param_norm and update_norm (of the trainable parameters),
    supervised_tokens. `chunks` (`loss.vocab_chunks`): the loss's logits are taken that many
    vocabulary slices at a time, never all [B, T, V] at once (train/loss.py).
    """
    check_normalize(normalize)
    if chunks > 1:
        chunks = vocab_chunks(model.config.llm.vocab_size, chunks)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        # LoRA dropout (the only stochastic layer) draws from the step's key, per micro-batch.
        step_rng = jax.random.fold_in(rng, state.step)
        train_params, frozen = optim.split_params(state.params, trainable)

        def loss_sum(
            train_params: Any, batch: Batch, micro: jax.Array
        ) -> tuple[jax.Array, jax.Array]:
            params = optim.merge_params(train_params, frozen)
            dropout_rng = jax.random.fold_in(step_rng, micro)
            return _forward_loss(model, params, batch, rules, soft, normalize, dropout_rng, chunks)

        grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
        if grad_accum == 1:
            (total, count), grads = grad_fn(train_params, batch, jnp.zeros((), jnp.int32))
        else:

            def accumulate(carry: Any, micro: tuple[Batch, jax.Array]) -> tuple[Any, None]:
                (total, count), grads = grad_fn(train_params, *micro)
                return jax.tree_util.tree_map(jnp.add, carry, (total, count, grads)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, train_params)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            micro_index = jnp.arange(grad_accum, dtype=jnp.int32)
            (total, count, grads), _ = jax.lax.scan(
                accumulate, init, (_micro_batches(batch, grad_accum, rules), micro_index)
            )
        denominator = jnp.maximum(count, 1.0)  # tokens ('token') or examples ('example')
        grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
        updates, opt_state = tx.update(grads, state.opt_state, train_params)
        new_train = optax.apply_updates(train_params, updates)
        metrics = {
            "loss": total / denominator,
            "lr": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(new_train),
            "update_norm": optax.global_norm(updates),
            "supervised_tokens": jnp.sum(batch["mask_loss"][:, 1:].astype(jnp.float32)),
        }
        new_state = TrainState(
            step=state.step + 1, params=optim.merge_params(new_train, frozen), opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def make_eval_step(
    model: nn.Module, rules: Sequence[Any] = (), normalize: str = "token", chunks: int = 1
) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """Returns `eval_step(params, batch) -> (numerator, denominator)` of the plain cross-entropy:
    (summed cross-entropy, supervised tokens) with 'token' (the validation loss: the caller sums
    both over batches and divides), (sum of per-example means, rows) with 'example' (rows that
    pad a last batch would count as examples there)."""
    check_normalize(normalize)
    if chunks > 1:
        chunks = vocab_chunks(model.config.llm.vocab_size, chunks)

    def eval_step(params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        return _forward_loss(model, params, batch, rules, normalize=normalize, chunks=chunks)

    return eval_step
