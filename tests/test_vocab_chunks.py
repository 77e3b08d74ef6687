"""`loss.vocab_chunks`: the loss's logits taken a vocabulary slice at a time give the loss and
gradients of the full [B, T, V] logits (optax / the soft cross-entropy on `Embedder.decode`'s
logits are the oracle), and the chunked train step holds no [B, T, V] array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paligemma_seg.model import PaliGemma, init_params, tiny_config
from paligemma_seg.train import TrainState, make_train_step, optim
from paligemma_seg.train import loss as loss_lib

VOCAB, WIDTH = 60, 16
LOC_IDS = np.arange(10, 26)  # 16 <loc> bins
SEG_IDS = np.arange(40, 44)  # 4 <seg> codes
CODEBOOK = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)


def _inputs():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 7, WIDTH)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(VOCAB, WIDTH)) * 2, jnp.float32)
    # Targets cover plain ids, <loc> bins and <seg> codes.
    targets = jnp.asarray(rng.choice(np.r_[0:9, LOC_IDS, SEG_IDS], size=(3, 7)), jnp.int32)
    return hidden, table, targets


def _full(hidden, table, targets, cap, soft):
    """The oracle: softcap(hidden . table^T) materialised, then optax / soft_cross_entropy."""
    logits = jnp.einsum("BTD,VD->BTV", hidden, table)
    logits = jnp.tanh(logits / cap) * cap if cap else logits
    if soft is None:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return loss_lib.soft_cross_entropy(logits, targets, soft)


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("soft_widths", [None, (2.0, 0.5)])
@pytest.mark.parametrize("chunks", [1, 4, 12])
def test_chunked_cross_entropy_and_gradients_equal_the_full_logits(cap, soft_widths, chunks):
    hidden, table, targets = _inputs()
    soft = None
    if soft_widths is not None:
        soft = loss_lib.build(VOCAB, LOC_IDS, SEG_IDS, CODEBOOK, *soft_widths)

    def full(h, t):
        return jnp.sum(_full(h, t, targets, cap, soft))

    def chunked(h, t):
        return jnp.sum(loss_lib.hidden_cross_entropy(h, t, targets, cap, chunks, soft))

    np.testing.assert_allclose(
        loss_lib.hidden_cross_entropy(hidden, table, targets, cap, chunks, soft),
        _full(hidden, table, targets, cap, soft),
        rtol=1e-5,
        atol=1e-5,
    )
    want = jax.grad(full, argnums=(0, 1))(hidden, table)
    got = jax.grad(chunked, argnums=(0, 1))(hidden, table)
    for name, a, b in zip(("hidden", "table"), got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_vocab_chunks_is_the_smallest_divisor_at_least_the_request():
    assert loss_lib.vocab_chunks(257_152, 16) == 16
    assert loss_lib.vocab_chunks(257_152, 10) == 14  # 2^7 * 7^2 * 41: 14 divides, 10-13 don't
    assert loss_lib.vocab_chunks(300, 7) == 10
    assert loss_lib.vocab_chunks(300, 1) == loss_lib.vocab_chunks(300, 0) == 1
    with pytest.raises(ValueError, match="loss.vocab_chunks=7"):
        loss_lib.streamed_logsumexp(jnp.zeros((1, 1, 2)), jnp.zeros((300, 2)), None, 7)


def _batch(config):
    rng = np.random.default_rng(1)
    batch, length = 2, 10
    text = rng.integers(1, config.llm.vocab_size, (batch, length)).astype(np.int32)
    mask_loss = np.zeros((batch, length), np.int32)
    mask_loss[:, 4:] = 1
    side = config.vision.image_size
    return {
        "image": rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32),
        "text": text,
        "mask_ar": mask_loss.copy(),
        "mask_input": np.ones((batch, length), np.int32),
        "mask_loss": mask_loss,
    }


def test_train_step_with_vocab_chunks_matches_full_logits_and_holds_no_btv_array():
    config = tiny_config(2, compat="transformers")  # Gemma 2: the final logit soft-cap
    assert config.llm.final_logits_softcap
    params = init_params(config, jax.random.PRNGKey(0))
    mask = optim.trainable_mask(params, "all")
    cfg = optim.OptimConfig(name="sgd", lr=1.0, schedule="constant", clip_norm=0.0, trainable="all")
    tx, schedule = optim.make_optimizer(cfg, 10)
    batch = _batch(config)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    results = {}
    for chunks in (1, 6):
        step = make_train_step(PaliGemma(config), tx, schedule, mask, chunks=chunks)
        new_state, metrics = jax.jit(step)(state, batch, jax.random.PRNGKey(0))
        results[chunks] = (optim.flatten(jax.device_get(new_state.params)), metrics)
        jaxpr = str(jax.make_jaxpr(step)(state, batch, jax.random.PRNGKey(0)))
        full_shape = f"f32[2,10,{config.llm.vocab_size}]"
        assert (full_shape in jaxpr) == (chunks == 1), chunks
    (flat_full, metrics_full), (flat_chunked, metrics_chunked) = results[1], results[6]
    np.testing.assert_allclose(metrics_chunked["loss"], metrics_full["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_chunked["grad_norm"], metrics_full["grad_norm"], rtol=1e-5)
    for key, value in flat_full.items():
        np.testing.assert_allclose(flat_chunked[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
