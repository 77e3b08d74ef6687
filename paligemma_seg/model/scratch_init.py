"""Structured starting values for a model trained from scratch (`model.structured_init`).

Random initialisation leaves a model to learn from examples alone what pretraining would have
taught it about positions. Three parameter tables start structured instead (all stay trainable,
and the parameter tree is unchanged):
  img/pos_embedding   2D sine-cosine position embeddings of the patch grid (as big_vision's ViT
                      `posemb="sincos2d"`), instead of Gaussian noise;
  <loc>, <seg> rows of llm/embedder/input_embedding, as below.

A randomly initialised model sees `<loc0511>` and `<loc0512>` as unrelated symbols, and the 128
`<seg>` codes as unrelated too, and must learn from examples alone that neighbouring bins, or codes
whose VQ-VAE vectors are close, mean nearly the same thing. With tied embeddings (Gemma) the same
rows also score the output, so a structured table makes a near miss cost little from step 0:
  <locNNNN>  random Fourier features of the bin position: rows of nearby bins are similar, with a
             similarity that falls off over ~`LOC_SCALE` bins;
  <segNNN>   the codec's codebook vectors, centred and randomly projected to the model width.
Both are scaled to the row norm of the random initialisation, so nothing else changes. Pretrained
checkpoints (`init`) are never touched: this only replaces rows of a fresh random init.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SINCOS_TEMPERATURE = 10_000.0
LOC_SCALE = 24.0  # Bins (of 1024) over which loc embeddings decorrelate.


def _unit_rms(rows: np.ndarray, rms: float) -> np.ndarray:
    """Rows rescaled so that each has root-mean-square `rms`."""
    norms = np.sqrt(np.mean(rows**2, axis=1, keepdims=True))
    return rows * (rms / np.maximum(norms, 1e-12))


def loc_embeddings(num_bins: int, width: int, rms: float, seed: int) -> np.ndarray:
    """float32[num_bins, width]: random Fourier features of the bin index (an RBF-like kernel)."""
    rng = np.random.default_rng([seed, 1])
    frequencies = rng.normal(0.0, 1.0 / LOC_SCALE, width)
    phases = rng.uniform(0.0, 2 * np.pi, width)
    rows = np.cos(np.arange(num_bins)[:, None] * frequencies[None, :] + phases[None, :])
    return _unit_rms(rows, rms).astype(np.float32)


def seg_embeddings(codebook: np.ndarray, width: int, rms: float, seed: int) -> np.ndarray:
    """float32[num_codes, width]: centred codebook vectors through a random Gaussian projection."""
    rng = np.random.default_rng([seed, 2])
    centred = codebook - codebook.mean(axis=0, keepdims=True)
    projection = rng.normal(0.0, 1.0, (codebook.shape[1], width))
    return _unit_rms(centred @ projection, rms).astype(np.float32)


def structured_embedding(
    embedding: Any,
    loc_ids: np.ndarray,
    seg_ids: np.ndarray,
    codebook: np.ndarray,
    seed: int = 0,
) -> jax.Array:
    """The [V, D] table `embedding` with its loc and seg rows replaced (see the module docstring).

    Traceable (jit it with the embedding's sharding: no host ever gathers the table).

    Args:
      embedding: float[V, D] randomly initialised token embedding.
      loc_ids: int[1024] token ids of <loc0000>..<loc1023>.
      seg_ids: int[128] token ids of <seg000>..<seg127>.
      codebook: float[128, C] the mask VQ-VAE's codebook.
    """
    vocab, width = embedding.shape
    for name, ids in (("loc", loc_ids), ("seg", seg_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"{name} token ids reach {ids.max()}, outside the {vocab}-row table")
    if codebook.shape[0] != len(seg_ids):
        raise ValueError(f"codebook has {codebook.shape[0]} codes for {len(seg_ids)} seg tokens")
    loc_rows = loc_embeddings(len(loc_ids), width, 1.0, seed)
    seg_rows = seg_embeddings(np.asarray(codebook, np.float64), width, 1.0, seed)
    table = jnp.asarray(embedding)
    rms = jnp.sqrt(jnp.mean(jnp.square(table.astype(jnp.float32))))
    table = table.at[loc_ids].set((loc_rows * rms).astype(table.dtype))
    return table.at[seg_ids].set((seg_rows * rms).astype(table.dtype))


def sincos2d_posemb(grid: int, width: int) -> np.ndarray:
    """float32[1, grid * grid, width]: [sin x, cos x, sin y, cos y] at geometric frequencies.

    Row-major over the patch grid (y, then x), the order of the ViT's patch tokens.
    """
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / SINCOS_TEMPERATURE ** (np.arange(quarter) / max(quarter - 1, 1))
    y, x = np.mgrid[:grid, :grid]
    angles_x = x.reshape(-1, 1) * omega[None, :]
    angles_y = y.reshape(-1, 1) * omega[None, :]
    table = np.concatenate(
        [np.sin(angles_x), np.cos(angles_x), np.sin(angles_y), np.cos(angles_y)], axis=1
    )
    return table[None].astype(np.float32)
