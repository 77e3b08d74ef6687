"""PaliGemma 2 3B pt-224 (Gemma 2 2B decoder) on the water set.

big_vision behaviour (no sliding window, no final-logit soft-cap, as its PaliGemma 2 transfer
configs). Needs checkpoints/paligemma2-3b-pt-224.npz (or a Hugging Face directory: set
--config.init=DIR), paligemma_tokenizer.model and vae-oid.npz (README, "With real weights";
`python scripts/download_weights.py --model pg2-3b-224`).

    python -m paligemma_seg.train --config configs/water_pg2_224.py --workdir runs/water_pg2_224
"""

from __future__ import annotations

import pathlib

import ml_collections

from paligemma_seg import config_files


def get_config() -> ml_collections.ConfigDict:
    """PG2 3B @224; same recipe as water_224 otherwise."""
    c = config_files.load(pathlib.Path(__file__).with_name("base.py"))
    c.workdir = "runs/water_pg2_224"
    c.init = "checkpoints/paligemma2-3b-pt-224.npz"
    c.model.preset = "pg2-3b-224"
    c.model.compat = "big_vision"
    c.model.overrides.remat = True  # Without it XLA keeps ~28 GiB of activations (memory_plan.py).
    c.tokenizer = "checkpoints/paligemma_tokenizer.model"
    c.codec.vqvae = "checkpoints/vae-oid.npz"
    c.data.jsonl_dir = "data/water_jsonl_vaeoid"
    c.data.resize = 224  # Small PNGs at the model resolution: no full-size JPEG decode per step.
    c.optim.trainable = "attn"
    c.loss.normalize = "example"  # big_vision's: each example's mean, then the batch mean.
    return c
