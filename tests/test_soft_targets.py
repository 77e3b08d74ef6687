"""Soft <loc>/<seg> training targets, checked against hand computations in numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paligemma_seg.train import loss as soft_targets
from paligemma_seg.train.loss import next_token_loss

# A toy vocabulary of 20 ids: ids 4..11 are 8 <loc> bins, ids 14..16 are 3 <seg> codes.
VOCAB = 20
LOC_IDS = np.arange(4, 12)
SEG_IDS = np.array([14, 15, 16])
CODEBOOK = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _tables(sigma: float, temperature: float) -> soft_targets.SoftTargets:
    return soft_targets.build(VOCAB, LOC_IDS, SEG_IDS, CODEBOOK, sigma, temperature)


def test_zero_widths_are_plain_cross_entropy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, VOCAB)).astype(np.float32)
    targets = np.array([[1, 5, 9, 14, 16, 3], [4, 11, 15, 2, 7, 0]])
    ours = soft_targets.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), _tables(0, 0))
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)


def test_loc_and_seg_targets_match_a_hand_computation() -> None:
    sigma, temperature = 1.5, 0.5
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 3, VOCAB)).astype(np.float32)
    targets = np.array([[6, 15, 2]])  # bin 2, code 1, an ordinary token
    log_p = _log_softmax(logits.astype(np.float64))[0]

    bins = np.arange(8)
    q_loc = np.exp(-((bins - 2) ** 2) / (2 * sigma**2))
    q_loc /= q_loc.sum()
    # Squared codebook distances from code 1: 1, 0, 4; median distinct-pair distance: of 1, 9, 4.
    q_seg = np.exp(-np.array([1.0, 0.0, 4.0]) / (temperature * 4.0))
    q_seg /= q_seg.sum()
    expected = [
        -(q_loc * log_p[0, LOC_IDS]).sum(),
        -(q_seg * log_p[1, SEG_IDS]).sum(),
        -log_p[2, 2],
    ]
    ours = soft_targets.soft_cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), _tables(sigma, temperature)
    )
    np.testing.assert_allclose(ours[0], expected, rtol=1e-5)


def test_gradient_pulls_towards_the_soft_distribution() -> None:
    """d loss / d logits = softmax(logits) - q, with q on the group only."""
    sigma = 1.0
    logits = jnp.zeros((1, 1, VOCAB))
    targets = jnp.array([[7]])  # bin 3
    grad = jax.grad(lambda x: soft_targets.soft_cross_entropy(x, targets, _tables(sigma, 0)).sum())(
        logits
    )[0, 0]
    q = np.zeros(VOCAB)
    weights = np.exp(-((np.arange(8) - 3) ** 2) / 2.0)
    q[LOC_IDS] = weights / weights.sum()
    np.testing.assert_allclose(grad, np.full(VOCAB, 1 / VOCAB) - q, atol=1e-6)


def test_distributions_peak_on_the_true_token() -> None:
    loc = soft_targets.loc_distribution(1024, 8.0)
    np.testing.assert_allclose(loc.sum(axis=1), 1.0, rtol=1e-5)
    assert (loc.argmax(axis=1) == np.arange(1024)).all()
    assert loc[500, 508] > loc[500, 516] > 0  # mass falls off with the distance in bins
    codebook = np.random.default_rng(2).normal(size=(128, 16))
    seg = soft_targets.seg_distribution(codebook, 0.1)
    np.testing.assert_allclose(seg.sum(axis=1), 1.0, rtol=1e-5)
    assert (seg.argmax(axis=1) == np.arange(128)).all()
    # The nearest other code gets more than the farthest one.
    squared = ((codebook[:, None] - codebook[None]) ** 2).sum(-1)
    np.fill_diagonal(squared, np.inf)
    near, far = squared[0].argmin(), np.where(np.isinf(squared[0]), -1, squared[0]).argmax()
    assert seg[0, near] > seg[0, far]


def test_next_token_loss_uses_soft_targets_on_supervised_tokens_only() -> None:
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(1, 4, VOCAB)), jnp.float32)
    text = jnp.array([[2, 6, 15, 1]])
    mask_loss = jnp.array([[0, 0, 1, 1]])  # targets 15 (seg) and 1 (eos) are supervised
    tables = _tables(1.0, 0.5)
    total, count = next_token_loss(logits, text, mask_loss, tables)
    per_token = soft_targets.soft_cross_entropy(logits[:, :-1], text[:, 1:], tables)
    assert float(count) == 2.0
    np.testing.assert_allclose(total, per_token[0, 1] + per_token[0, 2], rtol=1e-6)
    plain, _ = next_token_loss(logits, text, mask_loss)
    assert abs(float(total) - float(plain)) > 1e-3  # the seg target really is soft


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="loss.loc_sigma"):
        _tables(-1.0, 0.0)
    with pytest.raises(ValueError, match="codebook has 2 codes"):
        soft_targets.build(VOCAB, LOC_IDS, SEG_IDS, CODEBOOK[:2], 1.0, 1.0)


def test_config_tables_come_from_the_shipped_tokenizer_and_codec() -> None:
    from train_fixtures import load_config

    from paligemma_seg import experiment

    assert soft_targets.from_config(load_config("base")) is None  # off unless asked for
    cfg = load_config("water_tiny")
    cfg.loss.loc_sigma, cfg.loss.seg_temperature = 4.0, 0.02
    tables = soft_targets.from_config(cfg)
    tokenizer = experiment.load_tokenizer(cfg)
    np.testing.assert_array_equal(tables.loc_ids, tokenizer.loc_ids)
    np.testing.assert_array_equal(tables.seg_ids, tokenizer.seg_ids)
    assert (
        tables.loc_index[tokenizer.loc_ids[37]] == 37 and tables.seg_index[tokenizer.eos_id] == -1
    )
    codebook = np.asarray(experiment.load_codec(cfg).vqvae.params["codebook"])
    np.testing.assert_allclose(tables.seg_rows, soft_targets.seg_distribution(codebook, 0.02))
    np.testing.assert_allclose(tables.loc_rows[100, 100], 1 / (np.sqrt(2 * np.pi) * 4), rtol=1e-3)


def test_plan_trains_on_the_configured_soft_loss(tmp_path) -> None:
    """The jitted step of `make_plan` reports the soft loss of its batch, not the plain one."""
    from train_fixtures import tiny_config, write_dataset

    from paligemma_seg import sharding
    from paligemma_seg.model import init_params
    from paligemma_seg.train import setup as train_setup

    cfg = tiny_config(
        write_dataset(tmp_path), **{"loss.loc_sigma": 3.0, "loss.seg_temperature": 0.1}
    )
    plan = train_setup.make_plan(cfg, sharding.make_mesh(1, 1))
    params = init_params(plan.model.config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    text = np.concatenate([np.full((8, 1), 2), rng.integers(3, 2176, (8, 31))], axis=1)
    batch = {
        "image": rng.uniform(-1, 1, (8, 28, 28, 3)).astype(np.float32),
        "text": text.astype(np.int32),
        "mask_ar": np.repeat([[0] * 4 + [1] * 28], 8, axis=0).astype(np.int32),
        "mask_input": np.ones((8, 32), np.int32),
        "mask_loss": np.repeat([[0] * 4 + [1] * 28], 8, axis=0).astype(np.int32),
    }
    logits = plan.model.apply(
        {"params": params}, *(batch[k] for k in ("image", "text", "mask_ar", "mask_input"))
    )
    soft = soft_targets.from_config(cfg)
    total, count = next_token_loss(logits, jnp.asarray(text), jnp.asarray(batch["mask_loss"]), soft)
    plain, _ = next_token_loss(logits, jnp.asarray(text), jnp.asarray(batch["mask_loss"]))
    state = train_setup.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=plan.tx.init(params)
    )
    with jax.set_mesh(plan.mesh):
        _, metrics = plan.train_step(state, batch, jax.random.PRNGKey(0))
    reported, soft_mean, plain_mean = (
        float(metrics["loss"]),
        float(total / count),
        float(plain / count),
    )
    # Near init the logits are almost uniform, so the two losses differ by little (~1e-3).
    assert abs(reported - soft_mean) < abs(reported - plain_mean) / 10
