"""The table of the model's projection matrices: which axes of each stored weight are separate
matrices (layers, q/k/v or gate/up slots) and which are contracted with the activations.

LoRA (`lora.py`) factors each matrix over (input axes) x (output axes); int8 storage (`quant.py`)
keeps one scale per output channel (the max over the input axes). Paths are big_vision's, stacked
layers included (axis 0 = layers).
"""

from __future__ import annotations

import dataclasses
import math

_VIT = "img/Transformer/encoderblock/"
_VIT_ATTN = _VIT + "MultiHeadDotProductAttention_0/"


@dataclasses.dataclass(frozen=True)
class Projection:
    """Axes of one stored weight: `stack` leading axes index separate matrices, `inputs` are
    contracted with the activations, every other axis is an output channel."""

    stack: int
    inputs: tuple[int, ...]

    def outputs(self, ndim: int) -> tuple[int, ...]:
        return tuple(i for i in range(self.stack, ndim) if i not in self.inputs)

    def sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(in_features, out_features) of each matrix of a weight of `shape`."""
        fan_in = math.prod(shape[i] for i in self.inputs)
        return fan_in, math.prod(shape[i] for i in self.outputs(len(shape)))


PROJECTIONS: dict[str, Projection] = {
    "llm/layers/attn/q_einsum/w": Projection(1, (2,)),  # [L, N, D, H]
    "llm/layers/attn/kv_einsum/w": Projection(2, (3,)),  # [L, 2, K, D, H]
    "llm/layers/attn/qkv_einsum/w": Projection(2, (3,)),  # [L, 3, N, D, H]
    "llm/layers/attn/attn_vec_einsum/w": Projection(1, (1, 2)),  # [L, N, H, D]
    "llm/layers/mlp/gating_einsum": Projection(2, (2,)),  # [L, 2, D, F]: gate, up
    "llm/layers/mlp/linear": Projection(1, (1,)),  # [L, F, D]
    _VIT_ATTN + "query/kernel": Projection(1, (1,)),  # [L, W, heads, hd]
    _VIT_ATTN + "key/kernel": Projection(1, (1,)),
    _VIT_ATTN + "value/kernel": Projection(1, (1,)),
    _VIT_ATTN + "out/kernel": Projection(1, (1, 2)),  # [L, heads, hd, W]
    _VIT + "MlpBlock_0/Dense_0/kernel": Projection(1, (1,)),  # [L, W, M]
    _VIT + "MlpBlock_0/Dense_1/kernel": Projection(1, (1,)),  # [L, M, W]
    "img/head/kernel": Projection(0, (0,)),  # [W, D]
}
