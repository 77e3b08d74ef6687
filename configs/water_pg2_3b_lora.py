"""PaliGemma 2 3B pt-224 (Gemma 2 2B decoder) with LoRA r=16 on an int8 base.

Adapters on the LLM's attention and MLP projections (optim.lora.targets' default), every frozen
projection stored int8 (one scale per output channel), the rest of the base in bf16, bf16
compute, remat, AdamW on the adapters only. scripts/memory_plan.py --table gives its memory per
device at batch 8 (README, "Choosing what to train"). Needs checkpoints/paligemma2-3b-pt-224.npz
(or a Hugging Face directory: set --config.init=DIR), paligemma_tokenizer.model and vae-oid.npz
(`python scripts/download_weights.py --model pg2-3b-224`).

    python -m paligemma_seg.train --config configs/water_pg2_3b_lora.py \\
        --workdir runs/water_pg2_3b_lora
"""

from __future__ import annotations

import pathlib

import ml_collections

from paligemma_seg import config_files


def get_config() -> ml_collections.ConfigDict:
    """PG2 3B @224, LoRA r=16 + int8 base; see the module docstring."""
    c = config_files.load(pathlib.Path(__file__).with_name("water_pg2_224.py"))
    c.workdir = "runs/water_pg2_3b_lora"
    c.init = "checkpoints/paligemma2-3b-pt-224.npz"
    c.model.preset = "pg2-3b-224"
    c.model.overrides.dtype = "bfloat16"
    c.model.overrides.remat = True
    c.optim.trainable = "none"  # Only the adapters train.
    c.optim.frozen_dtype = "int8"
    c.optim.lora.rank = 16
    c.optim.lora.alpha = 16.0
    c.optim.lora.dropout = 0.05
    c.optim.name = "adamw"  # LoRA's usual optimizer; its state covers the adapters only.
    c.optim.lr = 2e-4
    c.optim.weight_decay = 0.0
    # The loss's logits 16 vocabulary slices at a time: no float32[B, 128, 257152] logits or
    # their gradient (train/loss.py; the same loss).
    c.loss.vocab_chunks = 16
    return c
