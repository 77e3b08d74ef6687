"""Optimizers, learning-rate schedules and the trainable-parameter mask.

Owns which parameters train (`trainable_mask`, by name), how a parameter tree is split into its
trainable and frozen parts, and the optax transform applied to the trainable part. The train step
feeds the optimizer only the trainable subtree, so frozen parameters get neither gradients nor
optimizer state. Knows nothing about the model's internals beyond big_vision's parameter names, nor
about the mesh.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from paligemma_seg.model import LoraSettings, lora, quant
from paligemma_seg.weights.spec import flatten, unflatten

Params = dict[str, Any]

# Named trainable sets: a regex searched in "img/..."/"llm/..." paths ('attn' is the seed's recipe).
TRAINABLE_PRESETS: dict[str, str] = {
    "attn": r"^llm/layers/attn/",
    "llm": r"^llm/",
    "img": r"^img/",
    "all": r"",
    "none": r"(?!)",  # Nothing of the base tree (LoRA: only the adapters train).
}
FROZEN_DTYPES = ("", "float32", "bfloat16", "float16", "int8")
# optim.frozen_dtype='int8': frozen projections int8 (model/quant.py), other frozen leaves in this.
INT8_OTHERS_DTYPE = "bfloat16"
OPTIMIZERS = ("sgd", "adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
_NO_DECAY_LEAVES = ("scale", "bias")  # Norm scales and biases are never weight-decayed.


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The `optim` section of the config (see configs/base.py for each field's meaning)."""

    name: str = "sgd"
    lr: float = 0.003
    schedule: str = "cosine"
    warmup_steps: int = 0
    momentum: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    trainable: str = "attn"
    frozen_dtype: str = ""
    lora: Any = None  # LoraSettings, or the `optim.lora` dict; None = no adapters.

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r}; use one of {OPTIMIZERS}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; use one of {SCHEDULES}.")
        for key in ("momentum", "b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optim.{key}={getattr(self, key)} must be in [0, 1).")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum={self.grad_accum} must be >= 1.")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(
                f"optim.frozen_dtype={self.frozen_dtype!r}; use '', 'float32', 'bfloat16', "
                "'float16' or 'int8'."
            )
        if not isinstance(self.lora, LoraSettings):
            settings = LoraSettings(**dict(self.lora or {}))
            object.__setattr__(self, "lora", settings)


def trainable_mask(params: Params, trainable: str) -> Params:
    """Tree of bools (same structure as `params`): True where the parameter trains.

    `trainable` is a name from TRAINABLE_PRESETS or a regex searched in each '/'-joined path
    (e.g. 'llm/layers/(attn|mlp)/'). A mask that selects nothing raises ValueError.
    """
    pattern = TRAINABLE_PRESETS.get(trainable, trainable)
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"optim.trainable={trainable!r} is neither one of {sorted(TRAINABLE_PRESETS)} nor a "
            f"valid regex: {error}"
        ) from error
    flat = flatten(params)
    # LoRA adapters (`params['lora']`, model/lora.py) always train.
    mask = {path: path.startswith("lora/") or bool(regex.search(path)) for path in flat}
    if not any(mask.values()):
        examples = ", ".join(list(flat)[:4])
        raise ValueError(
            f"optim.trainable={trainable!r} matches no parameter; paths look like: {examples}, ..."
        )
    return unflatten(mask)


def split_params(params: Params, mask: Params) -> tuple[Params, Params]:
    """(trainable, frozen): two nested dicts holding only their own leaves."""
    flat, flat_mask = flatten(params), flatten(mask)
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return unflatten(trainable), unflatten(frozen)


def merge_params(first: Params, second: Params) -> Params:
    """Union of two disjoint parameter trees (inverse of `split_params`)."""
    return unflatten({**flatten(first), **flatten(second)})


def cast_frozen(params: Params, mask: Params, dtype: str) -> Params:
    """Frozen leaves cast to `dtype` ('' = unchanged); trainable ones keep their (master) dtype."""
    if not dtype:
        return params
    flat, flat_mask = flatten(params), flatten(mask)
    return unflatten({k: v if flat_mask[k] else v.astype(dtype) for k, v in flat.items()})


def with_adapters(abstract: Params, axes: Params, settings: LoraSettings) -> tuple[Params, Params]:
    """(abstract params, logical axes) with LoRA adapters of `settings` under 'lora'."""
    shapes, pair_axes = lora.adapter_shapes(flatten(abstract), flatten(axes), settings)
    return {**abstract, "lora": unflatten(shapes)}, {**axes, "lora": unflatten(pair_axes)}


def init_adapters(target: Params, rng: jax.Array) -> Params:
    """Fresh adapters placed as `target` (tree of LoraPair of sharded ShapeDtypeStructs) says."""
    flat = flatten(target)
    shardings = {k: jax.tree_util.tree_map(lambda x: x.sharding, v) for k, v in flat.items()}
    init = jax.jit(lambda key: lora.init_adapters(flat, key), out_shardings=shardings)
    return unflatten(init(rng))


def frozen_storage(abstract: Params, mask: Params, frozen_dtype: str) -> Params:
    """Abstract params as stored: frozen leaves in `frozen_dtype`; with 'int8' the frozen
    projections become `quant.Quantized` (int8 + per-channel scales), other frozen leaves bf16."""
    if frozen_dtype != "int8":
        return jax.eval_shape(lambda p: cast_frozen(p, mask, frozen_dtype), abstract)
    flat, flat_mask = flatten(abstract), flatten(mask)
    stored = {}
    for path, leaf in flat.items():
        if quant.quantizable(path, frozen=not flat_mask[path]):
            stored[path] = quant.quantized_shape(leaf, path)
        elif not flat_mask[path]:
            stored[path] = jax.ShapeDtypeStruct(leaf.shape, INT8_OTHERS_DTYPE)
        else:
            stored[path] = leaf
    return unflatten(stored)


def storage_axes(axes: Params, stored: Params) -> Params:
    """Logical axes of `frozen_storage`'s tree (Quantized leaves get Quantized axes)."""
    flat_axes, flat = flatten(axes), flatten(stored)
    return unflatten(
        {
            path: quant.quantized_axes(flat_axes[path], path)
            if isinstance(leaf, quant.Quantized)
            else flat_axes[path]
            for path, leaf in flat.items()
        }
    )


def count_params(params: Params) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per update: linear warmup to `lr`, then cosine/linear decay to 0 or constant.

    The warmup is `lr * (step + 1) / warmup_steps`, so the first update already moves the weights.
    """
    warmup, peak = max(cfg.warmup_steps, 0), cfg.lr
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if cfg.schedule == "cosine":
            decayed = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif cfg.schedule == "linear":
            decayed = 1.0 - progress
        else:
            decayed = jnp.ones_like(progress)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        return peak * jnp.where(step < warmup, warm, decayed)

    return schedule


def _decay_mask(params: Params) -> Params:
    """True for weight matrices, False for norm scales and biases."""
    flat = flatten(params)
    return unflatten({k: k.rsplit("/", 1)[-1] not in _NO_DECAY_LEAVES for k in flat})


def make_optimizer(
    cfg: OptimConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax transform of the trainable subtree (clip -> weight decay -> optimizer), schedule."""
    schedule = make_schedule(cfg, total_steps)
    parts: list[optax.GradientTransformation] = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "sgd":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None))
    elif cfg.name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=cfg.b1,
                b2=cfg.b2,
                weight_decay=cfg.weight_decay,
                mask=_decay_mask,
            )
        )
    else:
        parts.append(
            optax.adafactor(
                schedule,
                momentum=cfg.momentum or None,
                weight_decay_rate=cfg.weight_decay or None,
                weight_decay_mask=_decay_mask,
            )
        )
    return optax.chain(*parts), schedule
