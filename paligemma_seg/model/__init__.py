"""PaliGemma 1/2 in Flax Linen: configs, the model, its parameter tree and KV-cache decoding steps.

Public names for other packages; `load` reads weight files through `paligemma_seg.weights`.
"""

from __future__ import annotations

from typing import Any

from paligemma_seg.model.config import (
    COMPATS,
    PRESETS,
    GemmaConfig,
    PaliGemmaConfig,
    SiglipConfig,
    get_preset,
    tiny_config,
)
from paligemma_seg.model.paligemma import (
    KVCache,
    PaliGemma,
    init_params,
    logical_axes,
    make_attn_mask,
    param_shapes,
)


def load(path: str, **overrides: Any) -> tuple[PaliGemma, dict[str, Any]]:
    """(model, params) from a big_vision .npz or a Hugging Face directory; see `weights.load`."""
    from paligemma_seg import weights  # Imported here: weights.py imports this package.

    return weights.load(path, **overrides)


__all__ = [
    "COMPATS",
    "PRESETS",
    "GemmaConfig",
    "KVCache",
    "PaliGemma",
    "PaliGemmaConfig",
    "SiglipConfig",
    "get_preset",
    "init_params",
    "load",
    "logical_axes",
    "make_attn_mask",
    "param_shapes",
    "tiny_config",
]
