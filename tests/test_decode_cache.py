"""KV-cache decoding: prefill + decode_step reproduce the uncached forward pass and transformers.

A small jitted greedy loop (prefill, then `jax.lax.while_loop` over decode_step) runs on the tiny
random checkpoints of `model_fixtures` (PaliGemma 1, and PaliGemma 2 with a sliding window of 8 that
the decoded tokens run past). The decode loop of the project itself is `paligemma_seg/infer/decode.py`.
"""

import functools

import jax
import jax.numpy as jnp
import model_fixtures as fx
import numpy as np
import pytest
import torch

from paligemma_seg import model as pg
from paligemma_seg.model import lora, quant
from paligemma_seg.model.paligemma import unstacked_variables
from paligemma_seg.model.projections import PROJECTIONS
from paligemma_seg.weights import params_from_hf_state_dict
from paligemma_seg.weights.spec import flatten, unflatten

STEPS = 10
# Prompts: left-aligned, different lengths; example 1 already holds two suffix tokens (mask_ar 1).
PREFIXES, SUFFIXES = [4, 2, 6], [0, 2, 0]


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def tiny(request):
    """(version, HF model, our config, params) with weights converted from the HF model."""
    version = request.param
    hf_model = fx.build_hf_tiny(version, seed=10 + version)
    params, _ = params_from_hf_state_dict(hf_model.state_dict(), hf_model.config)
    params = jax.tree.map(jnp.asarray, params)
    return version, hf_model, fx.our_tiny_config(version), params


@functools.partial(jax.jit, static_argnames=("model", "steps", "cache_size"))
def greedy(model, params, batch, *, steps, cache_size):
    """Greedy decoding: -> (tokens int32[B, steps], logits float32[B, steps, V], final cache)."""
    variables = {"params": params}
    logits, cache = model.apply(
        variables, batch["image"], batch["text"], batch["mask_ar"], batch["mask_input"],
        cache_size=cache_size, method=model.prefill,
    )  # fmt: skip
    size = logits.shape[0]
    tokens = jnp.zeros((size, steps), jnp.int32)
    all_logits = jnp.zeros((size, steps, logits.shape[-1]), jnp.float32)

    def body(state):
        step, logits, cache, tokens, all_logits = state
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens = tokens.at[:, step].set(token)
        all_logits = all_logits.at[:, step].set(logits)
        logits, cache = model.apply(variables, token, cache, method=model.decode_step)
        return step + 1, logits, cache, tokens, all_logits

    state = (jnp.zeros((), jnp.int32), logits, cache, tokens, all_logits)
    _, _, cache, tokens, all_logits = jax.lax.while_loop(lambda s: s[0] < steps, body, state)
    return tokens, all_logits, cache


@functools.cache
def _model(config):
    """One module per config, so `greedy` (static on the module) compiles once per config."""
    return pg.PaliGemma(config)


def _run(config, params, batch):
    """Greedy STEPS tokens with a cache that fits exactly."""
    cache_size = config.num_image_tokens + batch["text"].shape[1] + STEPS
    return greedy(_model(config), params, batch, steps=STEPS, cache_size=cache_size)


def _prompts(config):
    batch = fx.make_batch(config, PREFIXES, SUFFIXES, seed=3)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _uncached_next_logits(config, params, batch, tokens):
    """Logits after each prompt + tokens[:, :k], k = 0..steps-1, from full forward passes."""
    prompt_lengths = np.asarray(batch["mask_input"]).sum(1)
    size, steps = tokens.shape
    length = batch["text"].shape[1] + steps
    forward = fx.jitted_forward(config)
    out = []
    for k in range(steps):
        text = np.zeros((size, length), np.int32)
        mask_ar = np.ones((size, length), np.int32)
        mask_input = np.zeros((size, length), np.int32)
        for i, prompt in enumerate(prompt_lengths):
            text[i, :prompt] = batch["text"][i, :prompt]
            text[i, prompt : prompt + k] = tokens[i, :k]
            mask_ar[i, :prompt] = batch["mask_ar"][i, :prompt]
            mask_input[i, : prompt + k] = 1
        logits = np.asarray(forward(params, batch["image"], text, mask_ar, mask_input))
        out.append(logits[np.arange(size), prompt_lengths + k - 1])
    return np.stack(out, axis=1)


def test_cached_greedy_equals_uncached_argmax(tiny):
    version, _, config, params = tiny
    batch = _prompts(config)
    tokens, logits, cache = _run(config, params, batch)
    tokens, logits = np.asarray(tokens), np.asarray(logits)
    reference = _uncached_next_logits(config, params, batch, tokens)
    np.testing.assert_array_equal(tokens, reference.argmax(-1))
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    assert (
        int(cache.index) == cache.size == config.num_image_tokens + batch["text"].shape[1] + STEPS
    )
    if version == 2:  # The decoded tokens reach past the window, so it is exercised.
        reach = int(cache.next_position.min()) - config.num_image_tokens
        assert reach > config.llm.sliding_window


def test_cached_greedy_equals_transformers_generate(tiny):
    _, hf_model, config, params = tiny
    batch = _prompts(config)
    tokens, _, _ = _run(config, params, batch)
    hf_model.generation_config.eos_token_id = None  # Run all STEPS, as our loop does.
    hf_model.generation_config.pad_token_id = 0
    numpy_batch = {k: np.asarray(v) for k, v in batch.items()}
    for i, prompt in enumerate(numpy_batch["mask_input"].sum(1)):
        one = {
            k: v[i : i + 1, :prompt] if v.ndim == 2 else v[i : i + 1]
            for k, v in numpy_batch.items()
        }
        inputs = fx.hf_inputs(one, config.num_image_tokens)
        with torch.no_grad():
            out = hf_model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        generated = out[0, inputs["input_ids"].shape[1] :].numpy()
        np.testing.assert_array_equal(np.asarray(tokens[i]), generated, err_msg=f"example {i}")


def test_bf16_cache_keeps_greedy_tokens_close(tiny):
    _, _, config, params = tiny
    batch = _prompts(config)
    _, f32_logits, _ = _run(config, params, batch)
    _, bf16_logits, cache = _run(config.replace(cache_dtype="bfloat16"), params, batch)
    assert cache.k.dtype == cache.v.dtype == jnp.bfloat16
    difference = float(jnp.abs(f32_logits - bf16_logits).max())
    assert 0 < difference < 0.1


def test_decode_step_ignores_prompt_padding(tiny):
    """Padding slots in the middle of the cache never change what later tokens see."""
    _, _, config, params = tiny
    batch = _prompts(config)
    other = dict(batch, text=jnp.where(batch["mask_input"] == 1, batch["text"], 5))
    _, first, _ = _run(config, params, batch)
    _, second, _ = _run(config, params, other)
    np.testing.assert_array_equal(first, second)  # Masked slots get exactly zero weight.


def _adapted_int8(config, params, seed=7, std=0.3):
    """params with int8 projections and random LoRA adapters on every projection (B != 0)."""
    flat = flatten(params)
    int8 = {k: quant.quantize(np.asarray(v), PROJECTIONS[k]) if k in PROJECTIONS else v
            for k, v in flat.items()}  # fmt: skip
    shapes, _ = lora.adapter_shapes(
        {k: jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for k, v in flat.items()},
        flatten(pg.logical_axes(config)),
        lora.LoraSettings(rank=4, alpha=8.0, targets="|".join(f"^{p}$" for p in PROJECTIONS)),
    )
    rng = np.random.default_rng(seed)
    draw = lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32)
    pairs = {path: s.replace(a=draw(s.a), b=draw(s.b)) for path, s in shapes.items()}
    return {**unflatten(int8), "lora": unflatten(pairs)}


@pytest.mark.parametrize("adapted", [False, True], ids=["plain", "lora_int8"])
def test_unstacked_decode_step_equals_stacked(tiny, adapted):
    """`PaliGemma(unstacked_llm=True)` on `unstacked_variables` (per-layer weights, split gating,
    per-layer cache; what decoding runs on CPU) gives the stacked model's logits and cache."""
    _, _, config, params = tiny
    if adapted:
        params = _adapted_int8(config, params)
    variables = lora.variables(params)
    batch = _prompts(config)
    model = _model(config)
    cache_size = config.num_image_tokens + batch["text"].shape[1] + 3
    args = (batch["image"], batch["text"], batch["mask_ar"], batch["mask_input"])
    logits, cache = model.apply(variables, *args, cache_size=cache_size, method=model.prefill)
    unstacked = model.clone(unstacked_llm=True)
    split = unstacked_variables(variables, config)
    mlp = split["params"]["llm"]["layers_1"]["mlp"]
    if not adapted:  # (An int8 gating weight stays one Quantized leaf.)
        assert "gating_einsum" not in mlp
        assert mlp["gating_einsum_1"].shape == (config.llm.width, config.llm.mlp_dim)
        attn = split["params"]["llm"]["layers_1"]["attn"]
        heads = config.llm.num_heads * config.llm.head_dim
        assert attn["q_einsum"]["w_matrix"].shape == (config.llm.width, heads)
        assert attn["attn_vec_einsum"]["w_matrix"].shape == (heads, config.llm.width)
        assert "w" not in attn["q_einsum"]  # one copy of the weight, not two
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    step = lambda m, v, c: m.apply(v, token, c, method=m.decode_step)
    want, want_cache = step(model, variables, cache)
    got, got_cache = step(unstacked, split, cache.unstacked())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for layer in range(config.llm.depth):  # (Fusion order differs: float rounding only.)
        for got_kv, want_kv in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
            np.testing.assert_allclose(np.asarray(got_kv[layer]), want_kv[layer], atol=1e-5)
    assert got_cache.size == want_cache.size == cache_size
    if adapted:  # The adapters matter: the base model alone gives other logits.
        base = step(model, {"params": {k: v for k, v in params.items() if k != "lora"}}, cache)
        assert np.abs(np.asarray(base[0]) - np.asarray(want)).max() > 1e-2
