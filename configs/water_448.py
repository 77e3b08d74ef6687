"""PaliGemma 1 3B pt-448 on the water set: 1024 image tokens, so layers are rematerialised.

Needs checkpoints/paligemma-3b-pt-448.npz, paligemma_tokenizer.model and vae-oid.npz (README,
"With real weights"; `python scripts/download_weights.py --model pg1-3b-448`).

    python -m paligemma_seg.train --config configs/water_448.py --workdir runs/water_448
"""

from __future__ import annotations

import pathlib

import ml_collections

from paligemma_seg import config_files


def get_config() -> ml_collections.ConfigDict:
    """PG1 3B @448; same recipe as water_224 otherwise."""
    c = config_files.load(pathlib.Path(__file__).with_name("base.py"))
    c.workdir = "runs/water_448"
    c.init = "checkpoints/paligemma-3b-pt-448.npz"
    c.model.preset = "pg1-3b-448"
    c.model.overrides.remat = True  # 4x the image tokens of 224: save activation memory.
    c.tokenizer = "checkpoints/paligemma_tokenizer.model"
    c.codec.vqvae = "checkpoints/vae-oid.npz"
    c.data.jsonl_dir = "data/water_jsonl_vaeoid"
    c.optim.trainable = "attn"
    c.loss.normalize = "example"  # big_vision's: each example's mean, then the batch mean.
    return c
