"""The Hugging Face <-> big_vision mapping table for PaliGemma: key names, layouts and shapes.

Owns the key mapping (every HF key style seen in the wild, normalised to the hub style) and the
layout changes (torch Linear [out, in], per-head splits, the patch conv, the position table). The
conversion itself is `hf_convert.py`; safetensors files are `safetensors.py`.

Vocabulary rule: hub checkpoints pad the embedding from 257,152 to 257,216 rows; the padding rows
are dropped on load (or pass `vocab_size=` to keep that many rows). Export writes the tree's rows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from paligemma_seg.weights.spec import (
    LLM_LAYERS,
    VIT_BLOCK,
    ModelShapes,
    WeightsError,
    expected_shapes,
    key_set_message,
    unit_shapes,
)

PALIGEMMA_VOCAB = 257_152  # 256,000 Gemma pieces + 1024 <loc> + 128 <seg>
HUB_PADDED_VOCAB = 257_216  # the hub's embedding rows (padded to a multiple of 64)

VISION = "vision_tower.vision_model."
TEXT = "language_model.model."
PROJECTOR = "multi_modal_projector."
LM_HEAD = "lm_head.weight"

# Every prefix seen in PaliGemma checkpoints -> the hub prefix used here; first match wins.
#   hub files:                     vision_tower.vision_model.*, language_model.model.*
#   transformers 4.5x in memory:   model.vision_tower.vision_model.*, model.language_model.*
#   transformers 5.x save_pretrained: vision_tower.*, language_model.model.*
#   transformers 5.x in memory:    model.vision_tower.*, model.language_model.*, lm_head.weight
_PREFIXES = (
    ("model.vision_tower.vision_model.", VISION),
    ("vision_tower.vision_model.", VISION),
    ("model.vision_tower.", VISION),
    ("vision_tower.", VISION),
    ("language_model.model.", TEXT),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", TEXT),
    ("model.multi_modal_projector.", PROJECTOR),
    ("multi_modal_projector.", PROJECTOR),
    ("lm_head.", "lm_head."),
)


class Transform(NamedTuple):
    """One layout change, both ways; array methods only, so it also traces under jax.eval_shape."""

    to_ours: Callable[[Any, ModelShapes], Any]
    to_hf: Callable[[Any, ModelShapes], Any]


SAME = Transform(lambda x, s: x, lambda x, s: x)
LINEAR = Transform(lambda x, s: x.T, lambda x, s: x.T)  # torch [out, in] <-> [in, out]
# Gemma q/k/v: [heads*H, D] <-> [heads, D, H].
TEXT_QKV = Transform(
    lambda x, s: x.reshape(-1, s.head_dim, s.width).transpose(0, 2, 1),
    lambda x, s: x.transpose(0, 2, 1).reshape(-1, s.width),
)
# Gemma o_proj: [D, N*H] <-> [N, H, D].
TEXT_OUT = Transform(
    lambda x, s: x.T.reshape(-1, s.head_dim, s.width),
    lambda x, s: x.reshape(-1, s.width).T,
)
# SigLIP q/k/v kernel: [heads*hd, W] <-> [W, heads, hd]; bias [heads*hd] <-> [heads, hd].
VIT_QKV = Transform(
    lambda x, s: x.T.reshape(s.vision_width, s.vision_heads, s.vision_head_dim),
    lambda x, s: x.reshape(s.vision_width, -1).T,
)
VIT_QKV_BIAS = Transform(
    lambda x, s: x.reshape(s.vision_heads, s.vision_head_dim),
    lambda x, s: x.reshape(-1),
)
# SigLIP out_proj: [W, heads*hd] <-> [heads, hd, W].
VIT_OUT = Transform(
    lambda x, s: x.T.reshape(s.vision_heads, s.vision_head_dim, s.vision_width),
    lambda x, s: x.reshape(-1, s.vision_width).T,
)
PATCH_CONV = Transform(  # torch Conv2d [out, in, kh, kw] <-> flax [kh, kw, in, out]
    lambda x, s: x.transpose(2, 3, 1, 0),
    lambda x, s: x.transpose(3, 2, 0, 1),
)
POSITIONS = Transform(lambda x, s: x[None], lambda x, s: x[0])  # [N, W] <-> [1, N, W]

# (HF name, our name, transform) outside the layer stacks.
GLOBALS = (
    (VISION + "embeddings.patch_embedding.weight", "img/embedding/kernel", PATCH_CONV),
    (VISION + "embeddings.patch_embedding.bias", "img/embedding/bias", SAME),
    (VISION + "embeddings.position_embedding.weight", "img/pos_embedding", POSITIONS),
    (VISION + "post_layernorm.weight", "img/Transformer/encoder_norm/scale", SAME),
    (VISION + "post_layernorm.bias", "img/Transformer/encoder_norm/bias", SAME),
    (PROJECTOR + "linear.weight", "img/head/kernel", LINEAR),
    (PROJECTOR + "linear.bias", "img/head/bias", SAME),
    (TEXT + "embed_tokens.weight", "llm/embedder/input_embedding", SAME),
    (TEXT + "norm.weight", "llm/final_norm/scale", SAME),
)

_VIT_ATTN = "MultiHeadDotProductAttention_0/"
# (HF name in layer i, our name in the stack, slot on axis 1 or None, transform); layers on axis 0.
_VISION_LAYER = (
    ("layer_norm1.weight", "LayerNorm_0/scale", None, SAME),
    ("layer_norm1.bias", "LayerNorm_0/bias", None, SAME),
    ("layer_norm2.weight", "LayerNorm_1/scale", None, SAME),
    ("layer_norm2.bias", "LayerNorm_1/bias", None, SAME),
    ("self_attn.q_proj.weight", _VIT_ATTN + "query/kernel", None, VIT_QKV),
    ("self_attn.q_proj.bias", _VIT_ATTN + "query/bias", None, VIT_QKV_BIAS),
    ("self_attn.k_proj.weight", _VIT_ATTN + "key/kernel", None, VIT_QKV),
    ("self_attn.k_proj.bias", _VIT_ATTN + "key/bias", None, VIT_QKV_BIAS),
    ("self_attn.v_proj.weight", _VIT_ATTN + "value/kernel", None, VIT_QKV),
    ("self_attn.v_proj.bias", _VIT_ATTN + "value/bias", None, VIT_QKV_BIAS),
    ("self_attn.out_proj.weight", _VIT_ATTN + "out/kernel", None, VIT_OUT),
    ("self_attn.out_proj.bias", _VIT_ATTN + "out/bias", None, SAME),
    ("mlp.fc1.weight", "MlpBlock_0/Dense_0/kernel", None, LINEAR),
    ("mlp.fc1.bias", "MlpBlock_0/Dense_0/bias", None, SAME),
    ("mlp.fc2.weight", "MlpBlock_0/Dense_1/kernel", None, LINEAR),
    ("mlp.fc2.bias", "MlpBlock_0/Dense_1/bias", None, SAME),
)
_TEXT_QKV_SEPARATE = (
    ("self_attn.q_proj.weight", "attn/q_einsum/w", None, TEXT_QKV),
    ("self_attn.k_proj.weight", "attn/kv_einsum/w", 0, TEXT_QKV),
    ("self_attn.v_proj.weight", "attn/kv_einsum/w", 1, TEXT_QKV),
)
_TEXT_QKV_FUSED = (  # K == N: big_vision's qkv_einsum [L, 3, N, D, H].
    ("self_attn.q_proj.weight", "attn/qkv_einsum/w", 0, TEXT_QKV),
    ("self_attn.k_proj.weight", "attn/qkv_einsum/w", 1, TEXT_QKV),
    ("self_attn.v_proj.weight", "attn/qkv_einsum/w", 2, TEXT_QKV),
)
_TEXT_LAYER = (
    ("self_attn.o_proj.weight", "attn/attn_vec_einsum/w", None, TEXT_OUT),
    ("mlp.gate_proj.weight", "mlp/gating_einsum", 0, LINEAR),  # gelu branch
    ("mlp.up_proj.weight", "mlp/gating_einsum", 1, LINEAR),
    ("mlp.down_proj.weight", "mlp/linear", None, LINEAR),
    ("input_layernorm.weight", "pre_attention_norm/scale", None, SAME),
)
# HF's `post_attention_layernorm` is Gemma 1's pre-MLP norm but Gemma 2's post-attention norm.
_TEXT_NORMS_GEMMA1 = (("post_attention_layernorm.weight", "pre_ffw_norm/scale", None, SAME),)
_TEXT_NORMS_GEMMA2 = (
    ("post_attention_layernorm.weight", "post_attention_norm/scale", None, SAME),
    ("pre_feedforward_layernorm.weight", "pre_ffw_norm/scale", None, SAME),
    ("post_feedforward_layernorm.weight", "post_ffw_norm/scale", None, SAME),
)


class Stack(NamedTuple):
    """One stacked parameter: our key and, per slot, the HF name template ({i}: layer)."""

    key: str
    depth: int
    parts: tuple[tuple[int | None, str, Transform], ...]


def stacks(s: ModelShapes) -> list[Stack]:
    """Group the per-layer table rows by our key."""
    text_rows = (
        (_TEXT_QKV_FUSED if s.fused_qkv else _TEXT_QKV_SEPARATE)
        + _TEXT_LAYER
        + (_TEXT_NORMS_GEMMA2 if s.gemma2 else _TEXT_NORMS_GEMMA1)
    )
    groups: dict[str, list] = {}
    depths: dict[str, int] = {}
    for prefix_hf, prefix_ours, depth, rows in (
        (VISION + "encoder.layers.{i}.", VIT_BLOCK, s.vision_depth, _VISION_LAYER),
        (TEXT + "layers.{i}.", LLM_LAYERS, s.depth, text_rows),
    ):
        for name_hf, name_ours, slot, transform in rows:
            groups.setdefault(prefix_ours + name_ours, []).append(
                (slot, prefix_hf + name_hf, transform)
            )
            depths[prefix_ours + name_ours] = depth
    return [Stack(k, depths[k], tuple(parts)) for k, parts in groups.items()]


def hf_names(s: ModelShapes) -> list[str]:
    """Every HF (hub-style) tensor name of a model of sizes `s` (no lm_head: it is tied)."""
    names = [name for name, _, _ in GLOBALS]
    for stack in stacks(s):
        names += [
            template.format(i=i) for i in range(stack.depth) for _, template, _ in stack.parts
        ]
    return names


def hf_shapes(s: ModelShapes) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for sizes `s`, derived from our shapes through the table (no allocation)."""
    ours = expected_shapes(s)

    def shape_of(transform: Transform, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        spec = jax.ShapeDtypeStruct(our_shape, np.float32)
        return tuple(jax.eval_shape(lambda x: transform.to_hf(x, s), spec).shape)

    shapes = {name: shape_of(t, ours[key]) for name, key, t in GLOBALS}
    for stack in stacks(s):
        layer_shape = ours[stack.key][1:]
        for slot, template, transform in stack.parts:
            part_shape = layer_shape if slot is None else layer_shape[1:]
            shape = shape_of(transform, part_shape)
            shapes.update({template.format(i=i): shape for i in range(stack.depth)})
    return shapes


def canonical_name(name: str) -> str:
    """Any known key style -> the hub style (`vision_tower.vision_model.*`, ...)."""
    for prefix, hub in _PREFIXES:
        if name.startswith(prefix):
            return hub + name[len(prefix) :]
    return name


def key_style(names: Iterator[str] | list[str]) -> str:
    """The distinct prefixes used by `names`, e.g. 'vision_tower.*, language_model.model.*'."""
    seen = []
    for name in names:
        prefix = next((p for p, _ in _PREFIXES if name.startswith(p)), None)
        if prefix and prefix + "*" not in seen:
            seen.append(prefix + "*")
    return ", ".join(seen) or "unknown"


def config_dict(hf_config: Any) -> dict[str, Any]:
    """A transformers config object or a parsed config.json -> dict."""
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    return dict(hf_config)


def _depth(config: Mapping[str, Any], names: list[str], prefix: str) -> int:
    """Layer count from the config, else from the highest layer index found."""
    if "num_hidden_layers" in config:
        return int(config["num_hidden_layers"])
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for n in names if (m := pattern.match(n))]
    return max(indices, default=-1) + 1


def check_hf_keys(names: list[str], vision_depth: int, depth: int, gemma2: bool) -> None:
    """Raise a WeightsError listing missing and unexpected hub-style names (lm_head is allowed)."""
    probe = dataclasses.replace(unit_shapes(gemma2), vision_depth=vision_depth, depth=depth)
    wanted = set(hf_names(probe))
    present = set(names) - {LM_HEAD}
    if present != wanted:
        raise WeightsError(key_set_message("HF checkpoint", wanted - present, present - wanted))


def shapes_from_hf(hf_config: Any, shapes: Mapping[str, tuple[int, ...]]) -> ModelShapes:
    """Model sizes from an HF config (heads, layers, Gemma 1/2) and hub-named tensor shapes.

    Head counts missing from the config take transformers' PaliGemma defaults (text: 8 heads, 1 KV
    head for Gemma / 4 for Gemma 2, head_dim 256; vision: 16 heads). Raises WeightsError on
    missing or unexpected names.
    """
    config = config_dict(hf_config)
    text, vision = dict(config.get("text_config") or {}), dict(config.get("vision_config") or {})
    names = list(shapes)
    gemma2 = text.get("model_type", "gemma") == "gemma2"
    vision_depth = _depth(vision, names, VISION + "encoder.layers.")
    depth = _depth(text, names, TEXT + "layers.")
    if min(vision_depth, depth) < 1:
        raise WeightsError(
            f"HF checkpoint: found {vision_depth} vision and {depth} text layers; both need >= 1"
        )
    check_hf_keys(names, vision_depth, depth, gemma2)
    vision_width, _, patch, _ = shapes[VISION + "embeddings.patch_embedding.weight"]
    vision_heads = int(vision.get("num_attention_heads", 16))
    vocab, width = shapes[TEXT + "embed_tokens.weight"]
    return ModelShapes(
        patch_size=int(patch),
        num_patches=int(shapes[VISION + "embeddings.position_embedding.weight"][0]),
        vision_width=int(vision_width),
        vision_depth=vision_depth,
        vision_mlp=int(shapes[VISION + "encoder.layers.0.mlp.fc1.weight"][0]),
        vision_heads=vision_heads,
        vision_head_dim=int(vision_width) // vision_heads,
        width=int(width),
        depth=depth,
        mlp=int(shapes[TEXT + "layers.0.mlp.gate_proj.weight"][0]),
        num_heads=int(text.get("num_attention_heads", 8)),
        num_kv_heads=int(text.get("num_key_value_heads", 4 if gemma2 else 1)),
        head_dim=int(text.get("head_dim") or 256),
        vocab_size=int(vocab),
        gemma2=gemma2,
    )
