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
    logits: jax.Array, targets: jax.Array, ids: jax.Array, rows: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum_j q_j logit_j over the group float32[B, T], target-in-group bool[B, T])."""
    member = jnp.take(index, targets)
    q = jnp.take(rows, jnp.maximum(member, 0), axis=0)  # [B, T, G]
    group_logits = jnp.take(logits, ids, axis=-1)  # [B, T, G]
    return jnp.sum(q * group_logits, axis=-1), member >= 0


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, soft: SoftTargets) -> jax.Array:
    """float32[B, T] cross-entropy of `logits` [B, T, V] against soft targets for `targets` [B, T].

    -sum_j q_j log p_j = logsumexp(logits) - sum_j q_j logits_j, since q sums to 1.
    """
    logits = logits.astype(jnp.float32)
    normaliser = jax.nn.logsumexp(logits, axis=-1)
    hard = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loc, is_loc = _group_term(logits, targets, soft.loc_ids, soft.loc_rows, soft.loc_index)
    seg, is_seg = _group_term(logits, targets, soft.seg_ids, soft.seg_rows, soft.seg_index)
    expected = jnp.where(is_loc, loc, jnp.where(is_seg, seg, hard))
    return normaliser - expected


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
