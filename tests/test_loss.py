"""loss.normalize ('token' | 'example') against a numpy hand computation, gradient accumulation
under both, and adamw's b1 (optim.b1, separate from SGD's momentum)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_fixtures import load_config

from paligemma_seg.model import PaliGemma, init_params, tiny_config
from paligemma_seg.train import TrainState, make_eval_step, make_train_step, next_token_loss, optim

# Supervised targets per example (mask_loss[:, 1:]): unequal, one example with none.
SUPERVISED = (5, 1, 3, 0)


def _numpy_losses(logits, text, mask_loss):
    """(token mean, example mean) by hand: log-softmax, targets text[t + 1] at position t."""
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    per_example_sum, per_example_count = [], []
    for b in range(text.shape[0]):
        terms = [
            -log_probs[b, t, text[b, t + 1]]
            for t in range(text.shape[1] - 1)
            if mask_loss[b, t + 1]
        ]
        per_example_sum.append(sum(terms))
        per_example_count.append(len(terms))
    token = sum(per_example_sum) / sum(per_example_count)
    # big_vision: each example's sum / max(its count, 1), then the plain mean over the batch.
    example = np.mean(
        [s / max(c, 1) for s, c in zip(per_example_sum, per_example_count, strict=True)]
    )
    return token, example


def _text_batch(vocab: int, length: int = 9, seed: int = 0):
    """text int32[4, length] and a mask_loss whose suffixes (+ EOS) have SUPERVISED targets each."""
    rng = np.random.default_rng(seed)
    text = rng.integers(1, vocab, (len(SUPERVISED), length)).astype(np.int32)
    mask_loss = np.zeros_like(text)
    for b, count in enumerate(SUPERVISED):
        start = 2 + b % 2  # prefixes of unequal length too
        mask_loss[b, start : start + count] = 1
        text[b, start + count :] = 0  # padding after the suffix
    assert (mask_loss[:, 1:].sum(1) == SUPERVISED).all()
    return text, mask_loss


def test_token_and_example_normalize_match_a_hand_computation():
    text, mask_loss = _text_batch(vocab=11)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(*text.shape, 11)), jnp.float32)
    token, example = _numpy_losses(logits, text, mask_loss)
    total, tokens = next_token_loss(logits, text, mask_loss)  # the default: 'token', as before
    assert float(tokens) == sum(SUPERVISED)
    np.testing.assert_allclose(float(total / tokens), token, rtol=1e-6)
    np.testing.assert_array_equal(
        next_token_loss(logits, text, mask_loss, normalize="token"), (total, tokens)
    )
    total, examples = next_token_loss(logits, text, mask_loss, normalize="example")
    assert float(examples) == len(SUPERVISED)  # the example without targets counts (as 0)
    np.testing.assert_allclose(float(total / examples), example, rtol=1e-6)
    assert abs(token - example) > 0.05  # unequal lengths: the two means differ


def test_invalid_normalize_names_the_key():
    text, mask_loss = _text_batch(vocab=11)
    logits = jnp.zeros((*text.shape, 11))
    with pytest.raises(
        ValueError, match=r"loss\.normalize='sentence'; use one of \('token', 'example'\)"
    ):
        next_token_loss(logits, text, mask_loss, normalize="sentence")
    config = tiny_config(1)
    tx, schedule = optim.make_optimizer(optim.OptimConfig(), 10)
    mask = optim.trainable_mask(
        jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))), "all"
    )
    with pytest.raises(ValueError, match=r"loss\.normalize='mean'"):
        make_train_step(PaliGemma(config), tx, schedule, mask, normalize="mean")
    with pytest.raises(ValueError, match=r"loss\.normalize=''"):
        make_eval_step(PaliGemma(config), normalize="")


def test_configs_normalize():
    assert load_config("base").loss.normalize == "token"
    assert load_config("water_tiny").loss.normalize == "token"
    for name in ("water_224", "water_448", "water_pg2_224"):
        assert load_config(name).loss.normalize == "example", name


@functools.cache
def _setup():
    config = tiny_config(1)
    params = init_params(config, jax.random.PRNGKey(0))
    mask = optim.trainable_mask(params, "all")
    side = config.vision.image_size
    text, mask_loss = _text_batch(config.llm.vocab_size)
    batch = {
        "image": np.random.default_rng(2)
        .uniform(-1, 1, (len(SUPERVISED), side, side, 3))
        .astype(np.float32),
        "text": text,
        "mask_ar": (np.cumsum(mask_loss, 1) > 0).astype(np.int32),  # causal from the suffix on
        "mask_input": (text > 0).astype(np.int32),
        "mask_loss": mask_loss,
    }
    return config, params, mask, batch


@functools.cache
def _step(normalize: str, grad_accum: int):
    """(new trainable params, metrics) of one plain-SGD step (lr 1, no clipping): params - grads."""
    config, params, mask, batch = _setup()
    cfg = optim.OptimConfig(name="sgd", lr=1.0, schedule="constant", clip_norm=0.0, trainable="all")
    tx, schedule = optim.make_optimizer(cfg, 10)
    step = make_train_step(
        PaliGemma(config), tx, schedule, mask, grad_accum=grad_accum, normalize=normalize
    )
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    new_state, metrics = jax.jit(step)(state, batch, jax.random.PRNGKey(0))
    return jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.mark.parametrize("normalize", ["token", "example"])
def test_train_step_loss_and_gradients_with_and_without_accumulation(normalize):
    config, params, _, batch = _setup()

    def loss(params):
        logits = PaliGemma(config).apply(
            {"params": params}, *(batch[k] for k in ("image", "text", "mask_ar", "mask_input"))
        )
        total, count = next_token_loss(
            logits, batch["text"], batch["mask_loss"], normalize=normalize
        )
        return total / count, logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    token, example = _numpy_losses(logits, batch["text"], batch["mask_loss"])
    expected = {"token": token, "example": example}[normalize]
    one, metrics_one = _step(normalize, 1)
    # Micro-batches take rows (0, 2) and (1, 3): 5 + 3 and 1 + 0 supervised targets.
    two, metrics_two = _step(normalize, 2)
    for metrics in (metrics_one, metrics_two):
        np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
        assert metrics["supervised_tokens"] == sum(SUPERVISED)
    flat_params, flat_grads = optim.flatten(jax.device_get(params)), optim.flatten(grads)
    flat_one, flat_two = optim.flatten(one), optim.flatten(two)
    for key, value in flat_params.items():  # SGD with lr 1: new = old - grad
        np.testing.assert_allclose(
            value - flat_one[key], flat_grads[key], rtol=1e-4, atol=1e-6, err_msg=key
        )
        np.testing.assert_allclose(  # accumulation: the same gradients up to float32 rounding
            value - flat_two[key], value - flat_one[key], rtol=1e-4, atol=1e-6, err_msg=key
        )
    np.testing.assert_allclose(metrics_two["grad_norm"], metrics_one["grad_norm"], rtol=1e-5)


def test_token_and_example_gradients_differ():
    one_token, _ = _step("token", 1)
    one_example, _ = _step("example", 1)
    diffs = [
        float(np.abs(a - b).max())
        for a, b in zip(
            jax.tree_util.tree_leaves(one_token),
            jax.tree_util.tree_leaves(one_example),
            strict=True,
        )
    ]
    assert max(diffs) > 1e-4


def _adam_state(state):
    """The ScaleByAdamState inside a (nested) optax chain state."""
    if isinstance(state, optax.ScaleByAdamState):
        return state
    if isinstance(state, tuple):
        for part in state:
            found = _adam_state(part)
            if found is not None:
                return found
    return None


def _first_moment_after_one_step(cfg: optim.OptimConfig) -> tuple[np.ndarray, np.ndarray]:
    tx, _ = optim.make_optimizer(cfg, 10)
    params = {"w": jnp.ones((3, 2))}
    grads = {"w": jnp.arange(6.0).reshape(3, 2) - 2.5}
    _, state = tx.update(grads, tx.init(params), params)
    return np.asarray(_adam_state(state).mu["w"]), np.asarray(grads["w"])


def test_adamw_b1_defaults_to_0_9_and_is_not_sgd_momentum():
    cfg = optim.OptimConfig(name="adamw", clip_norm=0.0)
    assert (cfg.b1, cfg.momentum) == (0.9, 0.0)
    mu, grads = _first_moment_after_one_step(cfg)
    assert np.abs(mu).max() > 0
    np.testing.assert_allclose(
        mu, (1 - 0.9) * grads, rtol=1e-6
    )  # mu = b1 mu + (1 - b1) g, mu_0 = 0
    # momentum is SGD's: it does not change adamw.
    mu_momentum, _ = _first_moment_after_one_step(
        optim.OptimConfig(name="adamw", clip_norm=0.0, momentum=0.5)
    )
    np.testing.assert_array_equal(mu_momentum, mu)


def test_adamw_reads_the_b1_config_key():
    cfg = load_config("base")
    assert cfg.optim.b1 == 0.9
    cfg.optim.name, cfg.optim.b1, cfg.optim.clip_norm = "adamw", 0.5, 0.0
    optim_cfg = optim.OptimConfig(**cfg.optim.to_dict())
    assert optim_cfg.b1 == 0.5
    mu, grads = _first_moment_after_one_step(optim_cfg)
    np.testing.assert_allclose(mu, 0.5 * grads, rtol=1e-6)
    # water_tiny's AdamW keeps the b1 it always had (it set momentum = 0.9, which adamw read as b1).
    tiny = optim.OptimConfig(**load_config("water_tiny").optim.to_dict())
    assert (tiny.name, tiny.b1) == ("adamw", 0.9)
    with pytest.raises(ValueError, match=r"optim\.b1=1\.0 must be in \[0, 1\)"):
        optim.OptimConfig(name="adamw", b1=1.0)


def test_make_plan_reads_loss_normalize(tmp_path):
    from train_fixtures import tiny_config as tiny_run_config

    from paligemma_seg import sharding
    from paligemma_seg.train import setup

    mesh = sharding.make_mesh(1, -1)
    setup.make_plan(tiny_run_config(tmp_path, **{"loss.normalize": "example"}), mesh)
    with pytest.raises(ValueError, match=r"loss\.normalize='per_token'"):
        setup.make_plan(tiny_run_config(tmp_path, **{"loss.normalize": "per_token"}), mesh)
