"""Our logits equal transformers' on tiny random PaliGemma 1/2 checkpoints; full-size shapes match.

The oracle: transformers 5.x `PaliGemmaForConditionalGeneration` (eager attention, token_type_ids for
the prefix), saved with `save_pretrained` and read back by `paligemma_seg.weights.load` (no overrides). Measured on
the batch below (CPU): fp32 max-abs ~2e-6 (PG1 and PG2); bf16 ~0.03-0.04 against transformers in
bf16, on logits of magnitude ~4-6, and closer to the fp32 logits than transformers' own bf16 run.
"""

import jax
import jax.numpy as jnp
import model_fixtures as fx
import numpy as np
import pytest
import torch

from paligemma_seg import model as pg
from paligemma_seg import weights
from paligemma_seg.weights import hf as weights_hf
from paligemma_seg.weights import spec as weights_tree

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.1  # Max-abs vs transformers in bf16; both round differently (see the docstring).
# Prefix/suffix lengths: different per example, with padding; the PG2 suffixes run past the window.
PREFIXES, SUFFIXES = [3, 6, 2], [10, 4, 12]


_LOADED: dict[int, tuple] = {}


def _load_tiny(version, tmp_path_factory):
    """(version, HF model, our config, our params loaded from its save_pretrained directory)."""
    if version not in _LOADED:
        hf_model = fx.build_hf_tiny(version, seed=version)
        directory = tmp_path_factory.mktemp(f"pg{version}")
        hf_model.save_pretrained(directory)
        expected = fx.our_tiny_config(version)
        # Sizes come from the tensors, behaviour (soft-caps, window, scaling) from config.json.
        model, params = weights.load(directory)
        assert model.config == expected
        _LOADED[version] = (version, hf_model, expected, params)
    return _LOADED[version]


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def tiny(request, tmp_path_factory):
    return _load_tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_pg2(tmp_path_factory):
    return _load_tiny(2, tmp_path_factory)


def _compare(tiny, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ours, transformers in `dtype`, transformers fp32, mask of real tokens) text logits."""
    _, hf_model, config, params = tiny
    batch = fx.make_batch(config, PREFIXES, SUFFIXES, seed=7)
    inputs = fx.hf_inputs(batch, config.num_image_tokens)
    with torch.no_grad():
        reference = hf_model(**inputs).logits.float().numpy()
        if dtype == "bfloat16":
            bf16_model = fx.build_hf_tiny(tiny[0], seed=tiny[0]).to(torch.bfloat16)
            oracle = bf16_model(**inputs).logits.float().numpy()
        else:
            oracle = reference
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    ours = fx.jitted_forward(config.replace(dtype=dtype))(
        params, batch["image"], batch["text"], batch["mask_ar"], batch["mask_input"]
    )
    text = slice(config.num_image_tokens, None)
    real = batch["mask_input"].astype(bool)
    return np.asarray(ours), oracle[:, text], reference[:, text], real


def test_fp32_logits_match_transformers(tiny):
    ours, oracle, _, real = _compare(tiny, "float32")
    error = np.abs(ours - oracle)[real].max()
    print(f"PG{tiny[0]} fp32 max-abs logit error: {error:.2e}")
    assert error < FP32_TOLERANCE
    assert np.abs(oracle[real]).max() > 1.0  # The logits are not trivially small.


def test_bf16_logits_match_transformers(tiny):
    ours, oracle, reference, real = _compare(tiny, "bfloat16")
    error = np.abs(ours - oracle)[real].max()
    ours_drift = np.abs(ours - reference)[real].max()
    hf_drift = np.abs(oracle - reference)[real].max()
    print(f"PG{tiny[0]} bf16 max-abs vs transformers bf16: {error:.3f} (drift from fp32: ours "
          f"{ours_drift:.3f}, transformers {hf_drift:.3f})")  # fmt: skip
    assert error < BF16_TOLERANCE
    assert ours_drift < 1.5 * hf_drift  # Not less precise than transformers' own bf16.


def test_pg2_window_and_soft_caps_are_exercised(tiny_pg2):
    """Turning off any Gemma 2 feature moves the logits far past the tolerance: the batch tests them."""
    _, hf_model, config, params = tiny_pg2
    batch = fx.make_batch(config, PREFIXES, SUFFIXES, seed=7)
    args = (batch["image"], batch["text"], batch["mask_ar"], batch["mask_input"])
    with torch.no_grad():
        oracle = hf_model(**fx.hf_inputs(batch, config.num_image_tokens)).logits.numpy()
    oracle = oracle[:, config.num_image_tokens :]
    real = batch["mask_input"].astype(bool)
    for change in ("sliding_window", "attn_logits_softcap", "final_logits_softcap"):
        logits = fx.jitted_forward(config.replace(llm={change: None}))(params, *args)
        assert np.abs(np.asarray(logits) - oracle)[real].max() > 0.1, change


@pytest.mark.parametrize("name", ["pg1-3b-224", "pg2-3b-224", "pg2-10b-224"])
def test_full_size_shapes_match_transformers_on_meta_device(name):
    hf = {weights_hf.canonical_name(k): v for k, v in fx.meta_hf_shapes(name).items()}
    ours = weights_tree.flatten(pg.param_shapes(pg.get_preset(name)))
    ours = {key: tuple(leaf.shape) for key, leaf in ours.items()}
    sizes = weights_tree.shapes_from_tree(ours)
    assert weights_tree.expected_shapes(sizes) == ours  # The loader's table is our tree.
    # Every HF tensor, through the loader's mapping, lands on our tree with the same shape...
    mapped = weights_hf.hf_shapes(sizes)
    embedding = weights_hf.TEXT + "embed_tokens.weight"
    assert hf.pop(embedding) == (fx.HUB_VOCAB, sizes.width)  # ...but the hub's padded vocabulary.
    assert mapped.pop(embedding) == (pg.get_preset(name).llm.vocab_size, sizes.width)
    assert hf == mapped
    # Counts: transformers has the 64 padding rows; neither has a pooling head or a separate lm_head.
    hf_total = sum(int(np.prod(s)) for s in fx.meta_hf_shapes(name).values())
    our_total = sum(int(np.prod(s)) for s in ours.values())
    assert hf_total == our_total + (fx.HUB_VOCAB - 257_152) * sizes.width
    print(f"{name}: ours {our_total:,} parameters, transformers {hf_total:,}")
