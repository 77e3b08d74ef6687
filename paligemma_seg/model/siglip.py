"""SigLIP ViT image encoder as PaliGemma uses it: patch tokens projected to the LLM width.

Owns the `img/...` half of the parameter tree (big_vision `models/vit.py` names, blocks stacked on
axis 0). Einsum letters: B batch, Y/X patch-grid row/column, p/q/c pixel row/column/channel in a
patch, T query tokens, S key tokens, N heads, H head dim, W encoder width, M MLP hidden, D LLM
width. dtype policy: see `layers.py`; attention logits and softmax in float32. Attention runs in
`layers.dot_product_attention` (cuDNN flash attention on CUDA GPUs in bf16, XLA elsewhere): no
mask, no soft-cap.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from paligemma_seg.model import layers
from paligemma_seg.model.config import SiglipConfig


class MlpBlock(nn.Module):
    """Dense -> gelu(tanh) -> Dense."""

    config: SiglipConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda shape, axes, name: layers.Einsum(
            shape=shape, axes=axes, param_name="kernel", bias_shape=shape[-1:],
            bias_axes=axes[-1:], init=nn.initializers.xavier_uniform(), name=name, **kw,
        )  # fmt: skip
        hidden = dense((cfg.width, cfg.mlp_dim), ("embed", "mlp"), "Dense_0")("BTW,WM->BTM", x)
        hidden = layers.constrain(jax.nn.gelu(hidden, approximate=True), ("batch", "length", "mlp"))
        return dense((cfg.mlp_dim, cfg.width), ("mlp", "embed"), "Dense_1")("BTM,MW->BTW", hidden)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biases, no mask (flax MultiHeadDotProductAttention names)."""

    config: SiglipConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.head_dim
        proj = lambda name: layers.Einsum(
            shape=(cfg.width, heads, head_dim), axes=("embed", "heads", "head_dim"),
            param_name="kernel", bias_shape=(heads, head_dim), bias_axes=("heads", "head_dim"),
            init=nn.initializers.xavier_uniform(), dtype=self.dtype, param_dtype=self.param_dtype,
            name=name,
        )  # fmt: skip
        axes = ("batch", "length", "heads", "head_dim")  # Alike: cuDNN's partitioner wants that.
        q, k, v = (
            layers.constrain(proj(n)("BTW,WNH->BTNH", x), axes) for n in ("query", "key", "value")
        )
        encoded = layers.dot_product_attention(q, k, v, scale=head_dim**-0.5)
        out = layers.Einsum(
            shape=(heads, head_dim, cfg.width), axes=("heads", "head_dim", "embed"),
            param_name="kernel", bias_shape=(cfg.width,), bias_axes=("embed",),
            init=nn.initializers.xavier_uniform(), dtype=self.dtype, param_dtype=self.param_dtype,
            name="out",
        )  # fmt: skip
        return out("BTNH,NHW->BTW", encoded)


class EncoderBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then + mlp(LN(x)). Scanned: returns (x, None)."""

    config: SiglipConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, unused: None) -> tuple[jax.Array, None]:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        norm_kw = dict(eps=self.config.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.constrain(x, layers.ACTIVATION)
        x = x + SelfAttention(**kw, name="MultiHeadDotProductAttention_0")(
            layers.LayerNorm(**norm_kw, name="LayerNorm_0")(x)
        )
        x = x + MlpBlock(**kw, name="MlpBlock_0")(
            layers.LayerNorm(**norm_kw, name="LayerNorm_1")(x)
        )
        return layers.constrain(x, layers.ACTIVATION), None


class Encoder(nn.Module):
    """Stacked blocks (`encoderblock`, depth on axis 0) and the final `encoder_norm`."""

    config: SiglipConfig
    dtype: Any
    param_dtype: Any
    remat: bool = False
    scan_layers: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        blocks = layers.scan_blocks(
            EncoderBlock,
            length=self.config.depth,
            remat=self.remat,
            scan_layers=self.scan_layers,
            in_axes=nn.broadcast,
        )
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x, _ = blocks(**kw, name="encoderblock")(x, None)
        return layers.LayerNorm(
            eps=self.config.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            name="encoder_norm",
        )(x)  # fmt: skip


class SiglipEncoder(nn.Module):
    """Image -> one LLM-width token per patch, row-major over the patch grid."""

    config: SiglipConfig
    out_width: int  # D: width of the LLM the tokens are fed to (`head` projects W -> D).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = True

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        """image: float32[B, H, W, 3] in [-1, 1] -> tokens `dtype`[B, N, D], N = (H/P) * (W/P)."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = image.shape
        if (height, width) != (cfg.image_size, cfg.image_size) or channels != 3:
            raise ValueError(
                f"image shape {image.shape[1:]} does not match the model's "
                f"({cfg.image_size}, {cfg.image_size}, 3); resize the images or set "
                "vision.image_size."
            )
        grid, patch = cfg.image_size // cfg.patch_size, cfg.patch_size
        # [B, Y, p, X, q, c] -> [B, Y, X, p, q, c]: a VALID stride-P convolution as one einsum.
        patches = image.reshape(batch, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
        embedding = layers.Einsum(
            shape=(patch, patch, 3, cfg.width), axes=(None, None, None, "embed"),
            param_name="kernel", bias_shape=(cfg.width,), bias_axes=("embed",),
            name="embedding", **kw,
        )  # fmt: skip
        x = embedding("BYXpqc,pqcW->BYXW", patches).reshape(batch, grid * grid, cfg.width)
        pos_embedding = layers.make_param(
            self, "pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(cfg.width)),
            (1, grid * grid, cfg.width), (None, None, "embed"), self.param_dtype,
        )  # fmt: skip
        x = x + pos_embedding.astype(self.dtype)
        x = Encoder(cfg, remat=self.remat, scan_layers=self.scan_layers, name="Transformer", **kw)(
            x
        )
        # Projection to the LLM width; ("embed", "mlp") as for an MLP up-projection.
        head = layers.Einsum(
            shape=(cfg.width, self.out_width), axes=("embed", "mlp"), param_name="kernel",
            bias_shape=(self.out_width,), bias_axes=("mlp",), name="head", **kw,
        )  # fmt: skip
        return layers.constrain(head("BTW,WD->BTD", x), layers.ACTIVATION)
