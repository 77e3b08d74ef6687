"""The smallest model that runs every path of `configs/water_tiny.py`: for tests, CI's smoke test
and debugging, not for results.

water_tiny with SigLIP at 28 px (4 image tokens), width 32, 1 layer, 2 heads, and Gemma width 32,
2 layers, 2 heads, 1 KV head of 16; everything else (tokenizer, codec, data, optimizer) as
water_tiny. A few steps take seconds on a CPU:

    python -m paligemma_seg.train --config configs/water_micro.py --config.total_steps=6 \\
        --workdir runs/water_micro
"""

from __future__ import annotations

import pathlib

import ml_collections

from paligemma_seg import config_files


def get_config() -> ml_collections.ConfigDict:
    """water_tiny with the micro model; see the module docstring."""
    c = config_files.load(pathlib.Path(__file__).with_name("water_tiny.py"))
    c.workdir = "runs/water_micro"
    vision, llm = c.model.overrides.vision, c.model.overrides.llm
    vision.image_size, vision.width, vision.depth, vision.mlp_dim, vision.num_heads = (
        28,
        32,
        1,
        64,
        2,
    )
    llm.width, llm.depth, llm.mlp_dim = 32, 2, 64
    llm.num_heads, llm.num_kv_heads, llm.head_dim = 2, 1, 16
    return c
