"""Architecture configs for PaliGemma 1/2: frozen dataclasses and the table of published presets.

Owns every size and behaviour knob of the model; data, optimiser and mesh settings live in
`configs/`. `get_preset(name)` gives the published hyperparameters, `tiny_config()` test models.

`compat` picks how PaliGemma 2 (Gemma 2) behaves where big_vision and transformers differ:
  - "big_vision" (default): every layer attends globally (no sliding window) and the text logits
    are not soft-capped, as in big_vision's PaliGemma and its PaliGemma 2 transfer configs.
  - "transformers": a 4096-token sliding window on layers 0, 2, 4, ... and a final-logit soft-cap
    of 30, as in transformers' Gemma2. Both agree on greedy tokens for sequences <= 4096 tokens.
PaliGemma 1 is the same under both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Compat = Literal["big_vision", "transformers"]
COMPATS: tuple[str, ...] = ("big_vision", "transformers")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
VOCAB_SIZE = 257_152  # 256,000 Gemma pieces + 1024 <locNNNN> + 128 <segNNN>.


def _check_dtype(owner: str, key: str, value: Any) -> None:
    if value is not None and str(value) not in DTYPES:
        raise ValueError(f"{owner}.{key}={value!r} is not supported; use one of {DTYPES}.")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """SigLIP ViT encoder (big_vision `vit.py`, pool_type='none', learned position embedding)."""

    width: int = 1152  # W: token width.
    depth: int = 27  # Number of encoder blocks.
    mlp_dim: int = 4304  # Hidden size of each block's MLP.
    num_heads: int = 16
    patch_size: int = 14  # P: square patches, VALID stride-P convolution.
    image_size: int = 224  # Square input side in pixels; must be a multiple of patch_size.
    norm_eps: float = 1e-6  # LayerNorm epsilon.

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SiglipConfig.image_size={self.image_size} must be a multiple of "
                f"patch_size={self.patch_size}."
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"SiglipConfig.width={self.width} must be divisible by num_heads={self.num_heads}."
            )

    @property
    def num_patches(self) -> int:
        """Image tokens per image (N)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Gemma 1 / Gemma 2 decoder (big_vision `models/ppp/gemma.py`, transformers `Gemma2Model`)."""

    width: int = 2048  # D: residual width.
    depth: int = 18  # Number of decoder blocks.
    mlp_dim: int = 16_384  # F: GeGLU hidden size.
    num_heads: int = 8  # N: query heads.
    num_kv_heads: int = 1  # K: key/value heads (1 = multi-query, < N = grouped-query).
    head_dim: int = 256  # H.
    vocab_size: int = VOCAB_SIZE  # V: rows of the tied embedding.
    post_norms: bool = False  # Gemma 2: RMSNorm after attention and after the MLP too.
    attn_logits_softcap: float | None = None  # Gemma 2: 50. None or 0 = off.
    final_logits_softcap: float | None = None  # Gemma 2 (transformers): 30. None or 0 = off.
    sliding_window: int | None = None  # Window on layers 0, 2, 4, ... (transformers). None = off.
    query_pre_attn_scalar: float | None = None  # q *= scalar**-0.5; None = head_dim.
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6  # RMSNorm epsilon.

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"GemmaConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"GemmaConfig.head_dim={self.head_dim} must be even for RoPE.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"GemmaConfig.sliding_window={self.sliding_window} must be >= 1 "
                "(None turns the window off)."
            )

    @property
    def query_scale(self) -> float:
        """Factor applied to queries before the q.k product."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` uses the sliding window (transformers: even layers are local)."""
        return bool(self.sliding_window) and layer % 2 == 0


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    """The whole model: image encoder, decoder and the numeric policy.

    dtype policy: parameters are stored in `param_dtype` and cast to `dtype` where they are
    used; activations (the residual stream too) are in `dtype`; norms, attention logits, softmax
    and output logits are float32.
    """

    vision: SiglipConfig = dataclasses.field(default_factory=SiglipConfig)
    llm: GemmaConfig = dataclasses.field(default_factory=GemmaConfig)
    dtype: str = "float32"  # Compute dtype: float32 or bfloat16.
    param_dtype: str = "float32"  # Storage dtype of parameters created by init.
    cache_dtype: str | None = None  # KV-cache dtype; None = `dtype`.
    remat: bool = False  # Rematerialise each block in the backward pass (saves activation memory).
    scan_layers: bool = True  # lax.scan over blocks (fast compile); False unrolls it. Same params.

    def __post_init__(self) -> None:
        _check_dtype("PaliGemmaConfig", "dtype", self.dtype)
        _check_dtype("PaliGemmaConfig", "param_dtype", self.param_dtype)
        _check_dtype("PaliGemmaConfig", "cache_dtype", self.cache_dtype)
        if not isinstance(self.vision, SiglipConfig) or not isinstance(self.llm, GemmaConfig):
            raise ValueError(
                "PaliGemmaConfig.vision/llm must be SiglipConfig/GemmaConfig instances; "
                "use PaliGemmaConfig.replace(vision={...}) to change single fields."
            )

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def replace(self, **overrides: Any) -> PaliGemmaConfig:
        """Copy with fields changed; `vision=`/`llm=` may be dicts of their own fields.

        Unknown keys raise ValueError naming the key and the valid ones.
        """
        for key, sub_cls in (("vision", SiglipConfig), ("llm", GemmaConfig)):
            if isinstance(overrides.get(key), dict):
                overrides[key] = _replace_fields(getattr(self, key), sub_cls, overrides[key])
        return _replace_fields(self, PaliGemmaConfig, overrides)


def _replace_fields(obj: Any, cls: type, overrides: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}."
        )
    return dataclasses.replace(obj, **overrides)


# Decoder sizes (big_vision `models/ppp/gemma.py:get_config`); `_apply_compat` adds window/cap.
_LLMS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(
        width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256
    ),
    "gemma2_2b": GemmaConfig(
        width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4, head_dim=256,
        post_norms=True, attn_logits_softcap=50.0,
    ),
    "gemma2_9b": GemmaConfig(
        width=3584, depth=42, mlp_dim=14_336, num_heads=16, num_kv_heads=8, head_dim=256,
        post_norms=True, attn_logits_softcap=50.0,
    ),
    "gemma2_27b": GemmaConfig(
        width=4608, depth=46, mlp_dim=36_864, num_heads=32, num_kv_heads=16, head_dim=128,
        post_norms=True, attn_logits_softcap=50.0, query_pre_attn_scalar=4608 / 32,
    ),
}  # fmt: skip
_GEMMA2_WINDOW = 4096
_GEMMA2_FINAL_SOFTCAP = 30.0

# name -> (decoder, image size); the image encoder is So400m/14 for all of them.
_PRESETS: dict[str, tuple[str, int]] = {
    **{f"pg1-3b-{res}": ("gemma_2b", res) for res in (224, 448, 896)},
    **{f"pg2-3b-{res}": ("gemma2_2b", res) for res in (224, 448, 896)},
    **{f"pg2-10b-{res}": ("gemma2_9b", res) for res in (224, 448, 896)},
    **{f"pg2-28b-{res}": ("gemma2_27b", res) for res in (224, 448, 896)},
}
TEST_PRESETS: tuple[str, ...] = ("tiny", "tiny-pg2")  # Test models, not published ones.
PRESETS: tuple[str, ...] = (*_PRESETS, *TEST_PRESETS)


def _apply_compat(llm: GemmaConfig, compat: str) -> GemmaConfig:
    """Gemma 2 (post_norms) gets the window and final soft-cap in transformers style only."""
    if compat not in COMPATS:
        raise ValueError(f"compat={compat!r} is not one of {COMPATS}.")
    if compat == "transformers" and llm.post_norms:
        return dataclasses.replace(
            llm, sliding_window=_GEMMA2_WINDOW, final_logits_softcap=_GEMMA2_FINAL_SOFTCAP
        )
    return llm


def get_preset(name: str, *, compat: Compat = "big_vision", **overrides: Any) -> PaliGemmaConfig:
    """Published hyperparameters by name (see `PRESETS`), then `overrides` (`replace` rules).

    Example: `get_preset("pg2-3b-448", dtype="bfloat16", llm={"sliding_window": None})`.
    """
    if name in TEST_PRESETS:
        config = tiny_config(version=2 if name == "tiny-pg2" else 1, compat=compat)
    elif name in _PRESETS:
        llm_name, image_size = _PRESETS[name]
        config = PaliGemmaConfig(
            vision=SiglipConfig(image_size=image_size),
            llm=_apply_compat(_LLMS[llm_name], compat),
        )
    else:
        raise ValueError(f"Unknown PaliGemma preset {name!r}; known presets: {', '.join(PRESETS)}.")
    return config.replace(**overrides) if overrides else config


def tiny_config(
    version: int = 1,
    *,
    compat: Compat = "big_vision",
    image_size: int = 28,
    patch_size: int = 14,
    vocab_size: int = 300,
    **overrides: Any,
) -> PaliGemmaConfig:
    """A ~130k-parameter model for tests: 2 layers each, grouped-query attention (4 heads, 2 KV).

    version=2 adds Gemma 2's post norms and attention soft-cap, plus a window of 8 and the final
    soft-cap in "transformers" compat. `overrides` follow `PaliGemmaConfig.replace`.
    """
    if version not in (1, 2):
        raise ValueError(f"tiny_config(version={version}) must be 1 or 2.")
    vision = SiglipConfig(
        width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=patch_size, image_size=image_size
    )
    llm = GemmaConfig(
        width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
        vocab_size=vocab_size,
    )  # fmt: skip
    if version == 2:
        llm = dataclasses.replace(llm, post_norms=True, attn_logits_softcap=50.0)
        if compat == "transformers":
            llm = dataclasses.replace(llm, sliding_window=8, final_logits_softcap=30.0)
        elif compat not in COMPATS:
            raise ValueError(f"compat={compat!r} is not one of {COMPATS}.")
    config = PaliGemmaConfig(vision=vision, llm=llm)
    return config.replace(**overrides) if overrides else config
