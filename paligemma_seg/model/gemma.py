"""Gemma 1 / Gemma 2 decoder: embedder, scanned blocks (optionally writing a KV cache), logits.

Owns the `llm/...` half of the parameter tree (big_vision names, blocks stacked on axis 0). Masks
and cache bookkeeping (positions, valid slots) come from the caller (`paligemma.py`).
Einsum letters: B batch, T query length, S key/value length (cache slots when cached), N query
heads, K kv heads, G query heads per kv head (N = K * G; head n uses kv head n // G), H head dim,
D width, F MLP hidden, V vocabulary, C the stacked q/k/v (or k/v) axis.
dtype policy (see `layers.py`): RoPE, attention logits, soft-caps, softmax, logits in float32.

Attention kernels: without a logit soft-cap (Gemma 1) `layers.dot_product_attention`, i.e.
`jax.nn.dot_product_attention` (cuDNN flash attention on CUDA GPUs where it applies, XLA
elsewhere). With one (Gemma 2's tanh cap at 50) the explicit einsum path below: that API has no
hook between q.k and the softmax, and the cap needs the materialised float32 logits [B,K,G,T,S].
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from paligemma_seg.model import layers, lora
from paligemma_seg.model.config import GemmaConfig

# Finite "minus infinity": a fully masked row (a padding query) gives a uniform softmax, not NaN.
_MASKED = -2.3819763e38


@flax.struct.dataclass
class AttentionInputs:
    """What every block needs besides its input; broadcast to all layers."""

    positions: jax.Array  # int32[B, T]: RoPE position of each query token.
    mask: jax.Array  # bool[B, T, S]: query t may attend to key s (global layers).
    local_mask: jax.Array | None = None  # bool[B, T, S], sliding-window layers; None = off.
    cache_index: jax.Array | None = None  # int32[]: cache slot of the first query (cached).


@flax.struct.dataclass
class LayerCache:
    """Keys and values, cache_dtype[L, B, S, K, H] (inside the scan: one layer, [B, S, K, H]).

    With `Gemma(unstacked=True)`: tuples of L arrays [B, S, K, H]."""

    k: jax.Array
    v: jax.Array


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """RoPE ("rotate half" pairing) of x [B, T, N, H] at int positions [B, T] -> float32."""
    half = x.shape[-1] // 2
    inverse_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    # [B, T, 1, H/2]
    angles = (positions.astype(jnp.float32)[..., None] * inverse_freq)[..., None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return jnp.tanh(x / cap) * cap if cap else x


def _fan_in_normal(in_axis: int | tuple[int, ...], out_axis: int | tuple[int, ...]) -> Any:
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )


class Embedder(nn.Module):
    """Tied token embedding `input_embedding` [V, D]: encode tokens, decode logits."""

    config: GemmaConfig
    dtype: Any
    param_dtype: Any

    def setup(self) -> None:
        self.input_embedding = layers.make_param(
            self, "input_embedding",
            nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0),
            (self.config.vocab_size, self.config.width), ("vocab", "embed"), self.param_dtype,
        )  # fmt: skip

    def encode(self, tokens: jax.Array) -> jax.Array:
        """tokens int32[B, T] -> `dtype`[B, T, D] times sqrt(D), the factor cast to `dtype` first.

        transformers casts the factor the same way (sqrt(2048) = 45.25 in bfloat16).
        """
        x = jnp.take(self.input_embedding, tokens, axis=0).astype(self.dtype)
        return x * jnp.asarray(self.config.width**0.5, self.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """x `dtype`[B, T, D] -> float32[B, T, V] logits, final soft-cap applied if configured."""
        table = self.input_embedding.astype(self.dtype)
        logits = jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)
        logits = _softcap(logits, self.config.final_logits_softcap)
        return layers.constrain(logits, ("batch", "length", "vocab"))


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional logit soft-cap and an optional cache write."""

    config: GemmaConfig
    dtype: Any
    param_dtype: Any

    def _project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shape = (cfg.num_heads, cfg.width, cfg.head_dim)
        if cfg.num_kv_heads == cfg.num_heads:  # big_vision fuses q/k/v when there are no groups.
            qkv = layers.Einsum(
                shape=(3, *shape), axes=(None, "heads", "embed", "head_dim"),
                init=_fan_in_normal(2, (0, 1, 3)), name="qkv_einsum", **kw,
            )("BTD,CNDH->CBTNH", x)  # fmt: skip
            return qkv[0], qkv[1], qkv[2]
        q = layers.Einsum(
            shape=shape, axes=("heads", "embed", "head_dim"), init=_fan_in_normal(1, (0, 2)),
            name="q_einsum", **kw,
        )("BTD,NDH->BTNH", x)  # fmt: skip
        k, v = layers.Einsum(
            shape=(2, cfg.num_kv_heads, cfg.width, cfg.head_dim),
            axes=(None, "kv_heads", "embed", "head_dim"), init=_fan_in_normal(2, (0, 1, 3)),
            name="kv_einsum", **kw,
        )("BSD,CKDH->CBSKH", x)  # fmt: skip
        return q, k, v

    @nn.compact
    def __call__(
        self, x: jax.Array, inputs: AttentionInputs, mask: jax.Array, cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache | None]:
        """x `dtype`[B, T, D], mask bool[B, T, S] -> (`dtype`[B, T, D], cache, T keys added)."""
        cfg = self.config
        q, k, v = self._project_qkv(x)
        capped = bool(cfg.attn_logits_softcap)
        q = apply_rope(q, inputs.positions, cfg.rope_base)
        # The einsum path scales the queries (in float32); the kernel path scales the logits.
        q = (q * cfg.query_scale if capped else q).astype(self.dtype)
        k = apply_rope(k, inputs.positions, cfg.rope_base).astype(self.dtype)
        q = layers.constrain(q, ("batch", "length", "heads", "head_dim"))
        if cache is not None:
            start = (0, inputs.cache_index, 0, 0)
            cache = LayerCache(
                k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start),
            )
            k, v = cache.k.astype(self.dtype), cache.v.astype(self.dtype)
        if capped:
            encoded = self._capped_attention(q, k, v, mask)
        else:  # cuDNN's partitioner wants q, k and v sharded alike (batch only).
            kv_axes = ("batch", "length", "kv_heads", "head_dim")
            k, v = layers.constrain(k, kv_axes), layers.constrain(v, kv_axes)
            encoded = layers.dot_product_attention(q, k, v, mask, scale=cfg.query_scale)
        out = layers.Einsum(
            shape=(cfg.num_heads, cfg.head_dim, cfg.width), axes=("heads", "head_dim", "embed"),
            init=_fan_in_normal((0, 1), 2), dtype=self.dtype, param_dtype=self.param_dtype,
            name="attn_vec_einsum",
        )  # fmt: skip
        return out("BTNH,NHD->BTD", encoded), cache

    def _capped_attention(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
    ) -> jax.Array:
        """Soft-capped attention, q (scaled) [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H].

        Materialises float32 logits [B, K, G, T, S]: cap * tanh(logits / cap) must see them.
        """
        cfg = self.config
        batch, length = q.shape[:2]
        groups = cfg.num_heads // cfg.num_kv_heads
        # [B, T, K, G, H]
        q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        logits = _softcap(logits, cfg.attn_logits_softcap)
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
        return encoded.reshape(batch, length, cfg.num_heads, cfg.head_dim)


class FeedForward(nn.Module):
    """GeGLU: (gelu_tanh(x W_gate) * x W_up) W_down; `gating_einsum` [2, D, F], `linear` [F, D]."""

    config: GemmaConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if self.has_variable("params", "gating_einsum_0"):  # `unstack_layers(for_decode=True)`
            gating = [self.get_variable("params", f"gating_einsum_{i}") for i in (0, 1)]
        else:
            gating = layers.make_param(
                self, "gating_einsum", _fan_in_normal(1, (0, 2)), (2, cfg.width, cfg.mlp_dim),
                (None, "embed", "mlp"), self.param_dtype,
            )  # fmt: skip
        gating = [gating[0].astype(self.dtype), gating[1].astype(self.dtype)]
        linear = layers.make_param(
            self, "linear", _fan_in_normal(0, 1), (cfg.mlp_dim, cfg.width), ("mlp", "embed"),
            self.param_dtype,
        ).astype(self.dtype)  # fmt: skip
        # Plain 2D matmuls over the B*T rows: the same math as "BTD,DF->BTF", but XLA:CPU's
        # backward pass of the 3D einsum adds transpose copies (~30% of the MLP's time).
        batch, length, width = x.shape
        rows = x.reshape(batch * length, width)  # [B*T, D]
        gating_lora, linear_lora = lora.adapter(self, "gating_einsum"), lora.adapter(self, "linear")

        def project(rows: jax.Array, weight: jax.Array, pair: lora.LoraPair | None) -> jax.Array:
            out = rows @ weight
            if pair is not None:  # Rows are "M": B*T.
                out = out + lora.einsum_term(self, "MI,IO->MO", rows, pair, self.dtype)
            return out

        slot = lambda index: None if gating_lora is None else gating_lora.slot(index)
        gate = jax.nn.gelu(project(rows, gating[0], slot(0)), approximate=True)
        hidden = (gate * project(rows, gating[1], slot(1))).reshape(batch, length, cfg.mlp_dim)
        hidden = layers.constrain(hidden, ("batch", "length", "mlp"))  # [B, T, F]
        out = project(hidden.reshape(batch * length, cfg.mlp_dim), linear, linear_lora)
        return out.reshape(batch, length, width)


class Block(nn.Module):
    """One decoder layer; scanned over depth with the layer index and its cache slice as inputs."""

    config: GemmaConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer: tuple[jax.Array, LayerCache | None],
        inputs: AttentionInputs,
    ) -> tuple[jax.Array, LayerCache | None]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layers.RMSNorm(eps=cfg.norm_eps, name=name, **kw)
        layer_index, cache = layer
        mask = inputs.mask
        if inputs.local_mask is not None:  # Layers 0, 2, 4, ... (GemmaConfig.is_sliding).
            mask = jnp.where(layer_index % 2 == 0, inputs.local_mask, inputs.mask)
        x = layers.constrain(x, layers.ACTIVATION)
        attended, cache = Attention(cfg, name="attn", **kw)(
            norm("pre_attention_norm")(x), inputs, mask, cache
        )
        if cfg.post_norms:
            attended = norm("post_attention_norm")(attended)
        x = x + attended
        fed = FeedForward(cfg, name="mlp", **kw)(norm("pre_ffw_norm")(x))
        if cfg.post_norms:
            fed = norm("post_ffw_norm")(fed)
        return layers.constrain(x + fed, layers.ACTIVATION), cache


class Gemma(nn.Module):
    """The decoder: `embed` tokens, run the blocks (`__call__`), `logits` from hidden states."""

    config: GemmaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = True
    # One parameter tree per layer (`layers_0`, `layers_1`, ...: see `unstack_layers`) and a cache
    # of per-layer arrays: a Python loop over separate weights. XLA:CPU copies every slice of a
    # stacked weight before its dot; decoding on CPU runs this form (infer/decode.py).
    unstacked: bool = False

    def setup(self) -> None:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        self.embedder = Embedder(**kw)
        if self.unstacked:
            self.blocks = [Block(name=f"layers_{i}", **kw) for i in range(self.config.depth)]
        else:
            blocks = layers.scan_blocks(
                Block,
                length=self.config.depth,
                remat=self.remat,
                scan_layers=self.scan_layers,
                in_axes=(0, nn.broadcast),
            )
            self.layers = blocks(**kw)
        self.final_norm = layers.RMSNorm(
            eps=self.config.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
        )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens int32[B, T] -> `dtype`[B, T, D] (times sqrt(D))."""
        return self.embedder.encode(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Normalised hidden `dtype`[B, T, D] -> float32[B, T, V]."""
        return self.embedder.decode(hidden)

    def __call__(
        self, x: jax.Array, inputs: AttentionInputs, cache: LayerCache | None = None
    ) -> tuple[jax.Array, LayerCache | None]:
        """x `dtype`[B, T, D] -> (final-normed hidden `dtype`[B, T, D], cache with keys written).

        With a cache (k/v [L, B, S, K, H]) keys/values go to slots cache_index..+T and queries
        attend over all S slots (inputs.mask is [B, T, S]); without one, over the T inputs.
        """
        x = x.astype(self.dtype)
        if self.unstacked:
            x, cache = self._run_unstacked(x, inputs, cache)
        else:
            layer_index = jnp.arange(self.config.depth, dtype=jnp.int32)
            x, cache = self.layers(x, (layer_index, cache), inputs)
        return self.final_norm(x), cache

    def _run_unstacked(
        self, x: jax.Array, inputs: AttentionInputs, cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache | None]:
        """The blocks one by one; a cache holds tuples of per-layer k/v [B, S, K, H]."""
        keys, values = [], []
        for index, block in enumerate(self.blocks):
            layer_cache = None if cache is None else LayerCache(k=cache.k[index], v=cache.v[index])
            x, layer_cache = block(x, (jnp.asarray(index, jnp.int32), layer_cache), inputs)
            if layer_cache is not None:
                keys.append(layer_cache.k)
                values.append(layer_cache.v)
        return x, None if cache is None else LayerCache(k=tuple(keys), v=tuple(values))


# Projections that `unstack_layers(for_decode=True)` stores as 2-D matrices (`layers.as_matrix`).
_DECODE_MATRICES = {"q_einsum": "BTD,NDH->BTNH", "attn_vec_einsum": "BTNH,NHD->BTD"}


def unstack_layers(tree: Any, depth: int, *, for_decode: bool = False) -> Any:
    """A variables tree of the stacked Gemma (`layers`: every leaf [L, ...]) with `layers` replaced
    by per-layer trees `layers_0` ... `layers_{L-1}`: the tree of `Gemma(unstacked=True)`.

    `tree` is the Gemma's own subtree of one collection (e.g. params['llm']). `for_decode` (params
    only) also stores each plain `mlp/gating_einsum` [2, D, F] as two [D, F] arrays
    `gating_einsum_0` / `_1`, and `attn/q_einsum/w`, `attn/attn_vec_einsum/w` as 2-D matrices
    `w_matrix` (`layers.as_matrix`): XLA:CPU copies a sliced or transposed weight before every
    token's dot, and these are what the dots read directly."""
    if "layers" not in tree:
        return tree
    out = {key: value for key, value in tree.items() if key != "layers"}
    for index in range(depth):
        layer = jax.tree.map(lambda leaf, i=index: leaf[i], tree["layers"])
        if for_decode:
            layer = _decode_layout(layer)
        out[f"layers_{index}"] = layer
    return out


def _decode_layout(layer: dict[str, Any]) -> dict[str, Any]:
    """One layer's params with plain (not int8) gating halves and attention matrices."""
    is_plain = lambda leaf: isinstance(leaf, jax.Array | np.ndarray)
    layer = dict(layer)
    gating = layer.get("mlp", {}).get("gating_einsum")
    if is_plain(gating):
        mlp = {key: value for key, value in layer["mlp"].items() if key != "gating_einsum"}
        layer["mlp"] = {**mlp, "gating_einsum_0": gating[0], "gating_einsum_1": gating[1]}
    attn = dict(layer.get("attn", {}))
    for name, eqn in _DECODE_MATRICES.items():
        weight = attn.get(name, {}).get("w")
        if is_plain(weight):
            attn[name] = {"w" + layers.MATRIX_SUFFIX: layers.as_matrix(eqn, weight)}
    if attn:
        layer["attn"] = attn
    return layer
