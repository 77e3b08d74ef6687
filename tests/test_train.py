"""The train step (loss against transformers, masks, trainable-only gradients, accumulation), optimizers,
schedules, configs, a whole tiny run in-process, and the CLI's error for a missing file."""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from train_fixtures import REPO, load_config, read_metrics, read_params, reference_run

from paligemma_seg import experiment, weights
from paligemma_seg.model import PaliGemma, init_params, tiny_config
from paligemma_seg.train import TrainState, make_train_step, next_token_loss, optim

CONFIGS = (
    "base", "water_224", "water_448", "water_pg2_224", "water_tiny", "water_pg2_3b_lora",
    "water_pg2_10b_lora",
)  # fmt: skip


def _batch(config, seed=0):
    """Prefix lengths 3/5, suffix 6/2 (+ padding), mask_loss on the suffix, as tokenize_example lays out."""
    rng = np.random.default_rng(seed)
    text = rng.integers(1, config.llm.vocab_size, (2, 10)).astype(np.int32)
    mask_ar = np.array([[0] * 3 + [1] * 7, [0] * 5 + [1] * 5], np.int32)
    mask_input = np.array([[1] * 9 + [0], [1] * 7 + [0] * 3], np.int32)
    text[mask_input == 0] = 0
    side = config.vision.image_size
    return {
        "image": rng.uniform(-1, 1, (2, side, side, 3)).astype(np.float32),
        "text": text,
        "mask_ar": mask_ar,
        "mask_input": mask_input,
        "mask_loss": mask_ar * mask_input,
    }


@pytest.mark.parametrize("version", [1, 2])
def test_next_token_loss_matches_transformers(tmp_path, version):
    import model_fixtures

    directory = model_fixtures.save_tiny_hf(tmp_path / "hf", version)
    expected_config = model_fixtures.our_tiny_config(version)  # window and soft-caps of the fixture
    model, params = weights.load(directory, llm=dataclasses.asdict(expected_config.llm))
    batch = _batch(model.config)
    logits = model.apply(
        {"params": params}, *(batch[k] for k in ("image", "text", "mask_ar", "mask_input"))
    )
    total, tokens = next_token_loss(logits, batch["text"], batch["mask_loss"])

    hf = model_fixtures.build_hf_tiny(version)
    inputs = model_fixtures.hf_inputs(batch, model.config.num_image_tokens)
    labels = np.where(batch["mask_loss"] == 1, batch["text"], -100)
    labels = np.concatenate([np.full((2, model.config.num_image_tokens), -100), labels], axis=1)
    with torch.no_grad():
        expected = hf(**inputs, labels=torch.from_numpy(labels)).loss.item()
    assert float(tokens) == batch["mask_loss"][:, 1:].sum() == 6 + 2
    np.testing.assert_allclose(float(total / tokens), expected, rtol=2e-6)


def test_next_token_loss_ignores_unsupervised_targets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 10, 50)), jnp.float32)
    text = rng.integers(1, 50, (2, 10)).astype(np.int32)
    mask_loss = np.array([[0] * 4 + [1] * 4 + [0] * 2, [0] * 6 + [1] * 4], np.int32)
    base = next_token_loss(logits, text, mask_loss)
    changed = text.copy()
    changed[:, 1:4] = (changed[:, 1:4] + 1) % 50  # prefix targets
    changed[0, 8:] = 0  # padding targets
    np.testing.assert_array_equal(next_token_loss(logits, changed, mask_loss), base)
    changed[0, 5] = (changed[0, 5] + 1) % 50  # a suffix target
    assert next_token_loss(logits, changed, mask_loss)[0] != base[0]
    # Position t predicts token t + 1: the loss is -log softmax(logits[t])[text[t + 1]].
    log_probs = jax.nn.log_softmax(logits, -1)
    expected = -sum(
        float(log_probs[b, t - 1, text[b, t]]) for b, t in zip(*np.nonzero(mask_loss), strict=True)
    )
    np.testing.assert_allclose(float(base[0]), expected, rtol=1e-5)


@functools.cache
def _tiny_step(trainable: str, grad_accum: int):
    """(jitted train step, initial state, batch of 4, mask) for the tiny model with SGD + momentum."""
    config = tiny_config(1)
    params = init_params(config, jax.random.PRNGKey(0))
    mask = optim.trainable_mask(params, trainable)
    cfg = optim.OptimConfig(name="sgd", lr=0.1, momentum=0.9, trainable=trainable, warmup_steps=0)
    tx, schedule = optim.make_optimizer(cfg, total_steps=10)
    step = jax.jit(make_train_step(PaliGemma(config), tx, schedule, mask, grad_accum=grad_accum))
    opt_state = tx.init(optim.split_params(params, mask)[0])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    batch = _batch(config)
    batch = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}  # batch of 4
    return step, state, batch, mask


def _run_steps(trainable: str, grad_accum: int, steps: int = 2):
    step, state, batch, mask = _tiny_step(trainable, grad_accum)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.PRNGKey(0))
        losses.append(float(metrics["loss"]))
    return state, losses, mask


def test_train_step_updates_only_trainable_parameters():
    _, initial, _, _ = _tiny_step("attn", 1)
    before = optim.flatten(jax.device_get(initial.params))
    state, losses, mask = _run_steps("attn", 1)
    after, flat_mask = optim.flatten(jax.device_get(state.params)), optim.flatten(mask)
    assert any(flat_mask.values()) and not all(flat_mask.values())
    for path, trains in flat_mask.items():
        changed = not np.array_equal(before[path], after[path])
        assert changed == trains, path
        assert trains == path.startswith("llm/layers/attn/"), path
    # Optimizer state (momentum) exists for the trainable parameters only (+ the schedule's counter).
    trainable = optim.count_params(optim.split_params(state.params, mask)[0])
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == trainable < optim.count_params(state.params) / 2
    assert int(state.step) == 2 and losses[1] < losses[0]


def test_train_step_grad_accumulation_matches_one_batch():
    state1, losses1, _ = _run_steps("attn", 1)
    state2, losses2, _ = _run_steps("attn", 2)
    np.testing.assert_allclose(losses1, losses2, rtol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        state1.params,
        state2.params,
    )


@pytest.mark.parametrize("name", ["sgd", "adamw", "adafactor"])
def test_optimizers_minimise_a_quadratic(name):
    cfg = optim.OptimConfig(name=name, lr=0.05, momentum=0.5, warmup_steps=2, weight_decay=1e-4)
    tx, _ = optim.make_optimizer(cfg, total_steps=100)
    target = {"w": jnp.arange(12.0).reshape(3, 4) / 12, "scale": jnp.ones(4)}
    params = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), target)
    loss = lambda p: sum(
        jnp.sum((a - b) ** 2)
        for a, b in zip(
            jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target), strict=True
        )
    )
    state = tx.init(params)
    for _ in range(30):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.5 * float(
        loss(jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), target))
    )


def test_schedule_warmup_then_decay():
    make = lambda kind: optim.make_schedule(
        optim.OptimConfig(lr=1.0, schedule=kind, warmup_steps=4), 14
    )
    cosine, linear, constant = make("cosine"), make("linear"), make("constant")
    np.testing.assert_allclose([float(cosine(s)) for s in range(4)], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(float(cosine(9)), 0.5, atol=1e-6)  # half way through the decay
    np.testing.assert_allclose(float(linear(9)), 0.5, atol=1e-6)
    assert float(cosine(14)) == float(linear(14)) == 0.0 and float(constant(14)) == 1.0


def test_clipping_bounds_the_update():
    cfg = optim.OptimConfig(name="sgd", lr=1.0, clip_norm=0.5, warmup_steps=0, schedule="constant")
    tx, _ = optim.make_optimizer(cfg, 10)
    grads = {"w": jnp.full((4,), 10.0)}
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(float(optax.global_norm(updates)), 0.5, rtol=1e-6)


def test_weight_decay_skips_norms_and_biases():
    cfg = optim.OptimConfig(name="sgd", lr=1.0, clip_norm=0, weight_decay=0.1, schedule="constant")
    tx, _ = optim.make_optimizer(cfg, 10)
    params = {
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "norm": {"scale": jnp.ones(2)},
    }
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1)
    assert (
        float(jnp.abs(updates["dense"]["bias"]).max())
        == float(jnp.abs(updates["norm"]["scale"]).max())
        == 0
    )


def test_trainable_mask_names_and_errors():
    params = jax.eval_shape(lambda: init_params(tiny_config(1), jax.random.PRNGKey(0)))
    flat = lambda name: {
        k for k, v in optim.flatten(optim.trainable_mask(params, name)).items() if v
    }
    everything = set(optim.flatten(params))
    assert flat("all") == everything
    assert flat("img") | flat("llm") == everything and not flat("img") & flat("llm")
    assert flat("attn") and all(p.startswith("llm/layers/attn/") for p in flat("attn"))
    assert flat(r"llm/final_norm") == {"llm/final_norm/scale"}
    with pytest.raises(ValueError, match="matches no parameter; paths look like: img/"):
        optim.trainable_mask(params, "nothing/like/this")
    with pytest.raises(ValueError, match="valid regex"):
        optim.trainable_mask(params, "llm/(")


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_build_and_every_key_is_commented(name):
    cfg = load_config(name)
    config = experiment.model_config(cfg)
    assert config.vision.image_size in (112, 224, 448)
    optim.OptimConfig(**cfg.optim.to_dict())  # unknown or invalid optim keys raise
    experiment.codec_config(cfg)
    if (
        name == "base"
    ):  # Experiments only override keys that base.py defines (the config is locked).
        source = (REPO / "configs" / "base.py").read_text()
        assert len(re.findall(r"\n\s+c\.[\w.]+ = ", source)) > 60
        lines = source.splitlines()
        for number, line in enumerate(lines):
            if re.match(r"\s+c\.[\w.]+ = ", line):
                commented = "#" in line or lines[number - 1].strip().startswith("#")
                assert commented, f"configs/base.py:{number + 1}: uncommented key: {line.strip()}"


def test_water_224_is_the_seed_recipe():
    cfg = load_config("water_224")
    assert (cfg.model.preset, cfg.init) == ("pg1-3b-224", "checkpoints/paligemma-3b-pt-224.npz")
    assert (cfg.tokenizer, cfg.codec.vqvae) == (
        "checkpoints/paligemma_tokenizer.model",
        "checkpoints/vae-oid.npz",
    )
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.trainable) == ("sgd", 0.003, "attn")
    assert (cfg.batch_size, cfg.seq_len) == (8, 128)


def test_missing_files_say_where_and_how(tmp_path):
    cfg = load_config("water_224")
    cfg.tokenizer = str(tmp_path / "paligemma_tokenizer.model")
    with pytest.raises(
        ValueError,
        match=r"tokenizer not found: .*With real weights.*download_weights\.py --only tokenizer",
    ):
        experiment.load_tokenizer(cfg)
    with pytest.raises(
        ValueError, match=r"mask VQ-VAE not found: checkpoints/vae-oid\.npz .*expected at /"
    ):
        experiment.load_codec(cfg)
    cfg.init = str(tmp_path / "paligemma-3b-pt-224.npz")
    with pytest.raises(
        ValueError, match=r"download_weights\.py --model pg1-3b-224.*--config\.init"
    ):
        experiment.check_init(cfg)


def test_train_run_writes_metrics_checkpoints_and_npz(tmp_path_factory):
    workdir = reference_run(tmp_path_factory.getbasetemp())
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "param_norm",
        "examples_per_s",
        "tokens_per_s",
        "supervised_tokens",
    ):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[-1]["loss"] < records[0]["loss"]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "3",
        "6",
    ]
    params = read_params(workdir)
    assert "llm/layers/attn/q_einsum/w" in params and len(params) > 20
    assert (workdir / "config.json").exists()


def test_cli_missing_init_is_one_clear_line(tmp_path):
    from train_fixtures import cli_args, reference_data, subprocess_env

    data = reference_data(tmp_path)
    args = cli_args(data, tmp_path / "run", init=str(tmp_path / "missing.npz"))
    result = subprocess.run(
        args, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "initial weights not found" in result.stderr and "Traceback" not in result.stderr


def test_train_run_water_224_recipe_bf16_with_frozen_bf16_weights(tmp_path_factory):
    """The real recipe on the tiny model: attn-only SGD, bf16 compute, f32 master copies of the
    trained weights, frozen weights stored in bf16 (also in the exported npz)."""
    from train_fixtures import reference_data, tiny_config

    from paligemma_seg.train import loop as train_loop

    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path_factory.mktemp("bf16_recipe")
    cfg = tiny_config(
        reference_data(base), total_steps=2, ckpt_steps=0, **{
            "model.overrides.dtype": "bfloat16", "optim.trainable": "attn",
            "optim.frozen_dtype": "bfloat16", "optim.lr": 0.003, "optim.momentum": 0.0,
        },
    )  # fmt: skip
    result = train_loop.run(cfg, str(workdir))
    assert np.isfinite(result["loss"]) and result["step"] == 2
    params = read_params(workdir)
    for key, value in params.items():  # numpy reads bfloat16 back as 2-byte void ("|V2")
        expected = ("float32",) if key.startswith("llm/layers/attn/") else ("bfloat16", "|V2")
        assert str(value.dtype) in expected, (key, value.dtype)
