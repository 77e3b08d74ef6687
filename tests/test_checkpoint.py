"""Checkpoints: save/restore round trip, keep-K, params-only restore for `init`, and exact resume after
SIGTERM (saves, exits 0) and SIGKILL (resumes from the last checkpoint) with bit-identical results."""

from __future__ import annotations

import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import (
    REPO,
    cli_args,
    read_metrics,
    read_params,
    reference_data,
    reference_run,
    subprocess_env,
)

from paligemma_seg.train import checkpoint
from paligemma_seg.train import loop as train_loop


def _state(value: float) -> dict:
    return {
        "step": jnp.int32(value),
        "params": {"llm": {"w": jnp.full((4, 3), value)}, "img": {"b": jnp.arange(3.0)}},
        "opt_state": ({"llm": {"w": jnp.full((4, 3), -value)}}, ()),
        "rng": jax.random.PRNGKey(7),
    }


def _abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )


def test_checkpointer_roundtrip_keeps_last_k(tmp_path):
    checkpointer = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2, async_save=True)
    for step in (1, 2, 3):
        checkpointer.save(step, _state(step), {"step": step, "examples_seen": 8 * step})
    checkpointer.wait()
    assert checkpointer.latest_step() == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]
    restored, meta = checkpointer.restore(3, _abstract(_state(0)))
    checkpointer.close()
    assert meta == {"step": 3, "examples_seen": 24}
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, _state(3))
    params = checkpoint.restore_params(tmp_path / "ckpt", _abstract(_state(0)["params"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, _state(3)["params"])
    assert checkpoint.is_orbax_checkpoint(tmp_path / "ckpt") and checkpoint.is_orbax_checkpoint(
        tmp_path / "ckpt" / "2"
    )
    assert not checkpoint.is_orbax_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="not an orbax checkpoint"):
        checkpoint.restore_params(tmp_path, _abstract(_state(0)["params"]))


def _start(args, env) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )


def _wait_for(process: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    """Reads the child's stderr until `marker` appears; returns what was read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    process.kill()
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill_is_bit_identical(tmp_path_factory):
    """Run A stops on SIGTERM after step 2 (saves step 2, exits 0); run B resumes from 2, checkpoints
    step 3 and is SIGKILLed after step 4; run C resumes from 3 and finishes. C's final parameters and
    its losses for steps 4-6 equal the uninterrupted run's bit for bit."""
    base = tmp_path_factory.getbasetemp()
    reference = reference_run(base)
    workdir = tmp_path_factory.mktemp("resumed")
    args = cli_args(reference_data(base), workdir)

    run_a = _start(args, subprocess_env(**{train_loop.PAUSE_ENV: "2"}))
    _wait_for(run_a, "PAUSED after step 2")
    run_a.send_signal(signal.SIGTERM)
    rest = run_a.communicate(timeout=120)[1]
    assert run_a.returncode == 0, rest[-3000:]
    assert (workdir / "checkpoints" / "2").is_dir() and not (workdir / "params.npz").exists()

    run_b = _start(args, subprocess_env(**{train_loop.PAUSE_ENV: "4"}))
    log_b = _wait_for(run_b, "PAUSED after step 4")
    run_b.send_signal(signal.SIGKILL)
    run_b.communicate(timeout=60)
    assert "Resuming from" in log_b and "checkpoints/2 " in log_b
    assert (workdir / "checkpoints" / "3").is_dir() and not (workdir / "checkpoints" / "4").exists()

    run_c = subprocess.run(
        args, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run_c.returncode == 0, run_c.stderr[-3000:]
    assert "checkpoints/3 (data position: 24 examples)" in run_c.stderr

    expected, got = read_params(reference), read_params(workdir)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # metrics.jsonl: steps 1..6 once each (what killed runs logged after their checkpoint is
    # dropped on resume), with the uninterrupted run's losses.
    reference_losses = [(r["step"], r["loss"]) for r in read_metrics(reference)]
    assert [(r["step"], r["loss"]) for r in read_metrics(workdir)] == reference_losses


def _target(params: dict, dtypes: dict | None = None) -> dict:
    """ShapeDtypeStructs on the first device; `dtypes` maps top-level subtrees to a dtype."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {
        top: jax.tree_util.tree_map(
            lambda x, top=top: jax.ShapeDtypeStruct(
                x.shape, (dtypes or {}).get(top, x.dtype), sharding=device
            ),
            subtree,
        )
        for top, subtree in params.items()
    }


def test_init_from_orbax_checkpoint_restores_trained_params(tmp_path_factory):
    from train_fixtures import tiny_config

    from paligemma_seg import experiment
    from paligemma_seg.train import optim

    base = tmp_path_factory.getbasetemp()
    reference = reference_run(base)
    cfg = tiny_config(reference_data(base), init=str(reference / "checkpoints"))
    model, _ = experiment.build_model(cfg)
    expected = optim.unflatten(read_params(reference))
    params = experiment.initial_params(cfg, model, jax.random.PRNGKey(1), _target(expected))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), expected)


def test_init_from_hf_directory_casts_frozen_weights(tmp_path):
    import dataclasses

    import model_fixtures
    from train_fixtures import load_config

    from paligemma_seg import experiment, weights

    directory = model_fixtures.save_tiny_hf(tmp_path / "hf", 1)
    cfg = load_config("water_tiny")
    our = model_fixtures.our_tiny_config(1)
    cfg.model.overrides.vision.update(dataclasses.asdict(our.vision))
    cfg.model.overrides.llm.update(dataclasses.asdict(our.llm))
    cfg.init = str(directory)
    model, _ = experiment.build_model(cfg)
    _, expected = weights.load(directory, llm=dataclasses.asdict(our.llm))
    target = _target(expected, {"img": jnp.bfloat16})  # e.g. a frozen image encoder stored in bf16
    params = jax.device_get(experiment.initial_params(cfg, model, jax.random.PRNGKey(0), target))
    assert params["img"]["head"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        params["llm"]["final_norm"]["scale"], expected["llm"]["final_norm"]["scale"]
    )
    np.testing.assert_array_equal(
        params["img"]["head"]["kernel"], expected["img"]["head"]["kernel"].astype(jnp.bfloat16)
    )


def test_resume_refuses_changed_training_data(tmp_path, caplog):
    """checkpoint_meta records the training JSONL (path, sha256); resuming on other data is a
    one-line error naming both hashes, the JSONL and the fix; old metas resume with a warning."""
    import hashlib
    import logging

    from train_fixtures import tiny_config, write_dataset

    from paligemma_seg.train import setup as setup_lib

    data = write_dataset(tmp_path / "data", num=6)
    cfg = tiny_config(data)
    train = data / "train.jsonl"
    digest = hashlib.sha256(train.read_bytes()).hexdigest()
    setup_lib._train_data(cfg, read=True)  # what setup does when it reads the data
    meta = setup_lib.checkpoint_meta(cfg, 3)
    assert meta["train_data"] == {"path": str(train), "sha256": digest}
    setup_lib._check_meta(cfg, meta)  # same data: fine

    train.write_text(train.read_text().replace("water", "lake"))
    changed = hashlib.sha256(train.read_bytes()).hexdigest()
    setup_lib._train_data(cfg, read=True)
    with pytest.raises(ValueError) as error:
        setup_lib._check_meta(cfg, meta)
    message = str(error.value)
    assert "\n" not in message
    assert f"trained on {train} (sha256 {digest[:12]})" in message
    assert f"now has sha256 {changed[:12]}" in message
    assert "restore the data it was trained on, or start a new --workdir" in message

    old = {k: v for k, v in meta.items() if k != "train_data"}  # written before the field existed
    with caplog.at_level(logging.WARNING):
        setup_lib._check_meta(cfg, old)
    assert "does not record its training data" in caplog.text
