"""Turns an experiment ConfigDict into objects in one place: model, tokenizer, codec, weights.

Every function here reads the config and fails early with a message that names the missing file,
where it was expected and how to get it. Training, evaluation and prediction all build their objects
through here; nothing else reads `cfg.model`, `cfg.tokenizer`, `cfg.codec` or `cfg.init` (the data
keys are read by `data/prepare.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath

from paligemma_seg.model import (
    PaliGemma,
    PaliGemmaConfig,
    get_preset,
    init_params,
    param_shapes,
    quant,
)
from paligemma_seg.model.projections import PROJECTIONS
from paligemma_seg.weights import orbax
from paligemma_seg.weights.spec import flatten, unflatten

_REAL_HELP = (
    'See the README section "With real weights", or run `python scripts/download_weights.py{args}` '
    "(needs the internet; model weights also need the licence accepted on Kaggle or Hugging Face)."
)
_SMALL_HELP = {
    "tokenizer_small.model": "It ships in git: `git checkout -- "
    "checkpoints/tokenizer_small.model`, or rebuild it with "
    "`python scripts/make_small_tokenizer.py`.",
    "vqvae_small.npz": "It ships in git: `git checkout -- checkpoints/vqvae_small.npz`, or "
    "retrain it with `python -m paligemma_seg.segtokens.train_vqvae` (see checkpoints/README.md).",
}


def _missing(kind: str, path: str, key: str, download_args: str = "") -> ValueError:
    """A ValueError for a missing file: what, where, which config key, and how to get it."""
    name = os.path.basename(path)
    how = _SMALL_HELP.get(name) or _REAL_HELP.format(args=download_args)
    return ValueError(
        f"{kind} not found: {path} (expected at {os.path.abspath(path)}; config key {key}). {how} "
        f"Or point --config.{key} at your copy."
    )


def model_config(cfg: ml_collections.ConfigDict) -> PaliGemmaConfig:
    """The preset named by `cfg.model.preset` with `cfg.model.overrides` applied."""
    overrides = cfg.model.overrides.to_dict()
    return get_preset(cfg.model.preset, compat=cfg.model.compat, **overrides)


def build_model(cfg: ml_collections.ConfigDict) -> tuple[PaliGemma, PaliGemmaConfig]:
    """(PaliGemma module, its config) from the `model` section."""
    config = model_config(cfg)
    return PaliGemma(config), config


def load_tokenizer(cfg: ml_collections.ConfigDict) -> Any:
    """The SentencePiece tokenizer at `cfg.tokenizer`, checked against the model's vocabulary."""
    from paligemma_seg.tokenizer import Tokenizer

    if not os.path.isfile(cfg.tokenizer):
        raise _missing("tokenizer", cfg.tokenizer, "tokenizer", " --only tokenizer")
    tokenizer = Tokenizer.load(cfg.tokenizer)
    vocab = model_config(cfg).llm.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(
            f"tokenizer {cfg.tokenizer} has {tokenizer.vocab_size} ids but the model's vocabulary "
            f"has {vocab} rows; set --config.model.overrides.llm.vocab_size="
            f"{tokenizer.vocab_size} or use "
            "the tokenizer that belongs to the weights."
        )
    return tokenizer


def codec_config(cfg: ml_collections.ConfigDict) -> Any:
    """`CodecConfig` from the `codec` section (every key but `vqvae`)."""
    from paligemma_seg.segtokens.codec import CodecConfig

    fields = {k: v for k, v in cfg.codec.to_dict().items() if k != "vqvae"}
    return CodecConfig(**fields)


def load_codec(cfg: ml_collections.ConfigDict) -> Any:
    """The mask codec: VQ-VAE weights at `cfg.codec.vqvae` + the other `codec` keys."""
    from paligemma_seg.segtokens import codec, vqvae

    if not os.path.isfile(cfg.codec.vqvae):
        raise _missing("mask VQ-VAE", cfg.codec.vqvae, "codec.vqvae", " --only vae")
    return codec.MaskCodec(vqvae.load(cfg.codec.vqvae), codec_config(cfg))


def _download_args(cfg: ml_collections.ConfigDict) -> str:
    preset = cfg.model.preset
    return f" --model {preset}" if preset.startswith("pg") else ""


def check_init(cfg: ml_collections.ConfigDict) -> str:
    """'' | 'orbax' | 'weights': which kind `cfg.init` is; a missing path raises."""
    if not cfg.init:
        return ""
    if not epath.Path(cfg.init).exists():  # Local, or a bucket (gs://...).
        raise _missing("initial weights", cfg.init, "init", _download_args(cfg))
    return "orbax" if orbax.is_orbax_checkpoint(cfg.init) else "weights"


def check_weights_fit(cfg: ml_collections.ConfigDict, config: PaliGemmaConfig) -> None:
    """`cfg.init` (an .npz or HF directory) must have the sizes of `config`; reads headers only."""
    from paligemma_seg import weights

    weights.load_config(cfg.init, compat=cfg.model.compat, **_as_overrides(config))


def _as_overrides(config: PaliGemmaConfig) -> dict[str, Any]:
    """The full config as `weights.load` overrides, so the file must match it exactly."""

    return {
        "vision": dataclasses.asdict(config.vision),
        "llm": dataclasses.asdict(config.llm),
        "dtype": config.dtype,
        "param_dtype": config.param_dtype,
        "remat": config.remat,
        "scan_layers": config.scan_layers,
    }


def initial_params(
    cfg: ml_collections.ConfigDict, model: PaliGemma, rng: jax.Array, target: Any = None
) -> dict[str, Any]:
    """Parameters to start from: `cfg.init` (npz, HF directory or orbax checkpoint) or random init.

    `target`: optional tree of jax.ShapeDtypeStruct with shardings (e.g. frozen weights in bf16),
    or a tree of shardings (dtypes: `param_dtype`). Weights are cast on the host and placed already
    split, so no device ever holds a full-precision copy of the whole model. Default: first device.
    """
    config = model.config
    if target is None:
        target = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(jax.tree_util.tree_leaves(target)[0], jax.sharding.Sharding):
        shapes = param_shapes(config)
        if isinstance(target, jax.sharding.Sharding):
            target = jax.tree_util.tree_map(lambda _: target, shapes)
        target = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, target
        )
    stored, target = target, _float_target(target)  # int8 leaves: quantised once placed.
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, target)
    kind = check_init(cfg)
    if kind == "":
        cast = lambda tree: jax.tree_util.tree_map(lambda x, t: x.astype(t.dtype), tree, target)
        params = jax.jit(lambda key: cast(init_params(config, key)), out_shardings=shardings)(rng)
        if cfg.model.structured_init:
            params = _structured_init(cfg, params)
        return _quantize_placed(params, stored)
    if kind == "orbax":
        return _quantize_placed(orbax.restore_params(cfg.init, target), stored)
    check_weights_fit(cfg, config)
    return place_weights(cfg.init, stored)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, quant.Quantized)


def _float_target(target: Any) -> Any:
    """`target` with each int8 `quant.Quantized` leaf as a float32 leaf sharded like its codes."""
    as_float = lambda x: jax.ShapeDtypeStruct(x.q.shape, np.float32, sharding=x.q.sharding)
    return jax.tree_util.tree_map(
        lambda x: as_float(x) if _is_quantized(x) else x, target, is_leaf=_is_quantized
    )


def _quantize_placed(params: Any, stored: Any) -> Any:
    """Placed float `params` stored as `stored` says: int8 where it holds `quant.Quantized`."""
    flat, flat_stored = flatten(params), flatten(stored)
    if not any(_is_quantized(x) for x in flat_stored.values()):
        return params
    for path, want in flat_stored.items():
        if _is_quantized(want):
            shardings = jax.tree_util.tree_map(lambda x: x.sharding, want)
            to_int8 = lambda w, path=path: quant.quantize(w, PROJECTIONS[path])
            flat[path] = jax.jit(to_int8, out_shardings=shardings)(flat[path])
    return unflatten(flat)


def _place_quantized(leaf: Any, want: quant.Quantized, path: str) -> quant.Quantized:
    """Reads a whole leaf on the host, quantises it (per output channel) and places both parts."""
    weight = leaf.read(None)  # per-channel scales need whole input axes: the whole leaf
    host = quant.quantize(np.asarray(weight, np.float32), PROJECTIONS[path])
    place = lambda value, spec: jax.make_array_from_callback(
        spec.shape, spec.sharding, lambda index: value[index]
    )
    return quant.Quantized(q=place(host.q, want.q), scale=place(host.scale, want.scale))


def place_weights(path: str, target: Any) -> dict[str, Any]:
    """Parameters of an .npz or HF directory placed as `target` says, one leaf at a time.

    Each leaf is read in its stored dtype, block by block as its sharding asks (each host reads
    only the blocks of its own devices), cast straight to its target dtype (frozen weights to
    `optim.frozen_dtype`, trained ones to their f32 master dtype) and placed; the host copy is
    dropped before the next leaf. Peak host memory: the placed parameters plus about one leaf.
    """
    from paligemma_seg import weights

    started = time.perf_counter()
    flat_target = flatten(target)
    with weights.open_leaves(path) as (leaves, _):
        _check_tree({k: v.shape for k, v in leaves.items()}, flat_target, path)
        placed = {}
        keys = sorted(flat_target, key=lambda k: -math.prod(flat_target[k].shape))
        bar = tqdm.tqdm(keys, desc="loading weights", unit="leaf", leave=False,
                        disable=jax.process_index() != 0)  # fmt: skip
        for key in bar:
            leaf, want = leaves[key], flat_target[key]
            if _is_quantized(want):  # optim.frozen_dtype='int8'
                placed[key] = _place_quantized(leaf, want, key)
                continue
            read = lambda index, leaf=leaf, want=want: leaf.read(index).astype(
                want.dtype, copy=False
            )
            placed[key] = jax.make_array_from_callback(want.shape, want.sharding, read)
            placed[key].block_until_ready()
    logging.info("Loaded %d tensors from %s in %.1f s", len(placed), path,
                 time.perf_counter() - started)  # fmt: skip
    return unflatten(placed)


def _structured_init(cfg: ml_collections.ConfigDict, params: dict[str, Any]) -> Any:
    """`params` with the structured tables of `scratch_init` (random init only)."""
    from paligemma_seg.model import scratch_init

    tokenizer, codec = load_tokenizer(cfg), load_codec(cfg)
    embedding = params["llm"]["embedder"]["input_embedding"]
    structured = lambda table: scratch_init.structured_embedding(
        table,
        tokenizer.loc_ids,
        tokenizer.seg_ids,
        np.asarray(codec.vqvae.params["codebook"], np.float32),
        seed=int(cfg.seed),
    )
    posemb = params["img"]["pos_embedding"]
    grid = int(round(np.sqrt(posemb.shape[1])))
    sincos = scratch_init.sincos2d_posemb(grid, posemb.shape[2])

    def place(like: jax.Array, host: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(
            like.shape, like.sharding, lambda index: host[index].astype(like.dtype)
        )

    llm = {**params["llm"], "embedder": {**params["llm"]["embedder"]}}
    llm["embedder"]["input_embedding"] = jax.jit(structured, out_shardings=embedding.sharding)(
        embedding
    )
    img = {**params["img"], "pos_embedding": place(posemb, sincos)}
    return {**params, "llm": llm, "img": img}


def _check_tree(shapes: dict[str, Any], target: dict[str, Any], source: str) -> None:
    """A checkpoint's flat key -> shape must be the model's tree (flat `target`)."""
    got = {k: tuple(v) for k, v in shapes.items()}
    want = {k: tuple(v.shape) for k, v in target.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:6]
        raise ValueError(
            f"{source}: parameters do not match the model of config model.preset/overrides; first "
            f"differences (path, shape): {diff}."
        )
