"""PaliGemma: image tokens before the text, a prefix-LM mask from `mask_ar`, text logits; KV cache.

Owns the sequence layout, attention masks, positions and the decoding cache; not the decode loop
(`paligemma_seg/infer/decode.py`) nor weight files (`paligemma_seg/weights/`).
Shapes: B batch, N image tokens, T text tokens, L = N + T, S cache slots, V vocabulary, D LLM
width, K kv heads, H head dim. dtype policy: see `config.PaliGemmaConfig`; logits are float32.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma_seg.model import layers
from paligemma_seg.model.config import GemmaConfig, PaliGemmaConfig
from paligemma_seg.model.gemma import AttentionInputs, Gemma, LayerCache, unstack_layers
from paligemma_seg.model.siglip import SiglipEncoder

CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


@flax.struct.dataclass
class KVCache:
    """Fixed-size decoding state; every shape is fixed at prefill, so it can live in a while_loop.

    Slots 0..L-1 hold the prompt (padding slots stay invalid), decode step i writes slot L + i.
    Queries read keys back from the cache, so a bfloat16 cache rounds the prompt's keys for the
    prefill logits too (as big_vision does).
    """

    k: jax.Array  # cache_dtype[Layers, B, S, K, H] (a tuple of [B, S, K, H]: `unstacked_llm`)
    v: jax.Array  # cache_dtype[Layers, B, S, K, H] (a tuple of [B, S, K, H]: `unstacked_llm`)
    positions: jax.Array  # int32[B, S]: RoPE position of each slot's token.
    valid: jax.Array  # bool[B, S]: slot holds a real token (not padding, not yet written).
    index: jax.Array  # int32[]: next slot to write, shared by the batch.
    next_position: jax.Array  # int32[B]: RoPE position of each example's next token.

    @property
    def size(self) -> int:
        return self.k[0].shape[1] if isinstance(self.k, tuple) else self.k.shape[2]

    def unstacked(self) -> KVCache:
        """The same cache with per-layer k/v tuples (the form `unstacked_llm` decodes on)."""
        if isinstance(self.k, tuple):
            return self
        depth = self.k.shape[0]
        return self.replace(
            k=tuple(self.k[i] for i in range(depth)), v=tuple(self.v[i] for i in range(depth))
        )


def make_attn_mask(mask_ar: jax.Array, mask_input: jax.Array) -> jax.Array:
    """bool[B, L, L]: i attends to j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i], both valid.

    mask_ar int32[B, L] (1 = starts a new causal block), mask_input bool/int[B, L] (1 = real token):
      [[1 1 1 1 1 1]]: causal.
      [[0 0 0 1 1 1]]: prefix-LM: the first three attend to each other, the rest causally.
      [[1 0 1 0 1 0 0 1 0 0]]: four blocks, full attention inside a block, causal between blocks.
    """
    segments = jnp.cumsum(mask_ar, axis=1)
    valid = mask_input.astype(bool)
    return (segments[:, None, :] <= segments[:, :, None]) & valid[:, None, :] & valid[:, :, None]


def sliding_window_mask(
    mask: jax.Array, mask_ar: jax.Array, positions: jax.Array, window: int
) -> jax.Array:
    """Keeps keys less than `window` positions back in `mask` bool[B, L, L], as transformers does.

    Tokens of one full-attention block (equal cumsum(mask_ar), e.g. image + prefix) still see each
    other whatever their distance: transformers ORs its bidirectional prefix block onto the
    windowed causal mask.
    """
    segments = jnp.cumsum(mask_ar, axis=1)
    near = positions[:, :, None] - positions[:, None, :] < window
    same_block = segments[:, :, None] == segments[:, None, :]
    return mask & (near | same_block)


def _decode_masks(
    position: jax.Array, cache: KVCache, window: int | None
) -> tuple[jax.Array, jax.Array | None]:
    """Masks bool[B, 1, S] of a new causal token at `position` int32[B] over the cache slots."""
    mask = cache.valid & (cache.positions <= position[:, None])
    local = None if window is None else mask & (position[:, None] - cache.positions < window)
    return mask[:, None, :], None if local is None else local[:, None, :]


class PaliGemma(nn.Module):
    """Image + text -> text logits (`__call__`), and cached decoding (`prefill`, `decode_step`)."""

    config: PaliGemmaConfig
    # The LLM's layers as separate parameter trees and its cache as per-layer tuples (variables
    # from `unstacked_variables`, cache from `KVCache.unstacked`): for `decode_step` on CPU.
    unstacked_llm: bool = False

    def setup(self) -> None:
        cfg = self.config
        kw = dict(
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            remat=cfg.remat,
            scan_layers=cfg.scan_layers,
        )
        self.img = SiglipEncoder(cfg.vision, out_width=cfg.llm.width, **kw)
        self.llm = Gemma(cfg.llm, unstacked=self.unstacked_llm, **kw)

    @property
    def _window(self) -> int | None:
        return self.config.llm.sliding_window or None

    def _embed_sequence(
        self, image: jax.Array, text: jax.Array, mask_ar: jax.Array, mask_input: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (x `dtype`[B, L, D], mask_ar int32[B, L], mask_input bool[B, L]), image first."""
        image_tokens = self.img(image)  # Not scaled by sqrt(D); text embeddings are.
        text_tokens = self.llm.embed(text)
        if mask_input is None:
            mask_input = jnp.ones(text.shape, bool)
        num_image = image_tokens.shape[1]
        batch = text.shape[0]
        mask_ar = jnp.concatenate([jnp.zeros((batch, num_image), jnp.int32), mask_ar], axis=1)
        mask_input = jnp.concatenate(
            [jnp.ones((batch, num_image), bool), mask_input.astype(bool)], 1
        )
        x = jnp.concatenate([image_tokens, text_tokens.astype(image_tokens.dtype)], axis=1)
        return layers.constrain(x, layers.ACTIVATION), mask_ar.astype(jnp.int32), mask_input

    def _prompt_inputs(self, mask_ar: jax.Array, mask_input: jax.Array) -> AttentionInputs:
        """Masks bool[B, L, L] and positions (real tokens before each one) of a whole sequence."""
        positions = jnp.cumsum(mask_input, axis=1, dtype=jnp.int32) - 1
        mask = make_attn_mask(mask_ar, mask_input)
        local = None
        if self._window is not None:
            local = sliding_window_mask(mask, mask_ar, positions, self._window)
        return AttentionInputs(positions=positions, mask=mask, local_mask=local)

    def __call__(
        self,
        image: jax.Array,
        text: jax.Array,
        mask_ar: jax.Array,
        mask_input: jax.Array | None = None,
    ) -> jax.Array:
        """Text logits of a prefix-LM forward pass.

        Args:
          image: float32[B, H, W, 3] in [-1, 1].
          text: int32[B, T] token ids.
          mask_ar: int32[B, T], 0 = full attention with the prefix (and image), 1 = causal.
          mask_input: int32/bool[B, T], 1 = real token, 0 = padding (never attended). Default all
          ones.

        Returns:
          float32[B, T, V]: logits at every text position (padding positions are meaningless).
        """
        return self.llm.logits(self.text_hidden(image, text, mask_ar, mask_input))

    def text_hidden(
        self,
        image: jax.Array,
        text: jax.Array,
        mask_ar: jax.Array,
        mask_input: jax.Array | None = None,
    ) -> jax.Array:
        """`dtype`[B, T, D]: the final-normed hidden states at the text positions, from which
        `__call__` takes its logits (the training loss can take them vocabulary chunk by chunk:
        train/loss.py, `loss.vocab_chunks`). Arguments as `__call__`."""
        x, full_ar, full_input = self._embed_sequence(image, text, mask_ar, mask_input)
        hidden, _ = self.llm(x, self._prompt_inputs(full_ar, full_input))
        return hidden[:, -text.shape[1] :]

    def prefill(
        self,
        image: jax.Array,
        text: jax.Array,
        mask_ar: jax.Array,
        mask_input: jax.Array | None = None,
        *,
        cache_size: int,
    ) -> tuple[jax.Array, KVCache]:
        """Runs the prompt and fills a cache of `cache_size` slots (S >= N + T).

        Args: as `__call__`; prompts are left-aligned (padding after the real tokens).

        Returns:
          (float32[B, V] logits after each example's last real token, the cache). Each
          `decode_step` uses one more slot: at most S - N - T steps fit (later writes would
          overwrite the last slot).
        """
        x, full_ar, full_input = self._embed_sequence(image, text, mask_ar, mask_input)
        batch, length = full_input.shape
        if cache_size < length:
            raise ValueError(
                f"cache_size={cache_size} is smaller than the prompt ({length} = image + text "
                f"tokens); use cache_size >= {length} + the number of tokens to decode."
            )
        inputs = self._prompt_inputs(full_ar, full_input)
        pad = lambda m: jnp.pad(m, ((0, 0), (0, 0), (0, cache_size - length)))
        inputs = inputs.replace(
            mask=pad(inputs.mask),
            local_mask=None if inputs.local_mask is None else pad(inputs.local_mask),
            cache_index=jnp.zeros((), jnp.int32),
        )
        hidden, layer_cache = self.llm(x, inputs, self._empty_cache(batch, cache_size))
        last = jnp.max(jnp.where(full_input, jnp.arange(length), 0), axis=1)
        # [B, 1, D] hidden state of each example's last real token.
        last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
        cache = KVCache(
            k=layer_cache.k,
            v=layer_cache.v,
            positions=jnp.pad(inputs.positions, ((0, 0), (0, cache_size - length))),
            valid=jnp.pad(full_input, ((0, 0), (0, cache_size - length))),
            index=jnp.asarray(length, jnp.int32),
            next_position=jnp.sum(full_input, axis=1, dtype=jnp.int32),
        )
        return self.llm.logits(last_hidden)[:, 0], cache

    def decode_step(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One causal token per example: tokens int32[B] -> (float32[B, V] next logits, cache)."""
        position = cache.next_position
        set_slot = lambda row, value: jax.lax.dynamic_update_slice(
            row, value[:, None].astype(row.dtype), (0, cache.index)
        )
        cache = cache.replace(
            positions=set_slot(cache.positions, position),
            valid=set_slot(cache.valid, jnp.ones_like(position, bool)),
        )
        mask, local = _decode_masks(position, cache, self._window)
        inputs = AttentionInputs(
            positions=position[:, None], mask=mask, local_mask=local, cache_index=cache.index
        )
        hidden, layer_cache = self.llm(
            self.llm.embed(tokens[:, None]), inputs, self._cache_kv(cache)
        )
        cache = cache.replace(
            k=layer_cache.k, v=layer_cache.v, index=cache.index + 1, next_position=position + 1
        )
        return self.llm.logits(hidden)[:, 0], cache

    def _cache_kv(self, cache: KVCache) -> LayerCache:
        return _constrained(cache.k, cache.v)

    def _empty_cache(self, batch: int, size: int) -> LayerCache:
        llm: GemmaConfig = self.config.llm
        dtype = jnp.dtype(self.config.cache_dtype or self.config.dtype)
        zeros = jnp.zeros((llm.depth, batch, size, llm.num_kv_heads, llm.head_dim), dtype)
        return _constrained(zeros, zeros)


def _constrained(k: Any, v: Any) -> LayerCache:
    if isinstance(k, tuple):
        each = lambda arrays: tuple(layers.constrain(a, CACHE_AXES[1:]) for a in arrays)
        return LayerCache(k=each(k), v=each(v))
    return LayerCache(k=layers.constrain(k, CACHE_AXES), v=layers.constrain(v, CACHE_AXES))


def unstacked_variables(variables: dict[str, Any], config: PaliGemmaConfig) -> dict[str, Any]:
    """Flax variables of `PaliGemma(config)` (each collection's llm/layers stacked) -> those of
    `PaliGemma(config, unstacked_llm=True)` (llm/layers_0 ...): a copy of the LLM's weights."""
    depth = config.llm.depth
    out = {}
    for collection, tree in variables.items():
        tree = dict(tree)
        if "llm" in tree:
            tree["llm"] = unstack_layers(tree["llm"], depth, for_decode=collection == "params")
        out[collection] = tree
    return out


def _dummy_inputs(config: PaliGemmaConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    side = config.vision.image_size
    return (
        jnp.zeros((1, side, side, 3), jnp.float32),
        jnp.zeros((1, 1), jnp.int32),
        jnp.ones((1, 1), jnp.int32),
    )


def _boxed_shapes(config: PaliGemmaConfig) -> Any:
    model = PaliGemma(config)
    init = lambda: model.init(jax.random.PRNGKey(0), *_dummy_inputs(config))["params"]
    return jax.eval_shape(init)


def init_params(config: PaliGemmaConfig, rng: jax.Array) -> dict[str, Any]:
    """Randomly initialised parameters as plain arrays (`param_dtype`), big_vision's tree.

    The initializers draw from an RBG key derived from `rng` (raw or typed key): XLA compiles the
    RngBitGenerator ~4x faster than threefry's hash. Same `rng`, same values on one backend.
    """
    model = PaliGemma(config)

    def init(key: jax.Array) -> Any:
        rbg_key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
        return model.init(rbg_key, *_dummy_inputs(config))["params"]

    return nn.meta.unbox(jax.jit(init)(rng))


def param_shapes(config: PaliGemmaConfig) -> dict[str, Any]:
    """The parameter tree as jax.ShapeDtypeStruct leaves; allocates nothing."""
    return nn.meta.unbox(_boxed_shapes(config))


def logical_axes(config: PaliGemmaConfig) -> dict[str, Any]:
    """Tree of logical axis-name tuples, e.g. ('layers', 'embed', 'mlp'), shaped like the params."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda box: tuple(box.names), _boxed_shapes(config), is_leaf=is_box)
