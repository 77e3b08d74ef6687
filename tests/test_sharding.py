"""Partition rules on fake meshes (no devices), mesh/batch errors, optimizer-state specs, and a real
8-device CPU run that must match the single-device run."""

from __future__ import annotations

import types

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from train_fixtures import (
    cli_args,
    read_metrics,
    read_params,
    reference_data,
    reference_run,
    run_cli,
    subprocess_env,
)

from paligemma_seg import sharding
from paligemma_seg.model import get_preset, logical_axes, param_shapes, tiny_config
from paligemma_seg.train import optim

# 8 devices vs 1 device: same data, same math, only the reduction order differs (float32).
RTOL, ATOL = 1e-5, 1e-6


def _fake_mesh(data: int = 1, fsdp: int = 8) -> types.SimpleNamespace:
    return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp})


@pytest.fixture(scope="module")
def pg1():
    config = get_preset("pg1-3b-224")
    return param_shapes(config), logical_axes(config)


def test_rules_fsdp_split_every_large_pg1_parameter(pg1):
    params, axes = pg1
    specs, rows = sharding.param_specs(params, axes, _fake_mesh(), sharding.RULES["fsdp"])
    flat = optim.flatten(specs)
    assert flat["llm/embedder/input_embedding"] == P(None, "fsdp")  # [V, D]: D is split
    assert flat["llm/layers/mlp/linear"] == P(None, None, "fsdp")  # [L, F, D]: 'embed' rule first
    assert flat["llm/layers/attn/q_einsum/w"] == P(None, None, "fsdp", None)  # [L, N, D, H]
    assert flat["img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == P(None, "fsdp", None)
    for path, shape, spec, note in rows:
        size = np.prod(shape) * 4
        assert "fsdp" in spec or size < 2**20, (path, shape, spec)
        assert not note, (path, note)  # everything divides by 8
    assert len(rows) == len(flat)
    table = sharding.format_table(rows)
    assert "llm/layers/mlp/linear" in table and "(18, 16384, 2048)" in table


def test_rules_reject_indivisible_dim(pg1):
    params, axes = pg1
    with pytest.raises(ValueError, match=r"parameter .* cannot be split: .*% fsdp=3.*mesh\.fsdp"):
        sharding.param_specs(params, axes, _fake_mesh(fsdp=3), sharding.RULES["fsdp"])


def test_rules_replicate_small_indivisible_params_with_a_note():
    config = tiny_config(1)
    _, rows = sharding.param_specs(
        param_shapes(config), logical_axes(config), _fake_mesh(fsdp=3), sharding.RULES["fsdp"]
    )
    notes = [note for *_, note in rows if note]
    assert notes and all(n.startswith("replicated (small;") for n in notes)


def test_rules_replicated_strategy_splits_nothing(pg1):
    params, axes = pg1
    specs, _ = sharding.param_specs(params, axes, _fake_mesh(), sharding.RULES["replicated"])
    assert all(
        s == P(*([None] * len(s)))
        for s in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    )


def test_opt_state_specs_follow_parameters():
    params = {
        "w": jax.ShapeDtypeStruct((16, 8), np.float32),
        "b": jax.ShapeDtypeStruct((8,), np.float32),
    }
    specs = {"w": P("fsdp", None), "b": P(None)}
    adamw = optax.adamw(1e-3)
    opt = sharding.opt_state_specs(adamw, jax.eval_shape(adamw.init, params), specs, params)
    assert opt[0].mu == specs and opt[0].nu == specs and opt[0].count == P()
    adafactor = optax.adafactor(1e-3)
    big = {"w": jax.ShapeDtypeStruct((256, 128), np.float32)}
    opt = sharding.opt_state_specs(
        adafactor, jax.eval_shape(adafactor.init, big), {"w": P("fsdp", None)}, big
    )
    leaves = jax.tree_util.tree_leaves(opt, is_leaf=lambda x: isinstance(x, P))
    assert P("fsdp") in leaves  # the factored row statistics keep the row split


def test_make_mesh_and_batch_errors():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": len(jax.devices())}
    with pytest.raises(ValueError, match=r"mesh\.data=3 must divide the 1 devices"):
        sharding.make_mesh(data=3)
    with pytest.raises(
        ValueError, match=r"mesh\.data=1 x mesh\.fsdp=2 = 2 but there are 1 devices"
    ):
        sharding.make_mesh(data=1, fsdp=2)
    with pytest.raises(ValueError, match="strategy"):
        sharding.get_rules("tensor")
    eight = types.SimpleNamespace(devices=np.zeros(8))
    with pytest.raises(
        ValueError, match=r"batch_size=12 / optim\.grad_accum=1 .* multiple of the 8 devices"
    ):
        sharding.check_batch(eight, 12, 1)
    sharding.check_batch(eight, 16, 2)
    assert sharding.local_batch_rows(mesh, 8) == slice(0, 8)


@pytest.mark.slow
def test_eight_cpu_devices_match_one_device(tmp_path_factory):
    """3 + 3 steps with the parameters split over 8 fake CPU devices (fsdp=8) vs 1 device."""
    base = tmp_path_factory.getbasetemp()
    reference = reference_run(base)
    workdir = tmp_path_factory.mktemp("eight_devices")
    result = run_cli(cli_args(reference_data(base), workdir), subprocess_env(devices=8))
    assert "Mesh {'data': 1, 'fsdp': 8}" in result.stderr
    assert "llm/embedder/input_embedding" in result.stderr  # the sharding table
    one, eight = read_metrics(reference), read_metrics(workdir)
    assert [r["step"] for r in eight] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in one], rtol=RTOL)
    np.testing.assert_allclose(
        [r["grad_norm"] for r in eight], [r["grad_norm"] for r in one], rtol=RTOL
    )
    expected, got = read_params(reference), read_params(workdir)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)
