"""PaliGemma 1/2 in Flax Linen: configs, the model, its parameter tree and KV-cache decoding steps.

Public names for other packages. Weight files are read by `paligemma_seg.weights` (`weights.load`),
which builds on this package; nothing here reads files or imports another part of the project.
"""

from __future__ import annotations

from paligemma_seg.model.config import (
    COMPATS,
    PRESETS,
    GemmaConfig,
    PaliGemmaConfig,
    SiglipConfig,
    get_preset,
    tiny_config,
)
from paligemma_seg.model.lora import LoraPair, LoraSettings
from paligemma_seg.model.paligemma import (
    KVCache,
    PaliGemma,
    init_params,
    logical_axes,
    make_attn_mask,
    param_shapes,
)

__all__ = [
    "COMPATS",
    "PRESETS",
    "GemmaConfig",
    "KVCache",
    "LoraPair",
    "LoraSettings",
    "PaliGemma",
    "PaliGemmaConfig",
    "SiglipConfig",
    "get_preset",
    "init_params",
    "logical_axes",
    "make_attn_mask",
    "param_shapes",
    "tiny_config",
]
