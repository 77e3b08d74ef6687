"""Structured starting tables for models trained from scratch (paligemma_seg.scratch_init)."""

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from test_prepare import _tiny_config

from paligemma_seg import experiment
from paligemma_seg.model import scratch_init


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def test_loc_rows_are_similar_for_near_bins_only():
    rows = scratch_init.loc_embeddings(1024, 256, rms=0.0625, seed=0)
    np.testing.assert_allclose(np.sqrt(np.mean(rows**2, axis=1)), 0.0625, rtol=1e-5)
    sim = _cosine(rows, rows)
    near = np.mean([sim[i, i + 1] for i in range(1023)])
    mid = np.mean([sim[i, i + int(scratch_init.LOC_SCALE)] for i in range(900)])
    far = np.abs([sim[i, i + 300] for i in range(700)]).mean()
    assert near > 0.98 and 0.4 < mid < 0.8 and far < 0.15, (near, mid, far)
    # Nearest other row of every bin is an adjacent bin: the table is ordered like the bins.
    np.fill_diagonal(sim, -np.inf)
    assert np.all(np.abs(np.argmax(sim, axis=1) - np.arange(1024)) == 1)


def test_seg_rows_keep_the_codebook_geometry():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 512))  # 8 families of similar codes, plus a shared offset
    codebook = (
        centres[np.arange(128) % 8] + 0.7 * rng.normal(size=(128, 512)) + 3 * rng.normal(size=512)
    )
    rows = scratch_init.seg_embeddings(codebook, 256, rms=0.0625, seed=0)
    centred = codebook - codebook.mean(0)
    want, got = _cosine(centred, centred), _cosine(rows, rows)
    upper = np.triu_indices(128, 1)
    assert np.corrcoef(want[upper], got[upper])[0, 1] > 0.9


def test_structured_embedding_replaces_only_loc_and_seg_rows():
    rng = np.random.default_rng(1)
    table = rng.normal(0, 0.1, (2176, 64)).astype(np.float32)
    loc_ids, seg_ids = np.arange(1024, 2048), np.arange(2048, 2176)
    out = np.asarray(
        scratch_init.structured_embedding(table, loc_ids, seg_ids, rng.normal(size=(128, 16)))
    )
    np.testing.assert_array_equal(out[:1024], table[:1024])
    assert not np.allclose(out[1024:], table[1024:])
    np.testing.assert_allclose(np.sqrt(np.mean(out[1024:] ** 2)), 0.1, rtol=0.05)
    with pytest.raises(ValueError, match="outside the 2176-row table"):
        scratch_init.structured_embedding(table, loc_ids + 200, seg_ids, np.zeros((128, 16)))


def test_initial_params_apply_it_to_a_random_init_only():
    cfg = _tiny_config()
    cfg.tokenizer = str(REPO_ROOT / cfg.tokenizer)
    model, _ = experiment.build_model(cfg)
    key = jax.random.PRNGKey(0)
    cfg.model.structured_init = False
    plain = experiment.initial_params(cfg, model, key)
    cfg.model.structured_init = True
    structured = experiment.initial_params(cfg, model, key)
    tokenizer = experiment.load_tokenizer(cfg)
    before = np.asarray(plain["llm"]["embedder"]["input_embedding"])
    after = np.asarray(structured["llm"]["embedder"]["input_embedding"])
    special = np.concatenate([tokenizer.loc_ids, tokenizer.seg_ids])
    others = np.setdiff1d(np.arange(before.shape[0]), special)
    np.testing.assert_array_equal(after[others], before[others])
    sim = _cosine(after[tokenizer.loc_ids[:2]], after[tokenizer.loc_ids[:2]])
    assert sim[0, 1] > 0.95  # <loc0000> and <loc0001> start nearly equal
    posemb = np.asarray(structured["img"]["pos_embedding"])[0]  # [64, width] over an 8x8 grid
    np.testing.assert_allclose(posemb, scratch_init.sincos2d_posemb(8, posemb.shape[1])[0])
    np.testing.assert_array_equal(  # every other parameter is untouched
        np.asarray(plain["img"]["embedding"]["kernel"]),
        np.asarray(structured["img"]["embedding"]["kernel"]),
    )


def test_sincos2d_posemb_by_hand():
    table = scratch_init.sincos2d_posemb(grid=3, width=8)[0]  # omega = [1, 1e-4]
    y, x = 2, 1  # token 7 = row 2, column 1
    omega = np.array([1.0, 1e-4])
    want = np.concatenate(
        [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]
    )
    np.testing.assert_allclose(table[7], want, rtol=1e-6, atol=1e-7)
    dist = np.linalg.norm(table[:, None] - table[None], axis=-1)
    assert dist[4, 5] < dist[4, 8] and dist[4, 1] < dist[4, 2]  # neighbours are closer
