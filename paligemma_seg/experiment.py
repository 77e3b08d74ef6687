"""Turns an experiment ConfigDict into objects in one place: model, tokenizer, codec, weights, data.

Every function here reads the config and fails early with a message that names the missing file,
where it was expected and how to get it. Training, evaluation and prediction all build their objects
through here; nothing else reads `cfg.model`, `cfg.tokenizer`, `cfg.codec`, `cfg.init` or the
data-preparation keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from paligemma_seg import checkpoint, optim
from paligemma_seg.model import PaliGemma, PaliGemmaConfig, get_preset, init_params, param_shapes

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
    return "orbax" if checkpoint.is_orbax_checkpoint(cfg.init) else "weights"


def load_weights(cfg: ml_collections.ConfigDict, config: PaliGemmaConfig) -> dict[str, Any]:
    """Host (numpy) parameters from a big_vision .npz or an HF directory, fitting `config`."""
    from paligemma_seg import weights

    _, params = weights.load(
        cfg.init, preset=None, compat=cfg.model.compat, **_as_overrides(config)
    )
    return params


def _as_overrides(config: PaliGemmaConfig) -> dict[str, Any]:
    """The full config as `weights.load` overrides, so the file must match it exactly."""
    import dataclasses

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
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, target)
    kind = check_init(cfg)
    if kind == "":
        cast = lambda tree: jax.tree_util.tree_map(lambda x, t: x.astype(t.dtype), tree, target)
        params = jax.jit(lambda key: cast(init_params(config, key)), out_shardings=shardings)(rng)
        if cfg.model.structured_init:
            params = _structured_init(cfg, params)
        return params
    if kind == "orbax":
        return checkpoint.restore_params(cfg.init, target)
    host = load_weights(cfg, config)
    _check_tree(host, target, cfg.init)
    return jax.tree_util.tree_map(
        lambda x, t: jax.make_array_from_callback(
            t.shape, t.sharding, lambda index: np.asarray(x[index]).astype(t.dtype)
        ),
        host,
        target,
    )


def _structured_init(cfg: ml_collections.ConfigDict, params: dict[str, Any]) -> Any:
    """`params` with the structured tables of `scratch_init` (random init only)."""
    from paligemma_seg import scratch_init

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


def _check_tree(host: Any, target: Any, source: str) -> None:
    """Loaded parameters must have the model's tree and shapes."""
    got = {k: tuple(v.shape) for k, v in optim.flatten(host).items()}
    want = {k: tuple(v.shape) for k, v in optim.flatten(target).items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:6]
        raise ValueError(
            f"{source}: parameters do not match the model of config model.preset/overrides; first "
            f"differences (path, shape): {diff}."
        )


def split_jsonl(cfg: ml_collections.ConfigDict, split: str) -> str:
    """Path of `split`'s JSONL file (it may not exist yet; see `prepare_data`)."""
    return os.path.join(cfg.data.jsonl_dir, f"{split}.jsonl")


def prepare_data(cfg: ml_collections.ConfigDict, splits: tuple[str, ...]) -> dict[str, str]:
    """Makes sure `splits` exist as JSONL: generates synthetic tiles, runs convert if needed.

    Returns split -> JSONL path. Only process 0 writes; the others wait for it.
    """
    paths = {split: split_jsonl(cfg, split) for split in splits}
    missing = [s for s, p in paths.items() if not os.path.isfile(p)]
    codec = None
    generate = jax.process_index() == 0 and _synthetic_to_generate(cfg)
    if generate:
        missing = list(paths)  # New tiles: any JSONL there is of the old ones.
    if not missing and jax.process_index() == 0:
        codec = load_codec(cfg)
        reason = _stale_conversion(cfg, codec)
        if reason:  # Converted with other settings: reconverting beats silently training on them.
            logging.warning("Reconverting %s: %s", cfg.data.jsonl_dir, reason)
            missing = list(paths)
    if missing and jax.process_index() == 0:
        codec = codec or load_codec(cfg)  # Fail on a missing codec before generating anything.
        if generate:
            from paligemma_seg.data import synthetic as synthetic_lib

            logging.info("Generating tiles into %s: %s", _synthetic_dir(cfg), generate)
            wanted = cfg.data.synthetic
            synthetic_lib.generate(_synthetic_dir(cfg), wanted.num_images, wanted.size, wanted.seed)
        _convert(cfg, codec)
    if missing and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prepare_data")
    still = [p for p in paths.values() if not os.path.isfile(p)]
    if still:
        raise ValueError(
            f"{', '.join(still)} not found after conversion; check that data.splits "
            f"({sorted(cfg.data.splits.to_dict())}) names the splits {list(splits)}."
        )
    return paths


def _synthetic_dir(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    return pathlib.Path(cfg.data.images).parent


def _synthetic_to_generate(cfg: ml_collections.ConfigDict) -> str:
    """Why generated tiles must be (re)made ('' = not): data.images is missing, or was generated
    with other data.synthetic settings. A folder not made by the generator is never touched."""
    wanted = cfg.data.synthetic
    if wanted.num_images <= 0:
        return ""
    if not os.path.isdir(cfg.data.images):
        return f"{cfg.data.images} does not exist"
    from paligemma_seg.data import synthetic as synthetic_lib

    made = synthetic_lib.read_manifest(_synthetic_dir(cfg))
    want = synthetic_lib.manifest(wanted.num_images, wanted.size, wanted.seed)
    if made is not None and made != want:
        return f"it holds {made}, the config asks for {want}"
    return ""


def _stale_conversion(cfg: ml_collections.ConfigDict, codec: Any) -> str:
    """Why data.jsonl_dir's report.json does not match this config ('' = it matches).

    JSONL without a convert report (written by another tool) is trusted as it is.
    """
    report_path = os.path.join(cfg.data.jsonl_dir, "report.json")
    try:
        with open(report_path) as f:
            settings = json.load(f).get("settings", {})
    except (OSError, ValueError):
        return ""
    expected = {
        "images": str(pathlib.Path(cfg.data.images).resolve()),
        "masks": str(pathlib.Path(cfg.data.masks).resolve()),
        "prefix": cfg.data.prefix,
        "codec": dataclasses.asdict(codec.config),
    }
    changed = [key for key, value in expected.items() if settings.get(key) != value]
    return f"settings changed: {', '.join(changed)}" if changed else ""


def _convert(cfg: ml_collections.ConfigDict, codec: Any) -> None:
    """Converts data.images/masks with paligemma_seg.data.convert and the config's codec."""
    for key in ("images", "masks"):
        if not os.path.isdir(cfg.data[key]):
            raise ValueError(
                f"data.{key} folder {cfg.data[key]} not found (expected at "
                f"{os.path.abspath(cfg.data[key])}); point --config.data.{key} at it."
            )
    from paligemma_seg.data import convert

    report = convert.convert(
        cfg.data.images,
        cfg.data.masks,
        cfg.data.jsonl_dir,
        cfg.data.splits.to_dict(),
        prefix=cfg.data.prefix,
        codec=codec,
    )
    logging.info(
        "Converted %d image/mask pairs into %s (ceiling mIoU %s)",
        len(report.get("images", [])),
        cfg.data.jsonl_dir,
        report.get("ceiling_miou"),
    )
