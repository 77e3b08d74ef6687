"""An HF directory's config.json decides the model's behaviour; K == N heads map both ways.

The oracle is transformers: tiny random checkpoints saved with `save_pretrained`, loaded by
`weights.load` with no overrides, must give transformers' logits; our export of them must load
back into transformers with the same behaviour fields and logits.
"""

import json

import jax
import jax.numpy as jnp
import model_fixtures as fx
import numpy as np
import pytest
import torch
import transformers

from paligemma_seg import weights
from paligemma_seg.model import get_preset
from paligemma_seg.weights import WeightsError
from paligemma_seg.weights.config import config_from_hf, config_from_shapes, shapes_from_config

PREFIXES, SUFFIXES = [3, 6], [10, 4]


def _hf_model(version: int, **text: object) -> transformers.PaliGemmaForConditionalGeneration:
    """The fixtures' tiny model with text_config fields changed (given to the config's init)."""
    fields = fx.hf_tiny_config(version).to_dict()
    fields["text_config"] = {**fields["text_config"], **text}
    fields["text_config"].pop("rope_parameters", None)  # rebuilt from rope_theta
    config = transformers.PaliGemmaConfig(**fields)
    torch.manual_seed(version)
    model = transformers.PaliGemmaForConditionalGeneration(config)
    fx._randomize(model, version)
    model.tie_weights()
    return model.eval()


def _logit_error(hf_model, directory) -> float:
    """Max-abs text-logit difference, ours (loaded from `directory`, no overrides) vs `hf_model`."""
    model, params = weights.load(directory)
    config = model.config
    batch = fx.make_batch(config, PREFIXES, SUFFIXES, seed=3)
    with torch.no_grad():
        oracle = hf_model(**fx.hf_inputs(batch, config.num_image_tokens)).logits.numpy()
    ours = fx.jitted_forward(config)(
        jax.tree.map(jnp.asarray, params),
        batch["image"], batch["text"], batch["mask_ar"], batch["mask_input"],
    )  # fmt: skip
    real = batch["mask_input"].astype(bool)
    return float(np.abs(np.asarray(ours) - oracle[:, config.num_image_tokens :])[real].max())


def test_behaviour_fields_come_from_config_json(tmp_path):
    """Non-default rope base, eps, query scalar, caps and window are all read from the file."""
    fields = dict(
        rope_theta=500.0, rms_norm_eps=1e-5, query_pre_attn_scalar=24,
        attn_logit_softcapping=7.0, final_logit_softcapping=3.0, sliding_window=6,
    )  # fmt: skip
    hf_model = _hf_model(2, **fields)
    hf_model.save_pretrained(tmp_path / "hf")
    config = weights.load_config(tmp_path / "hf")
    llm = config.llm
    assert (llm.rope_base, llm.norm_eps, llm.query_pre_attn_scalar) == (500.0, 1e-5, 24.0)
    assert (llm.attn_logits_softcap, llm.final_logits_softcap, llm.sliding_window) == (7.0, 3.0, 6)
    error = _logit_error(hf_model, tmp_path / "hf")
    print(f"fp32 max-abs logit error with the file's behaviour: {error:.2e}")
    assert error < 1e-4


def test_export_writes_the_behaviour_back(tmp_path):
    """config.json of our export describes the same model: load_config(export) == config."""
    hf_model = _hf_model(2, rope_theta=500.0, rms_norm_eps=1e-5, query_pre_attn_scalar=24)
    hf_model.save_pretrained(tmp_path / "hf")
    model, params = weights.load(tmp_path / "hf")
    out = weights.save_hf(params, model.config, tmp_path / "export")
    assert weights.load_config(out) == model.config
    reloaded = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    batch = fx.make_batch(model.config, PREFIXES, SUFFIXES, seed=5)
    inputs = fx.hf_inputs(batch, model.config.num_image_tokens)
    with torch.no_grad():
        assert torch.allclose(hf_model(**inputs).logits, reloaded(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_equal_kv_and_query_heads_use_the_fused_qkv_einsum(version, tmp_path):
    """K == N: big_vision's `qkv_einsum` [L, 3, N, D, H] from HF's q/k/v and back, bit-exact."""
    hf_model = _hf_model(version, num_key_value_heads=4)
    hf_model.save_pretrained(tmp_path / "hf")
    params, _ = weights.load_params(tmp_path / "hf")
    attn = params["llm"]["layers"]["attn"]
    assert set(attn) == {"qkv_einsum", "attn_vec_einsum"}
    assert attn["qkv_einsum"]["w"].shape == (2, 3, 4, 64, 16)
    assert _logit_error(hf_model, tmp_path / "hf") < 1e-4
    npz = weights.save_npz(params, tmp_path / "fused.npz")
    out = weights.convert(npz, tmp_path / "back")
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    reloaded = transformers.PaliGemmaForConditionalGeneration.from_pretrained(out).state_dict()
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.language_model.layers.1.self_attn.{name}.weight"
        np.testing.assert_array_equal(reloaded[key].numpy(), state[key])


def test_sizes_of_no_preset_get_the_family_behaviour_not_a_test_models():
    """An npz of unpublished sizes: Gemma 2's window is 4096 (transformers compat), not tiny's 8."""
    sizes = shapes_from_config(get_preset("tiny-pg2"))
    config = config_from_shapes(sizes, compat="transformers")
    assert config.llm.sliding_window == 4096 and config.llm.final_logits_softcap == 30.0
    assert config.llm.attn_logits_softcap == 50.0 and config.llm.query_pre_attn_scalar is None
    assert config_from_shapes(sizes).llm.sliding_window is None  # big_vision compat


def test_unsupported_layer_pattern_is_named():
    sizes = shapes_from_config(get_preset("tiny-pg2"))
    hf = {
        "text_config": {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}
    }
    with pytest.raises(WeightsError, match="layer_types"):
        config_from_hf(hf, sizes)


def test_published_pg2_config_gives_the_transformers_behaviour():
    """The hub's PaliGemma 2 config.json (no layer_types) -> window on even layers, both caps."""
    hf = json.loads(fx.published_hf_config("pg2-3b-224").to_json_string())
    config = config_from_hf(hf, shapes_from_config(get_preset("pg2-3b-224")))
    assert config == get_preset("pg2-3b-224", compat="transformers")
