"""Unit tests of the model's own pieces: masks, configs and presets, parameter tree, dtypes, variants."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh

from paligemma_seg import model as pg
from paligemma_seg.model import layers
from paligemma_seg.model.paligemma import make_attn_mask, sliding_window_mask

BIG_VISION_COUNTS = {  # jax.eval_shape of big_vision's model (BIG_VISION_FACTS.md).
    "pg1-3b-224": 2_923_335_408,
    "pg2-3b-224": 3_032_094_960,
}


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@functools.cache
def _forward(config):
    """jit(apply) per config: tests sharing a config and input shapes compile once."""
    model = pg.PaliGemma(config)
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args))


def _batch(config, seed=0):
    """Two examples of 6 tokens: prefix of 3 (mask_ar 0), suffix of 3."""
    rng = np.random.default_rng(seed)
    side = config.vision.image_size
    image = rng.uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
    text = rng.integers(1, config.llm.vocab_size, (2, 6)).astype(np.int32)
    mask_ar = np.array([[0, 0, 0, 1, 1, 1]] * 2, np.int32)
    return image, text, mask_ar, np.ones((2, 6), np.int32)


@pytest.fixture(scope="module")
def tiny2():
    """Tiny PaliGemma 2 (window 8, both soft-caps) with random init."""
    config = pg.tiny_config(2, compat="transformers")
    return config, pg.init_params(config, jax.random.PRNGKey(0))


def test_make_attn_mask_prefix_lm_blocks_and_padding():
    mask_ar = np.array([[1, 0, 1, 0, 1, 0, 0, 1, 0, 0]], np.int32)
    mask_input = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]], np.int32)
    got = np.asarray(make_attn_mask(mask_ar, mask_input))[0].astype(int)
    # Blocks {0,1} {2,3} {4,5,6} {7,8,(9 padding)}: full inside a block, causal between blocks.
    expected = np.array(
        [
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # Padding attends to nothing and is never attended.
        ]
    )
    np.testing.assert_array_equal(got, expected)


def test_make_attn_mask_causal_and_prefix_examples():
    causal = np.asarray(make_attn_mask(np.ones((1, 4), np.int32), np.ones((1, 4), np.int32)))[0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4), bool)))
    prefix = np.asarray(make_attn_mask(np.array([[0, 0, 1, 1]]), np.ones((1, 4), np.int32)))[0]
    np.testing.assert_array_equal(
        prefix.astype(int), [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    )


def test_sliding_window_mask_limits_causal_part_but_keeps_prefix_block():
    mask_ar = np.array([[0, 0, 0, 0, 1, 1, 1]], np.int32)
    valid = np.ones((1, 7), np.int32)
    positions = np.arange(7)[None]
    local = np.asarray(sliding_window_mask(make_attn_mask(mask_ar, valid), mask_ar, positions, 2))
    local = local[0].astype(int)
    assert local[0].tolist() == [1, 1, 1, 1, 0, 0, 0]  # Prefix sees the whole prefix (distance 3).
    assert local[4].tolist() == [0, 0, 0, 1, 1, 0, 0]  # Suffix sees 2 positions: itself and 1 back.
    assert local[6].tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_presets_have_published_sizes_and_compat():
    names = set(pg.PRESETS)
    for size in ("pg1-3b", "pg2-3b", "pg2-10b", "pg2-28b"):
        assert {f"{size}-{res}" for res in (224, 448, 896)} <= names
    pg1 = pg.get_preset("pg1-3b-896")
    assert pg1.vision.image_size == 896 and pg1.num_image_tokens == 4096
    assert (pg1.llm.width, pg1.llm.depth, pg1.llm.num_kv_heads) == (2048, 18, 1)
    assert pg1.llm.vocab_size == 257_152 and pg1.vision.mlp_dim == 4304
    big_vision = pg.get_preset("pg2-10b-224")
    assert big_vision.llm.sliding_window is None and big_vision.llm.final_logits_softcap is None
    assert big_vision.llm.attn_logits_softcap == 50.0 and big_vision.llm.post_norms
    hf = pg.get_preset("pg2-10b-224", compat="transformers")
    assert (hf.llm.sliding_window, hf.llm.final_logits_softcap) == (4096, 30.0)
    assert (hf.llm.width, hf.llm.depth, hf.llm.num_heads, hf.llm.num_kv_heads) == (3584, 42, 16, 8)
    assert pg.get_preset("pg1-3b-224", compat="transformers") == pg.get_preset("pg1-3b-224")
    big = pg.get_preset("pg2-28b-448")
    assert big.llm.query_scale == pytest.approx(144**-0.5) and big.llm.head_dim == 128
    assert pg.get_preset("pg2-3b-224").llm.query_scale == pytest.approx(256**-0.5)


def test_get_preset_errors_name_the_fix():
    with pytest.raises(ValueError, match="Unknown PaliGemma preset 'pg3'.*pg1-3b-224"):
        pg.get_preset("pg3")
    with pytest.raises(ValueError, match="compat='hf'"):
        pg.get_preset("pg2-3b-224", compat="hf")
    with pytest.raises(ValueError, match=r"Unknown GemmaConfig field\(s\) \['widht'\]"):
        pg.get_preset("pg1-3b-224", llm={"widht": 4})
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        pg.GemmaConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="dtype='float64'"):
        pg.get_preset("tiny", dtype="float64")
    with pytest.raises(ValueError, match="image_size=30 must be a multiple of patch_size=14"):
        pg.SiglipConfig(image_size=30)


def test_overrides_reach_nested_fields():
    config = pg.get_preset("pg2-3b-448", dtype="bfloat16", llm={"sliding_window": 128})
    assert config.dtype == "bfloat16" and config.llm.sliding_window == 128
    assert config.llm.width == 2304 and config.vision.image_size == 448


@pytest.mark.parametrize("name", sorted(BIG_VISION_COUNTS))
def test_param_count_equals_big_vision(name):
    shapes = pg.param_shapes(pg.get_preset(name))
    assert _count(shapes) == BIG_VISION_COUNTS[name]
    assert shapes["llm"]["embedder"]["input_embedding"].shape == (
        257_152,
        2304 if "pg2" in name else 2048,
    )


def test_logical_axes_mirror_params(tiny2):
    config, params = tiny2
    axes = pg.logical_axes(config)
    flat_axes = traverse_util.flatten_dict(axes, is_leaf=lambda _, x: isinstance(x, tuple))
    flat_params = traverse_util.flatten_dict(params)
    assert flat_axes.keys() == flat_params.keys()
    for key, names in flat_axes.items():
        assert len(names) == flat_params[key].ndim, key
    layers = ("llm", "layers", "attn", "kv_einsum", "w")
    assert flat_axes[layers] == ("layers", None, "kv_heads", "embed", "head_dim")
    assert flat_axes[("llm", "embedder", "input_embedding")] == ("vocab", "embed")
    mlp = ("img", "Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "kernel")
    assert flat_axes[mlp] == ("layers", "embed", "mlp")


def test_init_params_are_plain_arrays_in_param_dtype(tiny2):
    _, params = tiny2
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32 for leaf in leaves)
    assert float(jnp.abs(params["img"]["head"]["kernel"]).max()) > 0  # Image tokens reach the LLM.
    shapes = pg.param_shapes(pg.tiny_config(1, param_dtype="bfloat16"))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_logits_float32_in_bf16_compute_and_close_to_f32(tiny2):
    config, params = tiny2
    batch = _batch(config)
    f32 = _forward(config)(params, *batch)
    bf16 = _forward(config.replace(dtype="bfloat16"))(params, *batch)
    assert f32.dtype == bf16.dtype == jnp.float32 and f32.shape == (2, 6, config.llm.vocab_size)
    scale = float(jnp.abs(f32).max())
    assert 0 < float(jnp.abs(f32 - bf16).max()) < 0.05 * scale


def test_unrolled_layers_and_remat_match_scan(tiny2):
    config, params = tiny2
    batch = _batch(config)
    reference = _forward(config)(params, *batch)
    for variant in (config.replace(scan_layers=False), config.replace(remat=True)):
        np.testing.assert_allclose(_forward(variant)(params, *batch), reference, atol=1e-5)
    # The backward pass of the remat variant recomputes each block (traced only: compiling is slow).
    model = pg.PaliGemma(config.replace(remat=True))
    loss = lambda p: jnp.mean(model.apply({"params": p}, *batch) ** 2)
    assert " remat" in str(jax.make_jaxpr(jax.grad(loss))(params))


def test_padding_is_never_attended(tiny2):
    config, params = tiny2
    image, text, _, _ = _batch(config)
    # Slots 1 and 2 are padding inside the full-attention prefix block, visible to every token.
    mask_ar = np.array([[0, 0, 0, 0, 1, 1]] * 2, np.int32)
    mask_input = np.array([[1, 0, 0, 1, 1, 1]] * 2, np.int32)
    other = text.copy()
    other[:, 1:3] = (text[:, 1:3] + 17) % config.llm.vocab_size
    forward = _forward(config)
    logits = forward(params, image, text, mask_ar, mask_input)
    real = mask_input.astype(bool)
    np.testing.assert_array_equal(
        np.asarray(forward(params, image, other, mask_ar, mask_input))[real],
        np.asarray(logits)[real],
    )
    # The same change on real tokens moves every logit: the test would catch a leak.
    visible = forward(params, image, other, mask_ar, np.ones_like(mask_input))
    assert (
        float(
            jnp.abs(visible - forward(params, image, text, mask_ar, np.ones_like(mask_input)))[
                :, 0
            ].min()
        )
        > 0
    )


def test_image_changes_text_logits(tiny2):
    config, params = tiny2
    image, *rest = _batch(config)
    forward = _forward(config)
    assert (
        float(jnp.abs(forward(params, image, *rest) - forward(params, -image, *rest)).max()) > 1e-3
    )


def test_wrong_image_size_and_small_cache_raise(tiny2):
    config, params = tiny2
    model = pg.PaliGemma(config)
    image, text, mask_ar, _ = _batch(config)
    with pytest.raises(ValueError, match=r"image shape \(56, 56, 3\).*vision.image_size"):
        model.apply({"params": params}, np.zeros((2, 56, 56, 3), np.float32), text, mask_ar)
    with pytest.raises(ValueError, match="cache_size=5 is smaller than the prompt \\(10 ="):
        model.apply({"params": params}, image, text, mask_ar, cache_size=5, method=model.prefill)


def test_equal_heads_use_big_vision_fused_qkv():
    config = pg.tiny_config(1, llm={"num_kv_heads": 4})
    shapes = pg.param_shapes(config)["llm"]["layers"]["attn"]
    assert set(shapes) == {"qkv_einsum", "attn_vec_einsum"}
    assert shapes["qkv_einsum"]["w"].shape == (2, 3, 4, 64, 16)


def test_runs_under_a_mesh_with_logical_rules(tiny2):
    config, params = tiny2
    batch = _batch(config)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rules = (("batch", "data"),)
    model = pg.PaliGemma(config)
    expected = _forward(config)(params, *batch)
    with mesh, nn.logical_axis_rules(rules):
        got = jax.jit(model.apply)({"params": params}, *batch)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_config_is_hashable_and_frozen():
    config = pg.get_preset("pg2-3b-224")
    assert hash(config) == hash(pg.get_preset("pg2-3b-224"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dtype = "bfloat16"


@pytest.mark.parametrize(
    "eqn, x_shape, w_shape",
    [
        ("BTD,NDH->BTNH", (2, 3, 8), (4, 8, 5)),  # q_einsum
        ("BTNH,NHD->BTD", (2, 3, 4, 5), (4, 5, 8)),  # attn_vec_einsum
        ("BTD,DF->BTF", (2, 3, 8), (8, 6)),
    ],
)
def test_as_matrix_einsum_equals_einsum(eqn, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    matrix = layers.as_matrix(eqn, w)
    assert matrix.ndim == 2
    got = layers._matrix_einsum(eqn, x, matrix, w_shape)
    np.testing.assert_allclose(got, jnp.einsum(eqn, x, w), rtol=1e-5, atol=1e-5)


def test_as_matrix_rejects_einsums_that_are_not_row_matmuls():
    with pytest.raises(ValueError, match="not x\\[..., in\\] @ w\\[in, out\\]"):
        layers.as_matrix("BSD,CKDH->CBSKH", jnp.zeros((2, 1, 8, 4)))
