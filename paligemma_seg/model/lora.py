"""LoRA adapters: their own parameter subtree, the low-rank term in the modules, merging.

Adapters live under `params['lora']`, mirroring the paths of the weights they adapt
(`lora/llm/layers/attn/q_einsum/w` is a `LoraPair` for `llm/layers/attn/q_einsum/w`), so the base
tree stays big_vision's. The model reads them as the Flax collection 'lora' (`variables`). Each
stored matrix W [in, out] (per layer, per q/k/v or gate/up slot) gets y = x W + scale * (x A) B,
A [in, r], B [r, out], scale = alpha / r, with dropout on x before A while a 'dropout' rng is
given (training), as PEFT computes it. Shapes: A [*stack, *input axes, r], B [*stack, r, *output
axes] (axes as `projections.PROJECTIONS` names them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma_seg.model import quant
from paligemma_seg.model.projections import PROJECTIONS, Projection

COLLECTION = "lora"
# The LLM's attention and MLP projections (PEFT's q/k/v/o/gate/up/down_proj).
DEFAULT_TARGETS = r"^llm/layers/(attn/(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)/w|mlp/)"
_RANK_LETTER = "r"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """`optim.lora` (configs/base.py): rank 0 = off."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"optim.lora.rank={self.rank} must be >= 0 (0 = no LoRA).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"optim.lora.dropout={self.dropout} must be in [0, 1).")
        try:
            re.compile(self.targets)
        except re.error as error:
            raise ValueError(
                f"optim.lora.targets={self.targets!r} is not a regex: {error}"
            ) from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@flax.struct.dataclass
class LoraPair:
    """One adapter: a [*stack, *inputs, r], b [*stack, r, *outputs]; scale, dropout static."""

    a: Any
    b: Any
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def slot(self, index: int) -> LoraPair:
        """The adapter of slot `index` of the leading stack axis (gate/up of `gating_einsum`)."""
        return self.replace(a=self.a[index], b=self.b[index])


def _is_pair(x: Any) -> bool:
    return isinstance(x, LoraPair)


def target_paths(flat_shapes: dict[str, Any], targets: str) -> list[str]:
    """Projection paths (of `flat_shapes`, '/'-joined) that `targets` searches; none is an error."""
    regex = re.compile(targets)
    paths = [p for p in flat_shapes if p in PROJECTIONS and regex.search(p)]
    if not paths:
        known = ", ".join(p for p in PROJECTIONS if p in flat_shapes)
        raise ValueError(
            f"optim.lora.targets={targets!r} matches no projection matrix; adaptable: {known}."
        )
    return paths


def _pair_layout(shape: tuple[int, ...], projection: Projection, rank: int) -> tuple:
    stack = tuple(range(projection.stack))
    outputs = projection.outputs(len(shape))
    a_axes, b_axes = stack + projection.inputs, stack + outputs
    a_shape = tuple(shape[i] for i in a_axes) + (rank,)
    b_shape = tuple(shape[i] for i in stack) + (rank,) + tuple(shape[i] for i in outputs)
    return a_axes, b_axes, a_shape, b_shape


def adapter_shapes(
    flat_shapes: dict[str, Any], flat_axes: dict[str, Any], settings: LoraSettings
) -> tuple[dict[str, LoraPair], dict[str, LoraPair]]:
    """({path: LoraPair of float32 ShapeDtypeStructs}, {path: LoraPair of logical axes}).

    The rank axis is unsharded; every other adapter axis is sharded like the weight's."""
    shapes, axes = {}, {}
    for path in target_paths(flat_shapes, settings.targets):
        shape, names = tuple(flat_shapes[path].shape), flat_axes[path]
        a_axes, b_axes, a_shape, b_shape = _pair_layout(shape, PROJECTIONS[path], settings.rank)
        static = dict(scale=settings.scale, dropout=settings.dropout)
        shapes[path] = LoraPair(
            a=jax.ShapeDtypeStruct(a_shape, jnp.float32),
            b=jax.ShapeDtypeStruct(b_shape, jnp.float32),
            **static,
        )
        stack = tuple(names[i] for i in range(PROJECTIONS[path].stack))
        axes[path] = LoraPair(
            a=tuple(names[i] for i in a_axes) + (None,),
            b=stack + (None,) + tuple(names[i] for i in b_axes[len(stack) :]),
            **static,
        )
    return shapes, axes


def init_adapters(shapes: dict[str, LoraPair], rng: jax.Array) -> dict[str, LoraPair]:
    """{path: LoraPair}: A ~ U(+-1/sqrt(in_features)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0,
    so the adapted model starts as the base model."""
    adapters = {}
    for index, (path, shape) in enumerate(sorted(shapes.items())):
        stack = PROJECTIONS[path].stack
        bound = 1.0 / math.sqrt(math.prod(shape.a.shape[stack:-1]))
        key = jax.random.fold_in(rng, index)
        a = jax.random.uniform(key, shape.a.shape, jnp.float32, -bound, bound)
        adapters[path] = shape.replace(a=a, b=jnp.zeros(shape.b.shape, jnp.float32))
    return adapters


def delta(pair: LoraPair, projection: Projection, shape: tuple[int, ...]) -> jax.Array:
    """float32[shape]: scale * A B laid out as the weight it adapts."""
    letters = "abcdefghijklmnopq"[: len(shape)]
    a_axes, b_axes, _, _ = _pair_layout(shape, projection, pair.rank)
    stack = letters[: projection.stack]
    a = "".join(letters[i] for i in a_axes) + _RANK_LETTER
    b = stack + _RANK_LETTER + "".join(letters[i] for i in b_axes[projection.stack :])
    product = jnp.einsum(
        f"{a},{b}->{letters}", pair.a.astype(jnp.float32), pair.b.astype(jnp.float32)
    )
    return pair.scale * product


def merged_leaves(params: dict[str, Any]) -> dict[str, Any]:
    """{base path: () -> its exported array}: W + scale A B where adapted, int8 dequantised.

    With adapters or int8 leaves every float leaf comes back float32 (a bf16 copy would round
    small LoRA updates away); without, the leaves as stored. One leaf is built per call, so an
    export holds one merged leaf at a time.
    """
    adapters = flatten_adapters(params)
    base = _flatten_base({k: v for k, v in params.items() if k != COLLECTION})
    widen = bool(adapters) or any(isinstance(v, quant.Quantized) for v in base.values())

    def build(path: str, leaf: Any) -> Any:
        weight = leaf.dequantize() if isinstance(leaf, quant.Quantized) else leaf
        if widen and jnp.issubdtype(weight.dtype, jnp.floating):
            weight = weight.astype(jnp.float32)
        if path in adapters:
            weight = weight + delta(adapters[path], PROJECTIONS[path], tuple(weight.shape))
        return weight

    return {path: functools.partial(build, path, leaf) for path, leaf in base.items()}


def merge(params: dict[str, Any]) -> dict[str, Any]:
    """big_vision's tree of `params` with every adapter folded in (see `merged_leaves`)."""
    tree: dict[str, Any] = {}
    for path, build in merged_leaves(params).items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = build()
    return tree


def _flatten_base(tree: Any, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten_base(value, f"{prefix}{name}/"))
        else:
            flat[prefix + name] = value
    return flat


def _flatten_pairs(tree: Any, prefix: str = "") -> dict[str, LoraPair]:
    flat = {}
    for name, value in tree.items():
        if _is_pair(value):
            flat[prefix + name] = value
        else:
            flat.update(_flatten_pairs(value, f"{prefix}{name}/"))
    return flat


def flatten_adapters(params: dict[str, Any]) -> dict[str, LoraPair]:
    """{base path: LoraPair} of `params['lora']` ({} without adapters)."""
    return _flatten_pairs(params.get(COLLECTION, {}))


def variables(params: dict[str, Any]) -> dict[str, Any]:
    """Flax variables of a parameter tree: {'params': base} (+ {'lora': adapters} if any)."""
    if COLLECTION not in params:
        return {"params": params}
    base = {k: v for k, v in params.items() if k != COLLECTION}
    return {"params": base, COLLECTION: params[COLLECTION]}


# --- Inside the modules ---


def adapter(module: nn.Module, name: str) -> LoraPair | None:
    """The adapter of `module`'s weight `name`, or None."""
    if module.has_variable(COLLECTION, name):
        return module.get_variable(COLLECTION, name)
    return None


def _dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    if not rate or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def einsum_term(module: nn.Module, eqn: str, x: jax.Array, pair: LoraPair, dtype: Any) -> jax.Array:
    """scale * einsum(eqn, dropout(x), A B) as two thin einsums: x A ([..., r]) then B.

    `eqn` is the weight's own einsum "X,W->Y"; W's letters that X shares are the inputs, leading
    letters shared with neither (q/k/v, gate/up) index separate adapters.
    """
    inputs_eqn, out = eqn.split("->")
    x_letters, w_letters = inputs_eqn.split(",")
    contracted = [c for c in w_letters if c in x_letters]
    stack = w_letters[: pair.a.ndim - 1 - len(contracted)]
    outputs = "".join(c for c in w_letters[len(stack) :] if c not in x_letters)
    hidden = "".join(c for c in x_letters if c not in contracted) + stack + _RANK_LETTER
    x = _dropout(module, x.astype(dtype), pair.dropout)
    h = jnp.einsum(
        f"{x_letters},{stack}{''.join(contracted)}{_RANK_LETTER}->{hidden}", x, pair.a.astype(dtype)
    )
    y = jnp.einsum(f"{hidden},{stack}{_RANK_LETTER}{outputs}->{out}", h, pair.b.astype(dtype))
    return y * jnp.asarray(pair.scale, dtype)
