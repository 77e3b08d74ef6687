"""The training loss: next-token cross-entropy on the suffix, with optional soft `<loc>`/`<seg>`
targets (`loss.loc_sigma`, `loss.seg_temperature`).

`next_token_loss`: targets are `text[:, 1:]`, predicted from `logits[:, :-1]`, weighted by
`mask_loss[:, 1:]` (the suffix and its EOS). It returns a (numerator, denominator) pair that the
step sums over micro-batches and divides at the end, so gradient accumulation changes nothing.
`loss.normalize` says how the global batch's cross-entropy is averaged:
  'token'    sum over every supervised token of the batch / their number: every token counts the
             same, a long answer more than a short one (transformers' mean over labels != -100);
  'example'  big_vision's PaliGemma trainer: the mean over each example's supervised tokens, then
             the mean over the examples of the batch, so every example counts the same. An example
             without supervised tokens contributes 0 and still counts in the batch's number of
             examples (big_vision divides each example's sum by max(its tokens, 1), then takes
             the plain batch mean); here every example has at least its EOS.

Plain cross-entropy calls `<loc0511>` as wrong as `<loc0007>` when the answer is `<loc0512>`, and
every wrong `<seg>` code equally wrong, although a near bin moves a box edge by a pixel and a code
whose VQ-VAE vector is close decodes to nearly the same mask patch. With soft targets the training
loss at a `<loc>` or `<seg>` target is the cross-entropy against a distribution q over its group
(all other tokens keep one-hot targets):
  <locNNNN>  q(j) ∝ exp(-(j - t)^2 / (2 sigma^2)) over the 1024 bins (sigma in bins);
  <segNNN>   q(j) ∝ exp(-|c_j - c_t|^2 / (temperature * m)) over the 128 codes, with c the
             codec's codebook and m the median squared distance between two different codes.
As sigma or temperature go to 0, q becomes one-hot and the loss is plain cross-entropy. q puts its
largest mass on the true token, so greedy decoding still aims at it. Validation loss stays plain
cross-entropy and a per-token mean (whatever `loss.normalize` says), comparable across runs.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

NORMALIZE = ("token", "example")  # loss.normalize: how a batch's cross-entropy is averaged.


@flax.struct.dataclass
class SoftTargets:
    """Per-group target distributions; `group_index` maps a vocabulary id to its row (-1: none)."""

    loc_ids: jax.Array  # int32[1024]: vocabulary id of bin i.
    loc_rows: jax.Array  # float32[1024, 1024]: q for target bin t (row t), sums to 1.
    loc_index: jax.Array  # int32[V]: bin of a <loc> id, -1 elsewhere.
    seg_ids: jax.Array  # int32[128]
    seg_rows: jax.Array  # float32[128, 128]
    seg_index: jax.Array  # int32[V]


def loc_distribution(num_bins: int, sigma: float) -> np.ndarray:
    """float32[num_bins, num_bins]: row t is a Gaussian over bins centred on t (one-hot if 0)."""
    if sigma <= 0:
        return np.eye(num_bins, dtype=np.float32)
    bins = np.arange(num_bins, dtype=np.float64)
    logits = -((bins[None, :] - bins[:, None]) ** 2) / (2 * sigma**2)
    rows = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (rows / rows.sum(axis=1, keepdims=True)).astype(np.float32)


def seg_distribution(codebook: np.ndarray, temperature: float) -> np.ndarray:
    """float32[K, K]: row t weights code j by its codebook distance to t (one-hot if 0)."""
    num_codes = codebook.shape[0]
    if temperature <= 0:
        return np.eye(num_codes, dtype=np.float32)
    vectors = np.asarray(codebook, np.float64)
    squared = np.sum((vectors[:, None, :] - vectors[None, :, :]) ** 2, axis=-1)
    scale = np.median(squared[~np.eye(num_codes, dtype=bool)])
    logits = -squared / (temperature * max(scale, 1e-12))
    rows = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (rows / rows.sum(axis=1, keepdims=True)).astype(np.float32)


def _index(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    index = np.full(vocab_size, -1, np.int32)
    index[np.asarray(ids)] = np.arange(len(ids), dtype=np.int32)
    return index


def build(
    vocab_size: int,
    loc_ids: np.ndarray,
    seg_ids: np.ndarray,
    codebook: np.ndarray,
    loc_sigma: float,
    seg_temperature: float,
) -> SoftTargets:
    """Tables for `soft_cross_entropy` (host numpy; jit places them as constants)."""
    if loc_sigma < 0 or seg_temperature < 0:
        raise ValueError(
            f"loss.loc_sigma={loc_sigma} and loss.seg_temperature={seg_temperature} must be >= 0 "
            "(0 = plain cross-entropy)."
        )
    if len(seg_ids) != codebook.shape[0]:
        raise ValueError(
            f"The tokenizer has {len(seg_ids)} <seg> tokens but the codec's codebook has "
            f"{codebook.shape[0]} codes; use a matching tokenizer and codec."
        )
    return SoftTargets(
        loc_ids=np.asarray(loc_ids, np.int32),
        loc_rows=loc_distribution(len(loc_ids), loc_sigma),
        loc_index=_index(loc_ids, vocab_size),
        seg_ids=np.asarray(seg_ids, np.int32),
        seg_rows=seg_distribution(codebook, seg_temperature),
        seg_index=_index(seg_ids, vocab_size),
    )


def _group_term(
    group_logits: jax.Array, targets: jax.Array, rows: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum_j q_j logit_j over the group float32[B, T], target-in-group bool[B, T]) from the
    group's logits float32[B, T, G]."""
    member = jnp.take(index, targets)
    q = jnp.take(rows, jnp.maximum(member, 0), axis=0)  # [B, T, G]
    return jnp.sum(q * group_logits, axis=-1), member >= 0


def _expected_logit(
    hard: jax.Array, targets: jax.Array, soft: SoftTargets, group_logits: Any
) -> jax.Array:
    """sum_j q_j logit_j: the soft groups' expectation where the target is in one, else `hard`.
    `group_logits(ids)` gives float32[B, T, G] logits of the vocabulary ids `ids`."""
    loc, is_loc = _group_term(group_logits(soft.loc_ids), targets, soft.loc_rows, soft.loc_index)
    seg, is_seg = _group_term(group_logits(soft.seg_ids), targets, soft.seg_rows, soft.seg_index)
    return jnp.where(is_loc, loc, jnp.where(is_seg, seg, hard))


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, soft: SoftTargets) -> jax.Array:
    """float32[B, T] cross-entropy of `logits` [B, T, V] against soft targets for `targets` [B, T].

    -sum_j q_j log p_j = logsumexp(logits) - sum_j q_j logits_j, since q sums to 1.
    """
    logits = logits.astype(jnp.float32)
    normaliser = jax.nn.logsumexp(logits, axis=-1)
    hard = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    expected = _expected_logit(hard, targets, soft, lambda ids: jnp.take(logits, ids, axis=-1))
    return normaliser - expected


# --- The same cross-entropy from hidden states, vocabulary chunk by chunk (loss.vocab_chunks) ---
#
# logits = softcap(hidden . table^T) in float32 is [B, T, V]: at Gemma's 257,152 tokens, batch 8 x
# 128 text tokens, 1 GiB, and as much again for its gradient. The chunked form never builds it:
# a scan over `chunks` slices of the table keeps a running max and sum of exp (a streaming
# logsumexp), each slice rematerialised in the backward pass; the target's logit and the soft
# groups' logits come from their own table rows. Same maths as `Embedder.decode` + the losses
# above, summed in a different order (float32 rounding apart, equal).


def vocab_chunks(vocab_size: int, requested: int) -> int:
    """The number of equal slices the vocabulary is cut into: the smallest divisor of
    `vocab_size` that is >= `requested` (1 or less: no chunking). 257,152 = 2^7 * 7^2 * 41, so
    e.g. 16 stays 16 (16,072 rows each)."""
    if requested <= 1:
        return 1
    return next(n for n in range(requested, vocab_size + 1) if vocab_size % n == 0)


def _capped_logits(hidden: jax.Array, rows: jax.Array, cap: float | None) -> jax.Array:
    """float32[B, T, N] softcap(hidden . rows^T) for table rows [N, D], as `Embedder.decode`."""
    logits = jnp.einsum(
        "BTD,ND->BTN", hidden, rows.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    return jnp.tanh(logits / cap) * cap if cap else logits


def streamed_logsumexp(
    hidden: jax.Array, table: jax.Array, cap: float | None, chunks: int
) -> jax.Array:
    """float32[B, T] logsumexp over the vocabulary of softcap(hidden . table^T), `chunks` slices
    of `table` [V, D] at a time (`chunks` must divide V; see `vocab_chunks`)."""
    vocab = table.shape[0]
    if vocab % chunks:
        raise ValueError(f"loss.vocab_chunks={chunks} does not divide the vocabulary ({vocab})")
    size = vocab // chunks

    def running(carry: tuple[jax.Array, jax.Array], index: jax.Array) -> tuple[Any, None]:
        top, total = carry
        rows = jax.lax.dynamic_slice_in_dim(table, index * size, size, axis=0)
        logits = _capped_logits(hidden, rows, cap)
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top[..., None]), -1)
        return (new_top, total), None

    first = _capped_logits(hidden, table[:size], cap)
    top = jnp.max(first, axis=-1)
    total = jnp.sum(jnp.exp(first - top[..., None]), axis=-1)
    if chunks > 1:
        (top, total), _ = jax.lax.scan(
            jax.checkpoint(running), (top, total), jnp.arange(1, chunks, dtype=jnp.int32)
        )
    return top + jnp.log(total)


def hidden_cross_entropy(
    hidden: jax.Array,
    table: jax.Array,
    targets: jax.Array,
    cap: float | None,
    chunks: int,
    soft: SoftTargets | None = None,
) -> jax.Array:
    """float32[B, T] cross-entropy of the logits softcap(hidden . table^T) against `targets`
    int32[B, T] (soft `<loc>`/`<seg>` targets with `soft`), without a [B, T, V] array.

    hidden `dtype`[B, T, D] final-normed (`PaliGemma.text_hidden`); table [V, D] the tied
    embedding (cast to hidden's dtype, as the model does); cap the final logit soft-cap.
    """
    normaliser = streamed_logsumexp(hidden, table, cap, chunks)
    rows = jnp.take(table, targets, axis=0).astype(hidden.dtype)  # [B, T, D]
    hard = jnp.einsum("BTD,BTD->BT", hidden, rows, preferred_element_type=jnp.float32)
    hard = jnp.tanh(hard / cap) * cap if cap else hard
    if soft is None:
        return normaliser - hard
    group = lambda ids: _capped_logits(hidden, jnp.take(table, ids, axis=0), cap)
    return normaliser - _expected_logit(hard, targets, soft, group)


def check_normalize(normalize: str) -> str:
    """`normalize` if it is one of NORMALIZE, else a ValueError naming the config key."""
    if normalize not in NORMALIZE:
        raise ValueError(f"loss.normalize={normalize!r}; use one of {NORMALIZE}.")
    return normalize


def next_token_loss(
    logits: jax.Array,
    text: jax.Array,
    mask_loss: jax.Array,
    soft: SoftTargets | None = None,
    normalize: str = "token",
) -> tuple[jax.Array, jax.Array]:
    """(numerator float32[], denominator float32[]) of a batch's loss; loss = their ratio.

    'token': (cross-entropy summed over the supervised tokens, number of those tokens);
    'example': (sum over the examples of each one's mean cross-entropy, number of examples).
    Sums of both over the micro-batches of a global batch give its loss (see the module).
    logits float32[B, T, V] at text positions; text int32[B, T]; mask_loss int32[B, T] (1 =
    supervised).
    Position t predicts token t + 1, so the weights are `mask_loss[:, 1:]`. With `soft`, `<loc>`
    and `<seg>` targets are soft (below); otherwise every target is one-hot.
    """
    check_normalize(normalize)
    if soft is None:
        per_token = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), text[:, 1:]
        )
    else:
        per_token = soft_cross_entropy(logits[:, :-1], text[:, 1:], soft)
    return reduce_loss(per_token, mask_loss, normalize)


def next_token_loss_from_hidden(
    hidden: jax.Array,
    table: jax.Array,
    cap: float | None,
    chunks: int,
    text: jax.Array,
    mask_loss: jax.Array,
    soft: SoftTargets | None = None,
    normalize: str = "token",
) -> tuple[jax.Array, jax.Array]:
    """`next_token_loss` of the logits softcap(hidden . table^T), the vocabulary taken `chunks`
    slices at a time (`hidden_cross_entropy`): the same value, no [B, T, V] logits."""
    check_normalize(normalize)
    per_token = hidden_cross_entropy(hidden[:, :-1], table, text[:, 1:], cap, chunks, soft)
    return reduce_loss(per_token, mask_loss, normalize)


def reduce_loss(
    per_token: jax.Array, mask_loss: jax.Array, normalize: str
) -> tuple[jax.Array, jax.Array]:
    """(numerator, denominator) of float32[B, T - 1] per-target cross-entropies weighted by
    `mask_loss[:, 1:]`, averaged as `normalize` says (see `next_token_loss`)."""
    weights = mask_loss[:, 1:].astype(jnp.float32)
    if normalize == "token":
        return jnp.sum(per_token * weights), jnp.sum(weights)
    per_example = jnp.sum(per_token * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return jnp.sum(per_example), jnp.asarray(per_example.shape[0], jnp.float32)


def from_config(cfg: Any) -> SoftTargets | None:
    """The tables of `cfg.loss`, or None when both are 0 (plain cross-entropy)."""
    loss = cfg.get("loss")
    if loss is None or (loss.loc_sigma <= 0 and loss.seg_temperature <= 0):
        return None
    from paligemma_seg import experiment  # The tables come from the tokenizer and codec files.

    tokenizer, codec = experiment.load_tokenizer(cfg), experiment.load_codec(cfg)
    return build(
        tokenizer.vocab_size,
        tokenizer.loc_ids,
        tokenizer.seg_ids,
        np.asarray(codec.vqvae.params["codebook"], np.float32),
        float(loss.loc_sigma),
        float(loss.seg_temperature),
    )
