"""Tiny transformers PaliGemma 1/2 models with random weights (the numerical oracle), and their inputs.

`save_tiny_hf(path, version)` writes a `save_pretrained` directory; `our_tiny_config(version)` is the
matching PaliGemmaConfig (transformers compat); `make_batch` / `hf_inputs` give the same prefix-LM
batch in both conventions. `published_hf_config(name)` holds the hub config.json numbers of full-size
models for meta-device shape checks. Imports torch and transformers: only tests use this module.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch
import transformers

from paligemma_seg.model.config import GemmaConfig, PaliGemmaConfig, SiglipConfig
from paligemma_seg.model.paligemma import PaliGemma

TINY_VOCAB = 300
IMAGE_SIZE = 42  # 3 x 3 patches of 14 px: 9 image tokens.
PATCH_SIZE = 14
WINDOW = 8  # PaliGemma 2 sliding window, shorter than every test sequence.
# Soft-caps small enough that tanh is far from linear on these logits, so a missing cap shows.
ATTN_SOFTCAP = 5.0
FINAL_SOFTCAP = 4.0

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def hf_tiny_config(version: int) -> transformers.PaliGemmaConfig:
    """PaliGemma (version=1, Gemma) or PaliGemma 2 (Gemma 2, window, both soft-caps) tiny config."""
    text: dict[str, Any] = dict(
        model_type="gemma" if version == 1 else "gemma2",
        vocab_size=TINY_VOCAB,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        **_TEXT,
    )
    if version == 2:
        text.update(
            query_pre_attn_scalar=_TEXT["head_dim"],
            sliding_window=WINDOW,
            attn_logit_softcapping=ATTN_SOFTCAP,
            final_logit_softcapping=FINAL_SOFTCAP,
        )
    vision = dict(
        model_type="siglip_vision_model",
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        **_VISION,
    )
    return transformers.PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=TINY_VOCAB,  # Outside the vocabulary, so generated ids never collide.
        projection_dim=_TEXT["hidden_size"],
        hidden_size=_TEXT["hidden_size"],
        vocab_size=TINY_VOCAB,
        attn_implementation="eager",
    )


def our_tiny_config(version: int, **overrides: Any) -> PaliGemmaConfig:
    """Our config for the same architecture as `hf_tiny_config(version)` (transformers compat)."""
    llm = GemmaConfig(
        width=_TEXT["hidden_size"],
        depth=_TEXT["num_hidden_layers"],
        mlp_dim=_TEXT["intermediate_size"],
        num_heads=_TEXT["num_attention_heads"],
        num_kv_heads=_TEXT["num_key_value_heads"],
        head_dim=_TEXT["head_dim"],
        vocab_size=TINY_VOCAB,
    )
    if version == 2:
        llm = dataclasses.replace(
            llm,
            post_norms=True,
            attn_logits_softcap=ATTN_SOFTCAP,
            final_logits_softcap=FINAL_SOFTCAP,
            sliding_window=WINDOW,
        )
    vision = SiglipConfig(
        width=_VISION["hidden_size"],
        depth=_VISION["num_hidden_layers"],
        mlp_dim=_VISION["intermediate_size"],
        num_heads=_VISION["num_attention_heads"],
        patch_size=PATCH_SIZE,
        image_size=IMAGE_SIZE,
    )
    return PaliGemmaConfig(vision=vision, llm=llm).replace(**overrides)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace transformers' init (0.02 std, zero biases and norms) by weights that move the output.

    Matrices get std 1/sqrt(fan_in), so activations stay O(1); norm scales and biases get noise, so
    a wrong `1 + scale`, a dropped bias or a swapped norm changes the logits.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if "embed_tokens" in name or "position_embedding" in name:
            scale = 0.5 if "position" in name else 1.0 / param.shape[-1] ** 0.5
        elif param.ndim >= 2:
            scale = 1.0 / np.sqrt(np.prod(param.shape[1:]))
        else:
            scale = 0.2
        param.copy_(noise * scale)


def build_hf_tiny(version: int, seed: int = 0) -> transformers.PaliGemmaForConditionalGeneration:
    """Random-weight float32 PaliGemma(2) in eval mode with eager attention."""
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(hf_tiny_config(version))
    _randomize(model, seed)
    model.tie_weights()
    return model.eval()


def save_tiny_hf(path: pathlib.Path | str, version: int, seed: int = 0) -> pathlib.Path:
    """`save_pretrained` a random tiny PaliGemma (version 1 or 2) into `path` (safetensors)."""
    path = pathlib.Path(path)
    build_hf_tiny(version, seed).save_pretrained(path, safe_serialization=True)
    return path


def make_batch(
    config: PaliGemmaConfig,
    prefix_lengths: list[int],
    suffix_lengths: list[int],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A left-aligned prefix-LM batch: [prefix (mask_ar 0)] [suffix (mask_ar 1)] [padding].

    Returns numpy `image` float32[B, H, W, 3] in [-1, 1], `text`, `mask_ar`, `mask_input` int32[B, T]
    with T = max(prefix + suffix); padding has id 0, mask_ar 1, mask_input 0.
    """
    rng = np.random.default_rng(seed)
    batch = len(prefix_lengths)
    length = max(p + s for p, s in zip(prefix_lengths, suffix_lengths, strict=True))
    side = config.vision.image_size
    text = np.zeros((batch, length), np.int32)
    mask_ar = np.ones((batch, length), np.int32)
    mask_input = np.zeros((batch, length), np.int32)
    for i, (prefix, suffix) in enumerate(zip(prefix_lengths, suffix_lengths, strict=True)):
        text[i, : prefix + suffix] = rng.integers(1, config.llm.vocab_size, prefix + suffix)
        mask_ar[i, :prefix] = 0
        mask_input[i, : prefix + suffix] = 1
    image = rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)
    return dict(image=image, text=text, mask_ar=mask_ar, mask_input=mask_input)


def hf_inputs(batch: dict[str, np.ndarray], num_image_tokens: int) -> dict[str, torch.Tensor]:
    """The same batch for transformers: image placeholder ids first, token_type_ids 0 on the prefix."""
    size = batch["text"].shape[0]
    image_ids = np.full((size, num_image_tokens), TINY_VOCAB, np.int64)
    ones = np.ones((size, num_image_tokens), np.int64)
    token_type = np.where(batch["mask_ar"] == 0, 0, 1) * batch["mask_input"]
    # Padding is type 1 (outside the bidirectional block) and masked out by attention_mask.
    token_type = np.where(batch["mask_input"] == 1, token_type, 1)
    return dict(
        input_ids=torch.from_numpy(np.concatenate([image_ids, batch["text"]], 1)),
        attention_mask=torch.from_numpy(np.concatenate([ones, batch["mask_input"]], 1)),
        token_type_ids=torch.from_numpy(np.concatenate([0 * ones, token_type], 1)),
        pixel_values=torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()),
    )


# Hub config.json numbers of released checkpoints (google/paligemma-3b-pt-224, paligemma2-*-pt-224).
_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    vision_use_head=False,
)
_PUBLISHED_TEXT = {
    "pg1-3b-224": dict(
        model_type="gemma",
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
    ),
    "pg2-3b-224": dict(
        model_type="gemma2",
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "pg2-10b-224": dict(
        model_type="gemma2",
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
}
HUB_VOCAB = 257_216  # The hub pads the 257,152-row embedding to a multiple of 64.


def published_hf_config(name: str) -> transformers.PaliGemmaConfig:
    """The hub config of a released full-size PaliGemma (keys of `_PUBLISHED_TEXT`)."""
    text = dict(_PUBLISHED_TEXT[name], vocab_size=HUB_VOCAB)
    width = text["hidden_size"]
    return transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", **_SO400M),
        text_config=text,
        image_token_index=257_152,
        projection_dim=width,
        hidden_size=width,
        vocab_size=HUB_VOCAB,
    )


@functools.cache
def meta_hf_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of a full-size transformers PaliGemma built on the meta device.

    Tied weights appear once (the lm_head shares the embedding).
    """
    with torch.device("meta"):
        model = transformers.PaliGemmaForConditionalGeneration(published_hf_config(name))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@functools.cache
def jitted_forward(config: PaliGemmaConfig) -> Callable[..., jax.Array]:
    """jit(model.apply) for `config`, cached so tests of one config compile once per input shape."""
    model = PaliGemma(config)
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args))
