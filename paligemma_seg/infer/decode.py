"""Batched autoregressive decoding on the model's prefill + fixed-size KV cache, all on device.

`make_decode_fn(model, cfg)` returns one jitted function

    decode(params, batch, grammar_tables, rng) -> DecodeResult(tokens int32[B, M], lengths, ...)

that prefills the prompts (`batch`: `image` float32[B, H, W, 3] in [-1, 1], `text`, `mask_ar`,
`mask_input` int32[B, T] in the prompt form of `tokenizer.tokenize_example(..., suffix=None, ...)`),
then runs a `jax.lax.while_loop` of `decode_step`s until every example has emitted EOS or M =
`max_new_tokens` tokens exist. After its EOS an example keeps emitting `pad_id`. Greedy by default;
`temperature > 0` samples, optionally from the `top_k` most likely tokens. With `grammar_tables`
(see `grammar.py`) every step's logits are masked so that only grammatical outputs come out.

Sharding: the function takes whatever shardings its inputs carry (parameters sharded as in
training, the batch split over the data axes) and jit propagates them through the loop; the
model's logical-axis constraints apply under the given `rules` (see `make_decode_fn`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from paligemma_seg.infer import grammar as grammar_lib
from paligemma_seg.model import lora
from paligemma_seg.model import paligemma as paligemma_lib

PROMPT_KEYS = ("image", "text", "mask_ar", "mask_input", "image_sizes")
UNSTACK_MAX_BYTES = 1 << 30  # DecodeConfig.unstack_layers=None: the largest LLM layers copied.


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static decoding settings (each distinct value compiles its own function)."""

    max_new_tokens: int  # M: tokens generated per example, EOS included.
    eos_id: int = 1
    pad_id: int = 0
    temperature: float = 0.0  # 0 = greedy (argmax).
    top_k: int = 0  # With temperature > 0: sample among the k most likely tokens; 0 = all.
    # Decode steps on per-layer copies of the LLM's weights and cache (`PaliGemma.unstacked_llm`):
    # XLA:CPU copies each slice of a stacked weight before its dot, every token. The copy made
    # once per call holds the LLM's layer weights twice. None = on the CPU backend when those
    # weights take at most UNSTACK_MAX_BYTES (a 3B model on CPU keeps one copy).
    unstack_layers: bool | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError(
                f"temperature={self.temperature} and top_k={self.top_k} must be >= 0 "
                "(temperature 0 = greedy, top_k 0 = no top-k cut)."
            )


@flax.struct.dataclass
class DecodeResult:
    tokens: jax.Array  # int32[B, M]: generated ids; EOS where an example stopped, then pad_id.
    lengths: jax.Array  # int32[B]: tokens before EOS (the output text's tokens); M if none.
    finished: jax.Array  # bool[B]: whether the example emitted EOS within M tokens.


def select_tokens(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """int32[B] next tokens from float[B, V] logits: argmax, or a (top-k) sample."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def cache_size_for(model: Any, prompt_len: int, max_new_tokens: int) -> int:
    """KV-cache entries for image tokens + prompt + generated tokens."""
    return int(model.config.num_image_tokens) + prompt_len + max_new_tokens


def _decode(
    params: Any,
    batch: Mapping[str, jax.Array],
    grammar_tables: grammar_lib.GrammarTables | None,
    rng: jax.Array,
    *,
    model: Any,
    cfg: DecodeConfig,
) -> DecodeResult:
    text = batch["text"]
    batch_size, prompt_len = text.shape
    max_new = cfg.max_new_tokens
    mask_input = batch.get("mask_input", jnp.ones_like(text))
    logits, cache = model.apply(
        lora.variables(params),
        batch["image"],
        text,
        batch["mask_ar"],
        mask_input,
        cache_size=cache_size_for(model, prompt_len, max_new),
        method=model.prefill,
    )

    step_model, step_variables = model, lora.variables(params)
    unstack = cfg.unstack_layers
    if unstack is None:
        layers = params.get("llm", {}).get("layers", {})
        size = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(layers))
        unstack = jax.default_backend() == "cpu" and size <= UNSTACK_MAX_BYTES
    if unstack and isinstance(model, paligemma_lib.PaliGemma) and not model.unstacked_llm:
        step_model = model.clone(unstacked_llm=True)
        step_variables = paligemma_lib.unstacked_variables(step_variables, model.config)
        cache = cache.unstacked()

    def choose(logits, grammar_state, rng, done):
        """Next tokens (pad where done) and the grammar state after them."""
        rng, step_rng = jax.random.split(rng)
        if grammar_state is not None:
            logits = grammar_lib.mask_logits(grammar_tables, grammar_state, logits)
        tokens = select_tokens(logits, step_rng, cfg.temperature, cfg.top_k)
        tokens = jnp.where(done, cfg.pad_id, tokens)
        if grammar_state is not None:
            grammar_state = grammar_lib.advance(grammar_tables, grammar_state, tokens)
        return tokens, grammar_state, rng

    grammar_state = None
    if grammar_tables is not None:
        sizes = batch.get("image_sizes")
        grammar_state = grammar_lib.initial_state(grammar_tables, batch_size, sizes)
    done = jnp.zeros((batch_size,), bool)
    token, grammar_state, rng = choose(logits, grammar_state, rng, done)
    out = jnp.full((batch_size, max_new), cfg.pad_id, jnp.int32).at[:, 0].set(token)
    done = token == cfg.eos_id

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, token, cache, out, done, grammar_state, rng = carry
        logits, cache = step_model.apply(
            step_variables, token, cache, method=step_model.decode_step
        )
        token, grammar_state, rng = choose(logits, grammar_state, rng, done)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        done = done | (token == cfg.eos_id)
        return step + 1, token, cache, out, done, grammar_state, rng

    carry = (jnp.asarray(1, jnp.int32), token, cache, out, done, grammar_state, rng)
    out = jax.lax.while_loop(cond, body, carry)[3]
    is_eos = out == cfg.eos_id
    finished = jnp.any(is_eos, axis=1)
    lengths = jnp.where(finished, jnp.argmax(is_eos, axis=1), max_new).astype(jnp.int32)
    return DecodeResult(tokens=out, lengths=lengths, finished=finished)


@functools.lru_cache(maxsize=16)
def _jitted_decode(model: Any, cfg: DecodeConfig, rules: tuple, out_shardings: Any) -> Callable:
    """One jitted function per (model, settings): repeated evaluations reuse the compilation."""

    def run(params, batch, grammar_tables, rng):
        with nn.logical_axis_rules(rules):
            return _decode(params, batch, grammar_tables, rng, model=model, cfg=cfg)

    kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(run, **kwargs)


def make_decode_fn(
    model: Any,
    cfg: DecodeConfig,
    *,
    rules: Sequence[tuple[str, Any]] = (),
    out_shardings: Any = None,
) -> Callable[..., DecodeResult]:
    """Jitted `decode(params, batch, grammar_tables=None, rng=None) -> DecodeResult`.

    `batch` holds `PROMPT_KEYS` (other keys are ignored; `image_sizes` int32[B, 2] is the optional
    (height, width) each output is decoded at, which the grammar uses to keep boxes >= 1 pixel);
    `grammar_tables=None` decodes freely. Sharded decoding: pass parameters and batch already
    sharded (e.g. as in training), the logical-axis `rules` of `sharding.get_rules` and call it
    inside the mesh context (`jax.set_mesh`); `out_shardings` (e.g. replicated) places the result.
    """
    jitted = _jitted_decode(model, cfg, tuple(rules), out_shardings)

    def decode(params, batch, grammar_tables=None, rng=None) -> DecodeResult:
        prompt = {key: batch[key] for key in PROMPT_KEYS if key in batch}
        missing = {"image", "text", "mask_ar"} - set(prompt)
        if missing:
            raise ValueError(f"decode batch lacks {sorted(missing)}; expected keys {PROMPT_KEYS}.")
        if rng is None:
            rng = jax.random.PRNGKey(0)
        return jitted(params, prompt, grammar_tables, rng)

    return decode


def output_ids(result: DecodeResult) -> list[list[int]]:
    """Per example, the generated ids before EOS (host lists)."""
    tokens, lengths = jax.device_get((result.tokens, result.lengths))
    return [row[:length].tolist() for row, length in zip(tokens, lengths, strict=True)]


def output_texts(tokenizer: Any, result: DecodeResult) -> list[str]:
    """Per example, the text of the generated tokens before EOS."""
    return [tokenizer.decode(ids) for ids in output_ids(result)]


def prompt_length(tokenizer: Any, prefixes: Sequence[str]) -> int:
    """Tokens of the longest prompt `[BOS] prefix "\\n"`."""
    return max(len(tokenizer.encode(prefix)) + 2 for prefix in prefixes)


def resolve_max_new_tokens(decode_cfg: Any, seq_len: int, prompt_len: int) -> int:
    """`decode.max_new_tokens` of the config, or (0 = default) `seq_len` minus the prompt."""
    configured = int(decode_cfg.max_new_tokens)
    max_new = configured if configured > 0 else seq_len - prompt_len
    if max_new < 1:
        raise ValueError(
            f"seq_len={seq_len} leaves no room for output after a {prompt_len}-token prompt; "
            "set decode.max_new_tokens > 0 or raise seq_len."
        )
    return max_new


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads every array's leading axis to `size` by repeating the last example (static shapes)."""
    padded = {}
    for key, value in batch.items():
        value = np.asarray(value)
        missing = size - value.shape[0]
        if missing < 0:
            raise ValueError(f"batch of {value.shape[0]} examples exceeds the padded size {size}.")
        padded[key] = (
            np.concatenate([value, np.repeat(value[-1:], missing, axis=0)]) if missing else value
        )
    return padded
