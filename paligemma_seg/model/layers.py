"""Small Linen building blocks shared by the SigLIP encoder and the Gemma decoder.

Owns parameter creation with logical axis names, einsum projections, the two norms, the layer
scan and the one call into `jax.nn.dot_product_attention` (`dot_product_attention`: which kernel
runs, cuDNN flash attention or XLA); masks and soft-caps are the callers'. Logical axis names
(only `paligemma_seg/sharding.py` maps them to mesh axes): batch, length (tokens), cache_length
(KV-cache slots), embed (residual width), mlp (MLP hidden; also the image-to-LLM projection's
output), heads, kv_heads, head_dim, vocab, layers (stacked depth). Small or spatial axes (gating's
2, qkv's 3, patch pixels) are None: unsharded.
dtype policy: parameters are created in `param_dtype` and cast to `dtype` at use; norms compute in
float32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from paligemma_seg.model import lora, quant

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
    """Creates parameter `name` carrying logical axis names (boxed in `init`, plain in `apply`).

    An int8 `quant.Quantized` leaf (optim.frozen_dtype='int8') comes back dequantised, here in the
    layer that uses it.
    """
    if len(axes) != len(shape):
        raise ValueError(
            f"parameter {name!r}: {len(axes)} axis names {axes} for shape {tuple(shape)}"
        )
    value = module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), param_dtype)
    if isinstance(value, quant.Quantized):
        return value.dequantize()  # float32; the caller's cast to `dtype` fuses with it.
    return value


MATRIX_SUFFIX = "_matrix"  # `Einsum`'s weight stored as a 2-D matrix (`as_matrix`).


def _einsum_groups(eqn: str) -> tuple[str, str, str]:
    """(x's leading letters, contracted letters in x's order, w's output letters in w's order)."""
    operands, out = eqn.replace(" ", "").split("->")
    x_letters, w_letters = operands.split(",")
    contracted = "".join(c for c in x_letters if c in w_letters and c not in out)
    lead = x_letters[: len(x_letters) - len(contracted)]
    produced = "".join(c for c in w_letters if c not in contracted)
    if x_letters[len(lead) :] != contracted or out != lead + produced:
        raise ValueError(f"einsum {eqn!r} is not x[..., in] @ w[in, out]; keep its full weight")
    return lead, contracted, produced


def as_matrix(eqn: str, w: jax.Array) -> jax.Array:
    """The weight of `einsum(eqn, x, w)` as a 2-D [in, out] matrix: contracted axes in x's order,
    then output axes (e.g. q_einsum [N, D, H] -> [D, N*H]). Decoding on CPU stores this copy once
    per call: XLA:CPU otherwise transposes the weight before every token's dot."""
    _, contracted, produced = _einsum_groups(eqn)
    w_letters = eqn.replace(" ", "").split("->")[0].split(",")[1]
    order = [w_letters.index(c) for c in contracted + produced]
    rows = int(np.prod([w.shape[w_letters.index(c)] for c in contracted]))
    return jnp.transpose(w, order).reshape(rows, -1)


def _matrix_einsum(eqn: str, x: jax.Array, matrix: jax.Array, w_shape: Sequence[int]) -> jax.Array:
    """`einsum(eqn, x, w)` for w of `w_shape`, computed as rows of x times `as_matrix(eqn, w)`."""
    lead, _, produced = _einsum_groups(eqn)
    w_letters = eqn.replace(" ", "").split("->")[0].split(",")[1]
    out_sizes = [w_shape[w_letters.index(c)] for c in produced]
    y = x.reshape(-1, matrix.shape[0]) @ matrix.astype(x.dtype)  # [rows, out]
    return y.reshape(*x.shape[: len(lead)], *out_sizes)


class Einsum(nn.Module):
    """`einsum(eqn, x, w) (+ b)` with a weight of `shape`; the weight is called `param_name`.

    Gemma's projections are `w` without bias; SigLIP's are `kernel` + `bias` (flax Dense naming).
    A LoRA adapter of the weight (collection 'lora', `lora.py`) adds its low-rank term.
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
        matrix_name = self.param_name + MATRIX_SUFFIX
        if self.has_variable("params", matrix_name):  # a decode tree's `as_matrix` copy
            matrix = self.get_variable("params", matrix_name)
            y = _matrix_einsum(eqn, x.astype(self.dtype), matrix, self.shape)
        else:
            w = make_param(
                self, self.param_name, self.init, self.shape, self.axes, self.param_dtype
            )
            y = jnp.einsum(eqn, x.astype(self.dtype), w.astype(self.dtype))
        adapter = lora.adapter(self, self.param_name)
        if adapter is not None:
            y = y + lora.einsum_term(self, eqn, x, adapter, self.dtype)
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
        variable_axes={"params": 0, lora.COLLECTION: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=length,
        unroll=1 if scan_layers else length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


# Kernel of `dot_product_attention`: "auto" (cuDNN where it applies, else XLA), "xla" or "cudnn".
ATTENTION_ENV = "PALIGEMMA_SEG_ATTENTION"
_ATTENTION_CHOICES = ("auto", "xla", "cudnn")
_CUDNN_PAD = 8  # With a mask, cuDNN gets T and S padded to a multiple of this (see below).


@functools.lru_cache(maxsize=1)
def _cudnn_max_head_dim() -> int:
    """Largest head dim cuDNN flash attention takes on device 0; 0 = no CUDA GPU (no cuDNN)."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not capability or "cuda" not in device.client.platform_version:
        return 0
    major = int(str(capability).split(".")[0])
    return 256 if major >= 9 else 128  # Hopper and later: 256 (jax's check_is_flash_attention).


def attention_implementation(q: jax.Array) -> str | None:
    """`implementation=` for `jax.nn.dot_product_attention` of queries q [B, T, N, H].

    "cudnn" (flash attention: no [B, N, T, S] logits in memory, forward or backward) when the
    default device (jax.devices()[0]) is a CUDA GPU and the call fits cuDNN's limits: bf16/fp16,
    head dim a multiple of 8 and <= 128 (<= 256 from Hopper on), more than one query. Otherwise
    None: XLA's kernel (float32 logits materialised, float32 softmax).
    $PALIGEMMA_SEG_ATTENTION=xla forces XLA, =cudnn forces cuDNN (an error where it does not
    apply), =auto (the default) picks as above.
    """
    choice = os.environ.get(ATTENTION_ENV, "auto").lower()
    if choice not in _ATTENTION_CHOICES:
        raise ValueError(f"${ATTENTION_ENV}={choice!r}; use one of {_ATTENTION_CHOICES}.")
    if choice != "auto":
        return None if choice == "xla" else "cudnn"
    head_dim = q.shape[-1]
    fits = (
        q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= _cudnn_max_head_dim()
        and q.shape[1] > 1  # One query (a decode step): XLA's [B, N, 1, S] logits are small.
    )
    return "cudnn" if fits else None


def _pad_to(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float,
) -> jax.Array:
    """softmax(scale * q.k, masked) v: q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H], q.dtype.

    Grouped queries: head n reads kv head n // (N / K). mask bool[B, T, S] (True = attend) or None.
    Logits and softmax are float32 in both kernels (bf16 inputs: float32-accumulated products);
    the probabilities are cast to v.dtype before the product with v. A fully masked row (a
    padding query) gets a uniform softmax, not NaN. There is no hook for logit soft-capping:
    callers that cap keep their own einsum path.

    cuDNN takes a mask as an additive bias [B, 1, T, S] whose gradient it always computes; that
    needs even T and S, so T and S are padded to a multiple of 8 (16-byte bias rows in bf16;
    padded keys masked out, padded queries dropped): any length works, prefill caches included.
    """
    impl = attention_implementation(q)
    length, keys = q.shape[1], k.shape[1]
    if mask is not None and impl == "cudnn":
        padded_t, padded_s = (-(-n // _CUDNN_PAD) * _CUDNN_PAD for n in (length, keys))
        if (padded_t, padded_s) != (length, keys):
            q = _pad_to(q, 1, padded_t)
            k, v = _pad_to(k, 1, padded_s), _pad_to(v, 1, padded_s)
            mask = _pad_to(_pad_to(mask, 1, padded_t, False), 2, padded_s, False)
    encoded = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if mask is None else mask[:, None, :, :],
        scale=float(scale),
        implementation=impl,
    )
    return encoded[:, :length]
