"""PaliGemma 1 3B pt-224 fine-tuned to segment water (the seed's recipe).

Only `llm/layers/attn` trains, plain SGD at lr 0.003, batch 8, 128 text tokens, bf16 compute
with f32 master copies of the trained weights; frozen weights are stored in bf16. The loss is
averaged per example, then over the batch (`loss.normalize='example'`, as big_vision). Needs, under
checkpoints/ (see the README, "With real weights", or run `python scripts/download_weights.py`):
paligemma-3b-pt-224.npz, paligemma_tokenizer.model and vae-oid.npz.

    python -m paligemma_seg.train --config configs/water_224.py --workdir runs/water_224
"""

from __future__ import annotations

import pathlib

import ml_collections

from paligemma_seg import config_files


def get_config() -> ml_collections.ConfigDict:
    """PG1 3B @224 on the shared water set; see the module docstring."""
    c = config_files.load(pathlib.Path(__file__).with_name("base.py"))
    c.workdir = "runs/water_224"
    c.init = "checkpoints/paligemma-3b-pt-224.npz"
    c.model.preset = "pg1-3b-224"
    # Fits a 16 GB GPU: scripts/memory_plan.py gives ~11 GiB per device with remat, ~28 without.
    c.model.overrides.remat = True
    c.tokenizer = "checkpoints/paligemma_tokenizer.model"
    c.codec.vqvae = "checkpoints/vae-oid.npz"
    c.data.jsonl_dir = "data/water_jsonl_vaeoid"  # Suffixes hold vae-oid codes.
    c.data.resize = 224  # Small PNGs at the model resolution: no full-size JPEG decode per step.
    c.optim.name = "sgd"
    c.optim.lr = 0.003
    c.optim.trainable = "attn"
    c.batch_size = 8
    c.loss.normalize = "example"  # big_vision's: each example's mean, then the batch mean.
    c.seq_len = 128
    return c
