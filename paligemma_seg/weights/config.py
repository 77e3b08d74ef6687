"""Model configs for checkpoints: sizes read from tensor shapes, behaviour from the matching preset.

Turns `ModelShapes` into a `PaliGemmaConfig` (soft-caps, window and query scaling come from the
preset whose sizes match, else from the tiny preset of the same PaliGemma version), names the preset
a checkpoint fits, and writes the Hugging Face `config.json` for an exported model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from paligemma_seg.model.config import PRESETS, TEST_PRESETS, PaliGemmaConfig, get_preset
from paligemma_seg.weights.spec import ModelShapes, WeightsError, check_shapes, expected_shapes

_HF_MAX_POSITIONS = 8192
_HF_DEFAULT_WINDOW = (
    4096  # written when our window is off; layer_types then make every layer global
)
_BOS, _EOS, _PAD = 2, 1, 0


# ModelShapes field -> the config field it equals, per tower (one table, read both ways).
_VISION_FIELDS = {
    "patch_size": "patch_size",
    "vision_width": "width",
    "vision_depth": "depth",
    "vision_mlp": "mlp_dim",
    "vision_heads": "num_heads",
}
_LLM_FIELDS = {
    "width": "width",
    "depth": "depth",
    "mlp": "mlp_dim",
    "num_heads": "num_heads",
    "num_kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
}


def shapes_from_config(config: PaliGemmaConfig) -> ModelShapes:
    """The parameter sizes a config implies."""
    vision, llm = config.vision, config.llm
    return ModelShapes(
        **{shape: getattr(vision, field) for shape, field in _VISION_FIELDS.items()},
        **{shape: getattr(llm, field) for shape, field in _LLM_FIELDS.items()},
        num_patches=vision.num_patches,
        vision_head_dim=vision.head_dim,
        gemma2=llm.post_norms,
    )


def _llm_sizes(s: ModelShapes) -> tuple[int, ...]:
    return (s.width, s.depth, s.mlp, s.num_heads, s.num_kv_heads, s.head_dim, int(s.gemma2))


def matching_presets(s: ModelShapes, *, ignore_vocab: bool = True) -> list[str]:
    """Presets whose every size equals `s` (vocabulary rows ignored unless asked)."""
    names = []
    for name in PRESETS:
        preset = shapes_from_config(get_preset(name))
        if ignore_vocab:
            preset = dataclasses.replace(preset, vocab_size=s.vocab_size)
        if preset == s:
            names.append(name)
    return names


def describe_sizes(s: ModelShapes) -> str:
    """One line naming every size."""
    return (
        f"PaliGemma {2 if s.gemma2 else 1}; image {s.image_size}px, patch {s.patch_size}, "
        f"ViT width {s.vision_width}, depth {s.vision_depth}, mlp {s.vision_mlp}, "
        f"{s.vision_heads} heads; LLM width {s.width}, depth {s.depth}, mlp {s.mlp}, "
        f"{s.num_heads} heads, {s.num_kv_heads} KV heads, head_dim {s.head_dim}, "
        f"vocab {s.vocab_size}"
    )


def describe_fit(s: ModelShapes) -> str:
    """Which preset the sizes `s` fit, for error messages."""
    names = matching_presets(s)
    if names:
        return f"The checkpoint's sizes fit preset {' / '.join(names)}."
    return f"No preset has the checkpoint's sizes ({describe_sizes(s)})."


def check_fits(found: ModelShapes, config: PaliGemmaConfig, source: str) -> None:
    """Raise a WeightsError (per-key table + the preset that would fit) if `config` differs."""
    wanted = shapes_from_config(config)
    if wanted == found:
        return
    if wanted.gemma2 != found.gemma2:
        versions = {False: "PaliGemma 1 (no post-norms)", True: "PaliGemma 2 (post-norms)"}
        raise WeightsError(
            f"{source} is {versions[found.gemma2]} but the config asks for "
            f"{versions[wanted.gemma2]}. " + describe_fit(found)
        )
    check_shapes(expected_shapes(found), source, expected=wanted, describe_fit=describe_fit)


def _behaviour_preset(s: ModelShapes, compat: str) -> PaliGemmaConfig:
    """The preset whose LLM sizes match (same image size preferred), else the family's behaviour.

    Sizes that match no preset get Gemma 1's or Gemma 2's published behaviour (the 3B presets':
    query scale head_dim**-0.5, attention soft-cap 50 for Gemma 2, `compat`'s window and final
    cap), never a test preset's.
    """
    candidates = [
        n
        for n in PRESETS
        if n not in TEST_PRESETS and _llm_sizes(shapes_from_config(get_preset(n))) == _llm_sizes(s)
    ]
    same_image = [n for n in candidates if get_preset(n).vision.image_size == s.image_size]
    if same_image or candidates:
        return get_preset((same_image or candidates)[0], compat=compat)
    return get_preset("pg2-3b-224" if s.gemma2 else "pg1-3b-224", compat=compat)


def config_from_shapes(s: ModelShapes, *, compat: str = "big_vision") -> PaliGemmaConfig:
    """A config of sizes `s` with the behaviour (caps, window, scaling) of the matching preset."""
    base = _behaviour_preset(s, compat)
    vision = {field: getattr(s, shape) for shape, field in _VISION_FIELDS.items()}
    vision["image_size"] = s.image_size
    llm = {field: getattr(s, shape) for shape, field in _LLM_FIELDS.items()}
    return base.replace(vision=vision, llm=llm)


# transformers' defaults for config.json fields a file may leave out (Gemma2Config, GemmaConfig).
_GEMMA2_DEFAULTS = {
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
    "query_pre_attn_scalar": 256,
}


def _rope_base(text: dict[str, Any]) -> float:
    """rope_parameters.rope_theta (transformers 5.x, which wins there) or rope_theta (4.x)."""
    parameters = text.get("rope_parameters") or {}
    return float(parameters.get("rope_theta") or text.get("rope_theta") or 10_000.0)


def _window(text: dict[str, Any], depth: int, source: str) -> int | None:
    """The sliding window of a Gemma 2 text config: None when every layer is global.

    Our model (like transformers' Gemma 2) puts the window on even layers; `layer_types`, when
    the file has it, must say that or 'full_attention' everywhere.
    """
    window = text.get("sliding_window", _GEMMA2_DEFAULTS["sliding_window"])
    types = text.get("layer_types")
    if types is None:
        return int(window) if window else None
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(depth)]
    if list(types) == ["full_attention"] * depth or not window:
        return None
    if list(types) == alternating:
        return int(window)
    raise WeightsError(
        f"{source}: text_config.layer_types={list(types)} is not supported; the model puts the "
        "sliding window on layers 0, 2, 4, ... ('sliding_attention' there, 'full_attention' on "
        "odd layers) or on none."
    )


def config_from_hf(
    hf_config: dict[str, Any], s: ModelShapes, source: str = "config.json"
) -> PaliGemmaConfig:
    """The config of an HF checkpoint: sizes `s` from its tensors, behaviour from its config.json.

    Read from `text_config`: rms_norm_eps, rope_theta, and for Gemma 2 attn_logit_softcapping,
    final_logit_softcapping, sliding_window (+ layer_types) and query_pre_attn_scalar; from
    `vision_config`: layer_norm_eps. Fields the file leaves out take transformers' defaults.
    """
    text = dict(hf_config.get("text_config") or {})
    vision = dict(hf_config.get("vision_config") or {})
    config = config_from_shapes(s)
    llm: dict[str, Any] = {
        "norm_eps": float(text.get("rms_norm_eps", 1e-6)),
        "rope_base": _rope_base(text),
        "attn_logits_softcap": None,
        "final_logits_softcap": None,
        "sliding_window": None,
        "query_pre_attn_scalar": None,
    }
    if s.gemma2:
        get = lambda key: text.get(key, _GEMMA2_DEFAULTS[key])
        scalar = get("query_pre_attn_scalar")
        llm.update(
            attn_logits_softcap=float(get("attn_logit_softcapping") or 0) or None,
            final_logits_softcap=float(get("final_logit_softcapping") or 0) or None,
            sliding_window=_window(text, s.depth, source),
            query_pre_attn_scalar=None if scalar in (None, s.head_dim) else float(scalar),
        )
    vision_eps = float(vision.get("layer_norm_eps", 1e-6))
    return config.replace(llm=llm, vision={"norm_eps": vision_eps})


def _number(value: float) -> int | float:
    """transformers' strict configs want ints where the value is integral (e.g. 144.0 -> 144)."""
    return int(value) if float(value).is_integer() else float(value)


def _hf_text_config(config: PaliGemmaConfig, dtype: str) -> dict[str, Any]:
    llm = config.llm
    text = {
        "model_type": "gemma2" if llm.post_norms else "gemma",
        "hidden_size": llm.width,
        "intermediate_size": llm.mlp_dim,
        "num_hidden_layers": llm.depth,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "head_dim": llm.head_dim,
        "vocab_size": llm.vocab_size,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": llm.norm_eps,
        "rope_theta": llm.rope_base,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": llm.rope_base},  # 5.x
        "max_position_embeddings": _HF_MAX_POSITIONS,
        "num_image_tokens": config.vision.num_patches,
        **_shared_fields(dtype),
    }
    if llm.post_norms:
        text.update(
            query_pre_attn_scalar=_number(llm.query_pre_attn_scalar or llm.head_dim),
            attn_logit_softcapping=llm.attn_logits_softcap or None,
            final_logit_softcapping=llm.final_logits_softcap or None,
            sliding_window=llm.sliding_window or _HF_DEFAULT_WINDOW,
            layer_types=[
                "sliding_attention" if llm.is_sliding(i) else "full_attention"
                for i in range(llm.depth)
            ],
            cache_implementation="hybrid",
        )
    return text


def _shared_fields(dtype: str) -> dict[str, Any]:
    """Fields that config.json repeats at the top level and in `text_config`."""
    return {
        "bos_token_id": _BOS,
        "eos_token_id": _EOS,
        "pad_token_id": _PAD,
        "tie_word_embeddings": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def _hf_vision_config(config: PaliGemmaConfig) -> dict[str, Any]:
    vision = config.vision
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": vision.width,
        "intermediate_size": vision.mlp_dim,
        "num_hidden_layers": vision.depth,
        "num_attention_heads": vision.num_heads,
        "patch_size": vision.patch_size,
        "image_size": vision.image_size,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": vision.norm_eps,
        "vision_use_head": False,
        "projection_dim": config.llm.width,
        "num_image_tokens": vision.num_patches,
    }


def hf_config_json(
    config: PaliGemmaConfig, dtype: str, *, image_token_index: int | None = None
) -> dict[str, Any]:
    """`config.json` for `PaliGemmaForConditionalGeneration.from_pretrained`.

    `image_token_index` defaults to the vocabulary size, the first id past the vocabulary (257,152
    for the released models, as on the hub); transformers swaps it for 0 before the lookup.
    """
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "text_config": _hf_text_config(config, dtype),
        "vision_config": _hf_vision_config(config),
        "projection_dim": config.llm.width,
        "hidden_size": config.llm.width,
        "vocab_size": config.llm.vocab_size,
        "image_token_index": config.llm.vocab_size
        if image_token_index is None
        else image_token_index,
        **_shared_fields(dtype),
    }


def hf_generation_config() -> dict[str, Any]:
    """`generation_config.json`: PaliGemma's special token ids."""
    return {"bos_token_id": _BOS, "eos_token_id": _EOS, "pad_token_id": _PAD}
