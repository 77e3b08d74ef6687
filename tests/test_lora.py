"""LoRA and int8 frozen weights: our adapted forward against PEFT's on the tiny HF PaliGemma, the
merged export against the unmerged forward, the PEFT-format round trip, int8's logit error, and a
short LoRA run (validation loss falls, only adapters change, resume is bit-exact).

Oracle: transformers 5.x `PaliGemmaForConditionalGeneration` + `peft.PeftModel.from_pretrained`
reading our `save_peft` directory. Measured (CPU, fp32): max-abs logit error vs PEFT ~1e-6.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import model_fixtures as fx
import numpy as np
import peft
import pytest
import torch

from paligemma_seg import weights
from paligemma_seg.model import PaliGemma, logical_axes, lora, quant
from paligemma_seg.model.projections import PROJECTIONS
from paligemma_seg.weights import peft as peft_format
from paligemma_seg.weights.spec import flatten, unflatten

FP32_TOLERANCE = 1e-5  # The bound for our LoRA forward vs PEFT's.
PREFIXES, SUFFIXES = [3, 6, 2], [10, 4, 12]
EVERY_PROJECTION = "|".join(f"^{p}$" for p in PROJECTIONS)  # LLM, SigLIP and the projector


@functools.cache
def _tiny(version: int, directory: str) -> tuple:
    """(HF directory, our config, our base params) of the tiny HF model of `version`."""
    hf_model = fx.build_hf_tiny(version, seed=version)
    hf_model.save_pretrained(directory)
    model, params = weights.load(directory)
    return directory, model.config, params


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def tiny(request, tmp_path_factory):
    return _tiny(request.param, str(tmp_path_factory.mktemp(f"hf_pg{request.param}")))


def _random_adapters(config, params, settings, seed=0, std=0.05):
    """params + 'lora' with random A and B (B != 0, so the adapters change the logits)."""
    flat_shapes = flatten(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    shapes, _ = lora.adapter_shapes(flat_shapes, flatten(logical_axes(config)), settings)
    rng = np.random.default_rng(seed)
    draw = lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32)
    pairs = {path: s.replace(a=draw(s.a), b=draw(s.b)) for path, s in shapes.items()}
    return {**params, "lora": unflatten(pairs)}


@functools.cache
def _forward(config):
    model = PaliGemma(config)
    return jax.jit(lambda params, *args: model.apply(lora.variables(params), *args))


def _logits(config, params, batch):
    args = (batch["image"], batch["text"], batch["mask_ar"], batch["mask_input"])
    return np.asarray(_forward(config)(params, *args))


def _peft_logits(hf_dir, version, adapter_dir, batch, num_image_tokens):
    hf_model = fx.build_hf_tiny(version, seed=version)
    served = peft.PeftModel.from_pretrained(hf_model, str(adapter_dir))
    served.eval()
    with torch.no_grad():
        logits = served(**fx.hf_inputs(batch, num_image_tokens)).logits.float().numpy()
    return logits[:, num_image_tokens:]


@pytest.fixture(scope="module")
def tiny_pg2(tmp_path_factory):
    return _tiny(2, str(tmp_path_factory.mktemp("hf_pg2_only")))


def test_lora_forward_matches_peft(tiny, tmp_path):
    _check_against_peft(tiny, tmp_path, lora.DEFAULT_TARGETS)


def test_lora_on_every_projection_matches_peft(tiny_pg2, tmp_path):
    """SigLIP's attention/MLP and the image-to-LLM projector too."""
    _check_against_peft(tiny_pg2, tmp_path, EVERY_PROJECTION)


def _check_against_peft(tiny, tmp_path, targets):
    hf_dir, config, params = tiny
    version = 2 if config.llm.post_norms else 1
    settings = lora.LoraSettings(rank=4, alpha=8.0, targets=targets)
    adapted = _random_adapters(config, params, settings)
    batch = fx.make_batch(config, PREFIXES, SUFFIXES, seed=7)
    ours = _logits(config, adapted, batch)
    peft_format.save_peft(adapted, tmp_path / "adapter")
    theirs = _peft_logits(hf_dir, version, tmp_path / "adapter", batch, config.num_image_tokens)
    real = batch["mask_input"].astype(bool)
    error = np.abs(ours - theirs)[real].max()
    moved = np.abs(ours - _logits(config, params, batch))[real].max()
    print(f"PG{version} LoRA {targets[:12]}: max-abs vs PEFT {error:.2e}, moved {moved:.2f}")
    assert error <= FP32_TOLERANCE
    assert moved > 100 * FP32_TOLERANCE  # The adapters really change the logits.


def test_peft_format_round_trips(tiny, tmp_path):
    _, config, params = tiny
    adapted = _random_adapters(config, params, lora.LoraSettings(rank=3, alpha=6.0), seed=1)
    peft_format.save_peft(adapted, tmp_path)
    loaded = peft_format.load_peft(tmp_path, params)
    want, got = lora.flatten_adapters(adapted), lora.flatten_adapters(loaded)
    assert sorted(want) == sorted(got)
    for path in want:
        np.testing.assert_array_equal(got[path].a, want[path].a)
        np.testing.assert_array_equal(got[path].b, want[path].b)
        assert got[path].scale == want[path].scale == 2.0


def test_merged_export_equals_unmerged_forward(tiny, tmp_path):
    """lora.merge (what params.npz and the HF export carry) gives the adapted logits, and so does
    transformers on the merged HF export."""
    hf_dir, config, params = tiny
    adapted = _random_adapters(config, params, lora.LoraSettings(rank=4, alpha=4.0), seed=2)
    batch = fx.make_batch(config, PREFIXES, SUFFIXES, seed=3)
    unmerged = _logits(config, adapted, batch)
    merged = lora.merge(adapted)
    assert set(flatten(merged)) == set(flatten(params))  # big_vision's tree, no 'lora'
    real = batch["mask_input"].astype(bool)
    assert np.abs(_logits(config, merged, batch) - unmerged)[real].max() <= FP32_TOLERANCE
    unrolled = config.replace(scan_layers=False, remat=True)  # same tree, other layer loop
    assert np.abs(_logits(unrolled, adapted, batch) - unmerged)[real].max() <= FP32_TOLERANCE
    weights.save_hf(merged, config, tmp_path / "merged")
    import transformers

    hf_model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        hf = hf_model(**fx.hf_inputs(batch, config.num_image_tokens)).logits.float().numpy()
    assert np.abs(hf[:, config.num_image_tokens :] - unmerged)[real].max() <= 1e-4


def test_int8_frozen_logit_error(tiny):
    """int8 projections (per-output-channel scales) against bf16 storage, both vs fp32 weights."""
    _, config, params = tiny
    flat = flatten(params)
    quantized = unflatten(
        {k: quant.quantize(np.asarray(v), PROJECTIONS[k]) if k in PROJECTIONS else v
         for k, v in flat.items()}
    )  # fmt: skip
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), params)
    batch = fx.make_batch(config, PREFIXES, SUFFIXES, seed=5)
    real = batch["mask_input"].astype(bool)
    reference = _logits(config, params, batch)
    int8_error = np.abs(_logits(config, quantized, batch) - reference)[real].max()
    bf16_error = np.abs(_logits(config, bf16, batch) - reference)[real].max()
    scale = np.abs(reference[real]).max()
    print(
        f"int8 max-abs logit error {int8_error:.4f}, bf16 {bf16_error:.4f} (logits up to {scale:.1f})"
    )
    assert 0 < int8_error < 0.05 * scale
    assert int8_error < 10 * bf16_error  # 8-bit codes: a few times bf16's 8-bit mantissa error.
    leaf = flatten(quantized)["llm/layers/mlp/linear"]
    assert leaf.q.dtype == np.int8 and leaf.scale.shape == (leaf.shape[0], 1, leaf.shape[2])


def test_kv_cache_decoding_reads_adapters_and_int8(tiny_pg2):
    """Greedy decoding (prefill + KV cache) of LoRA over an int8 base gives the tokens of its
    merged float export, and not those of the base model alone."""
    from paligemma_seg.infer import decode

    _, config, params = tiny_pg2
    flat = flatten(params)
    int8 = unflatten(
        {k: quant.quantize(np.asarray(v), PROJECTIONS[k]) if k in PROJECTIONS else v
         for k, v in flat.items()}
    )  # fmt: skip
    settings = lora.LoraSettings(rank=4, alpha=8.0)
    adapted = _random_adapters(config, int8, settings, seed=4, std=0.5)  # strong: new tokens
    batch = fx.make_batch(config, [3, 5], [0, 0], seed=6)
    run = decode.make_decode_fn(PaliGemma(config), decode.DecodeConfig(max_new_tokens=6))
    tokens = lambda p: np.asarray(run(p, batch).tokens)
    ours = tokens(adapted)
    np.testing.assert_array_equal(ours, tokens(lora.merge(adapted)))
    assert not np.array_equal(ours, tokens(params))


def test_int8_loading_quantises_leaf_by_leaf(tiny):
    """place_weights with int8 targets: each projection read whole, quantised, placed."""
    from paligemma_seg import experiment

    hf_dir, _, params = tiny
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=device)
    flat = flatten(params)
    target = {}
    for path, value in flat.items():
        if path in PROJECTIONS:
            shapes = quant.quantized_shape(value, path)
            target[path] = jax.tree.map(lambda x: spec(x.shape, x.dtype), shapes)
        else:
            target[path] = spec(value.shape, value.dtype)
    placed = flatten(experiment.place_weights(hf_dir, unflatten(target)))
    for path, value in flat.items():
        if path in PROJECTIONS:
            want = quant.quantize(np.asarray(value), PROJECTIONS[path])
            np.testing.assert_array_equal(np.asarray(placed[path].q), want.q, err_msg=path)
            np.testing.assert_array_equal(np.asarray(placed[path].scale), want.scale)
        else:
            np.testing.assert_array_equal(np.asarray(placed[path]), value, err_msg=path)


# --- Training: the tiny config (configs/water_micro.py), LoRA r=4 on an int8 base ---

LORA_RUN = {
    "optim.lora.rank": 4,
    "optim.lora.alpha": 8.0,
    "optim.lora.dropout": 0.1,
    "optim.trainable": "none",
    "optim.frozen_dtype": "int8",
    "optim.name": "adamw",
    "optim.lr": 0.01,
    "optim.schedule": "constant",
    "optim.grad_accum": 2,
}


def _lora_config(base, **extra):
    from train_fixtures import reference_data, tiny_config

    return tiny_config(reference_data(base), **{**LORA_RUN, **extra})


def _checkpoint(workdir, step):
    """The raw tree of a checkpoint's state (Quantized/LoraPair nodes come back as dicts)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def _only_adapters_changed(workdir):
    """Between checkpoints 3 and 6 exactly the adapters moved; AdamW's moments are theirs only."""
    first, last = (flatten(_checkpoint(workdir, step)["params"]) for step in (3, 6))
    assert sorted(first) == sorted(last)
    for path in first:
        assert np.array_equal(first[path], last[path]) != path.startswith("lora/"), path
    adapted = sorted({p.removeprefix("lora/").rsplit("/", 1)[0] for p in last if p[:5] == "lora/"})
    assert adapted == [  # the default targets of the micro model (1 KV head: q and kv, no qkv)
        "llm/layers/attn/attn_vec_einsum/w", "llm/layers/attn/kv_einsum/w",
        "llm/layers/attn/q_einsum/w", "llm/layers/mlp/gating_einsum", "llm/layers/mlp/linear",
    ]  # fmt: skip
    assert last["llm/layers/mlp/linear/q"].dtype == np.int8  # int8 codes + float32 scales
    assert last["llm/layers/mlp/linear/scale"].dtype == np.float32
    moments = [x for x in jax.tree_util.tree_leaves(_checkpoint(workdir, 6)["opt_state"])]
    adapter_size = sum(v.size for k, v in last.items() if k.startswith("lora/"))
    assert sum(x.size for x in moments if np.ndim(x) > 0) == 2 * adapter_size


@pytest.mark.slow
def test_lora_run_lowers_val_loss_exports_merged_and_resumes_bit_exact(tmp_path_factory):
    """6 steps of 2 micro-batches with dropout (checkpoints at 3 and 6): validation loss falls,
    only adapters change, params.npz is merged, adapter/ is PEFT's; a copy of checkpoint 3 resumed
    to 6 ends bit-identical."""
    import shutil

    from train_fixtures import read_metrics, read_params

    from paligemma_seg.train import loop as train_loop

    cfg = _lora_config(tmp_path_factory.getbasetemp(), val_steps=1, ckpt_steps=3)
    full = tmp_path_factory.mktemp("lora_full")
    train_loop.run(cfg, str(full))
    records = map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
    val = [r["val_loss"] for r in records if "val_loss" in r]
    print(f"LoRA r=4 + int8 validation loss: {val[0]:.4f} (step 1) -> {val[-1]:.4f} (step 6)")
    assert len(val) == 6 and val[-1] < val[0]
    exported = read_params(full)  # merged: big_vision's tree, float32, no adapters
    assert not any(k.startswith("lora") for k in exported) and len(exported) > 20
    assert exported["llm/layers/attn/q_einsum/w"].dtype == np.float32
    _only_adapters_changed(full)
    config = json.loads((full / "adapter" / peft_format.CONFIG_FILE).read_text())  # PEFT's format
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and len(config["target_modules"]) == 14

    resumed = tmp_path_factory.mktemp("lora_resumed")
    shutil.copytree(full / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "6")
    train_loop.run(cfg, str(resumed))
    again = read_params(resumed)
    assert sorted(again) == sorted(exported)
    for key in exported:
        np.testing.assert_array_equal(again[key], exported[key], err_msg=key)
    losses = lambda w: [r["loss"] for r in read_metrics(w) if "loss" in r and r["step"] > 3]
    assert losses(resumed)[-3:] == losses(full)[-3:]
