"""Small Linen building blocks shared by the SigLIP encoder and the Gemma decoder.

Owns parameter creation with logical axis names, einsum projections, the two norms and the layer
scan; no attention logic. Logical axis names (only `paligemma_seg/sharding.py` maps them to mesh
axes): batch, length (tokens), cache_length (KV-cache slots), embed (residual width), mlp (MLP
hidden; also the image-to-LLM projection's output), heads, kv_heads, head_dim, vocab, layers
(stacked depth). Small or spatial axes (gating's 2, qkv's 3, patch pixels) are None: unsharded.
dtype policy: parameters are created in `param_dtype` and cast to `dtype` at use; norms compute in
float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Axes = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

ACTIVATION = ("batch", "length", "embed")  # Constraint for [B, T, D] residual activations.


def make_param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Axes,
    param_dtype: Any,
) -> jax.Array:
    """Creates parameter `name` carrying logical axis names (boxed in `init`, plain in `apply`)."""
    if len(axes) != len(shape):
        raise ValueError(
            f"parameter {name!r}: {len(axes)} axis names {axes} for shape {tuple(shape)}"
        )
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), param_dtype)


class Einsum(nn.Module):
    """`einsum(eqn, x, w) (+ b)` with a weight of `shape`; the weight is called `param_name`.

    Gemma's projections are `w` without bias; SigLIP's are `kernel` + `bias` (flax Dense naming).
    """

    shape: tuple[int, ...]
    axes: Axes
    param_name: str = "w"
    bias_shape: tuple[int, ...] | None = None
    bias_axes: Axes = ()
    init: Initializer = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = make_param(self, self.param_name, self.init, self.shape, self.axes, self.param_dtype)
        y = jnp.einsum(eqn, x.astype(self.dtype), w.astype(self.dtype))
        if self.bias_shape is not None:
            b = make_param(
                self, "bias", nn.initializers.zeros_init(), self.bias_shape, self.bias_axes,
                self.param_dtype,
            )  # fmt: skip
            y = y + b.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Gemma RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + scale)` in float32, output in `dtype`."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = make_param(
            self,
            "scale",
            nn.initializers.zeros_init(),
            (x.shape[-1],),
            ("embed",),
            self.param_dtype,
        )
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with `scale` and `bias` (flax naming), statistics in float32, output in `dtype`."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = make_param(
            self, "scale", nn.initializers.ones_init(), (width,), ("embed",), self.param_dtype
        )
        bias = make_param(
            self, "bias", nn.initializers.zeros_init(), (width,), ("embed",), self.param_dtype
        )
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        normed = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Pins activation `x` to logical `axes` (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, axes)


def scan_blocks(
    block: type[nn.Module],
    *,
    length: int,
    remat: bool,
    scan_layers: bool,
    in_axes: Any,
) -> type[nn.Module]:
    """Wraps `block` so its parameters stack on a leading `layers` axis of size `length`.

    scan_layers=False fully unrolls the loop (faster per step, slower compile) with the same
    parameter tree.
    """
    if remat:
        block = nn.remat(block, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=length,
        unroll=1 if scan_layers else length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
