"""int8 storage of frozen projection matrices: one float32 scale per output channel.

`Quantized` replaces a weight leaf of big_vision's tree (same path, same shape in `q`); the
modules dequantise it where they read the weight (`layers.make_param`), inside the layer loop, so
only one layer's weights ever exist in the compute dtype. Symmetric rounding: q = round(w / s),
s = max|w| over the input axes / 127. Which axes are inputs: `projections.PROJECTIONS`.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from paligemma_seg.model.projections import PROJECTIONS, Projection

_LEVELS = 127.0


@flax.struct.dataclass
class Quantized:
    """int8[shape] codes and float32 scales (the input axes of `shape` kept as size 1)."""

    q: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """`dtype`[shape]: q * scale, multiplied in float32."""
        return (self.q.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(dtype)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def scale_shape(shape: tuple[int, ...], projection: Projection) -> tuple[int, ...]:
    return tuple(1 if i in projection.inputs else n for i, n in enumerate(shape))


def quantize(weight: Any, projection: Projection) -> Quantized:
    """Per-output-channel int8 of `weight` (numpy on the host, jax.numpy for jax arrays)."""
    xp = jnp if isinstance(weight, jax.Array) else np
    weight = weight.astype(xp.float32)
    peak = xp.max(xp.abs(weight), axis=projection.inputs, keepdims=True)
    scale = xp.where(peak > 0, peak / _LEVELS, 1.0).astype(xp.float32)
    codes = xp.clip(xp.round(weight / scale), -_LEVELS, _LEVELS).astype(xp.int8)
    return Quantized(q=codes, scale=scale)


def quantizable(path: str, frozen: bool) -> bool:
    """Whether leaf `path` is stored int8 under optim.frozen_dtype='int8' (frozen projections)."""
    return frozen and path in PROJECTIONS


def quantized_shape(leaf: Any, path: str) -> Quantized:
    """Quantized of ShapeDtypeStructs for the abstract weight `leaf` at `path`."""
    shape = tuple(leaf.shape)
    return Quantized(
        q=jax.ShapeDtypeStruct(shape, jnp.int8),
        scale=jax.ShapeDtypeStruct(scale_shape(shape, PROJECTIONS[path]), jnp.float32),
    )


def quantized_axes(axes: tuple[str | None, ...], path: str) -> Quantized:
    """Logical axes of a Quantized leaf: the codes as the weight, the scales unsharded on inputs."""
    inputs = PROJECTIONS[path].inputs
    return Quantized(q=axes, scale=tuple(None if i in inputs else a for i, a in enumerate(axes)))


def dequantize_tree(params: Any, dtype: Any = jnp.float32) -> Any:
    """`params` with every Quantized leaf replaced by its `dtype` weight."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if _is_quantized(x) else x, params, is_leaf=_is_quantized
    )
