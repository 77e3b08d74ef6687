"""The parameter-tree contract shared by the weight loaders: key names, shapes, dtypes, errors.

Owns `WeightsError`, flat `/`-joined keys, `ModelShapes` (the sizes that fix every parameter shape
of big_vision's PaliGemma tree) and the checks that a checkpoint is complete and self-consistent.
File formats live in `npz.py` and `hf.py`; presets and configs in `config.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
MAX_LISTED = 20  # keys listed in an error message before "... and N more"
Progress = Callable[[str], None] | None  # called with one line per step of a long read or write

VIT_BLOCK = "img/Transformer/encoderblock/"
LLM_LAYERS = "llm/layers/"
GEMMA2_ONLY_KEYS = (LLM_LAYERS + "post_attention_norm/scale", LLM_LAYERS + "post_ffw_norm/scale")
# With as many KV heads as query heads (no groups), big_vision fuses q, k, v into one einsum.
FUSED_QKV_KEY = LLM_LAYERS + "attn/qkv_einsum/w"


class WeightsError(ValueError):
    """A checkpoint that cannot be read, or does not fit big_vision's PaliGemma parameter tree."""


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """What a loader found besides the parameters."""

    source: str  # file or directory read, or "state dict"
    format: str  # "npz" or "hf"
    key_style: str  # prefixes seen, e.g. "params/*" or "vision_tower.*, language_model.model.*"
    dtypes: tuple[str, ...]  # stored dtypes, e.g. ("bfloat16",)
    notes: tuple[str, ...] = ()  # what was dropped or changed, in words
    hf_config: dict[str, Any] | None = None  # config.json of an HF checkpoint


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """Every size that fixes a parameter shape; `gemma2` is true when the post-norm keys exist."""

    patch_size: int
    num_patches: int  # image tokens (N), a square number
    vision_width: int
    vision_depth: int
    vision_mlp: int
    vision_heads: int
    vision_head_dim: int
    width: int  # LLM width (D)
    depth: int
    mlp: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gemma2: bool

    @property
    def image_size(self) -> int:
        """Image side in pixels, from the number of patches."""
        return math.isqrt(self.num_patches) * self.patch_size

    @property
    def fused_qkv(self) -> bool:
        """q, k, v live in one `qkv_einsum` (big_vision's layout when K == N)."""
        return self.num_kv_heads == self.num_heads


Index = tuple[slice, ...]  # A block of an array, as jax.make_array_from_callback asks for it.


class LeafSource(NamedTuple):
    """One parameter of a checkpoint, readable in blocks without loading the rest of the file.

    `read(index)` returns the block `index` (None: the whole array) in the stored `dtype`; readers
    read only the bytes (npz) or layers (HF) that the block needs where the format allows it.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[Index | None], np.ndarray]


def block(array: np.ndarray, index: Index | None) -> np.ndarray:
    """`array[index]` (the whole array for None)."""
    return array if index is None else array[index]


def format_keys(keys: Iterable[str], limit: int = MAX_LISTED) -> str:
    """Sorted keys, at most `limit` of them, then a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    rest = len(keys) - limit
    return shown + (f" ... and {rest} more" if rest > 0 else "")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> `{'a/b/c': leaf}`."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{name}/"))
        else:
            flat[prefix + name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{'a/b/c': leaf}` -> nested dicts."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def dtype_name(dtype: Any) -> str:
    """Canonical name of a numpy/ml_dtypes/jax dtype ('float32', 'bfloat16', ...)."""
    return np.dtype(dtype).name


def as_numpy(value: Any) -> np.ndarray:
    """numpy view of a numpy/jax array or a CPU torch tensor (bfloat16 stays bfloat16)."""
    if hasattr(value, "detach"):  # a torch tensor; torch is imported only when one is passed
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    return np.asarray(value)


def numpy_dtype(name: str | Any) -> np.dtype:
    """numpy dtype for a name such as 'bfloat16'; WeightsError for anything but f32/f16/bf16."""
    dtype = np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(name)
    if dtype.name not in SUPPORTED_DTYPES:
        raise WeightsError(
            f"unsupported dtype {dtype.name}; use one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return dtype


def _vision_shapes(s: ModelShapes) -> dict[str, tuple[int, ...]]:
    layers, width, heads, head_dim = (
        s.vision_depth,
        s.vision_width,
        s.vision_heads,
        s.vision_head_dim,
    )
    attn = VIT_BLOCK + "MultiHeadDotProductAttention_0/"
    shapes = {
        "img/embedding/kernel": (s.patch_size, s.patch_size, 3, width),
        "img/embedding/bias": (width,),
        "img/pos_embedding": (1, s.num_patches, width),
        VIT_BLOCK + "LayerNorm_0/scale": (layers, width),
        VIT_BLOCK + "LayerNorm_0/bias": (layers, width),
        VIT_BLOCK + "LayerNorm_1/scale": (layers, width),
        VIT_BLOCK + "LayerNorm_1/bias": (layers, width),
        VIT_BLOCK + "MlpBlock_0/Dense_0/kernel": (layers, width, s.vision_mlp),
        VIT_BLOCK + "MlpBlock_0/Dense_0/bias": (layers, s.vision_mlp),
        VIT_BLOCK + "MlpBlock_0/Dense_1/kernel": (layers, s.vision_mlp, width),
        VIT_BLOCK + "MlpBlock_0/Dense_1/bias": (layers, width),
        attn + "out/kernel": (layers, heads, head_dim, width),
        attn + "out/bias": (layers, width),
        "img/Transformer/encoder_norm/scale": (width,),
        "img/Transformer/encoder_norm/bias": (width,),
        "img/head/kernel": (width, s.width),
        "img/head/bias": (s.width,),
    }
    for name in ("query", "key", "value"):
        shapes[attn + f"{name}/kernel"] = (layers, width, heads, head_dim)
        shapes[attn + f"{name}/bias"] = (layers, heads, head_dim)
    return shapes


def _llm_shapes(s: ModelShapes) -> dict[str, tuple[int, ...]]:
    layers, width = s.depth, s.width
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if s.gemma2:
        norms += ["post_attention_norm", "post_ffw_norm"]
    if s.fused_qkv:
        projections = {FUSED_QKV_KEY: (layers, 3, s.num_heads, width, s.head_dim)}
    else:
        projections = {
            LLM_LAYERS + "attn/q_einsum/w": (layers, s.num_heads, width, s.head_dim),
            LLM_LAYERS + "attn/kv_einsum/w": (layers, 2, s.num_kv_heads, width, s.head_dim),
        }
    shapes = {
        "llm/embedder/input_embedding": (s.vocab_size, width),
        **projections,
        LLM_LAYERS + "attn/attn_vec_einsum/w": (layers, s.num_heads, s.head_dim, width),
        LLM_LAYERS + "mlp/gating_einsum": (layers, 2, width, s.mlp),
        LLM_LAYERS + "mlp/linear": (layers, s.mlp, width),
        "llm/final_norm/scale": (width,),
    }
    for norm in norms:
        shapes[LLM_LAYERS + f"{norm}/scale"] = (layers, width)
    return shapes


def expected_shapes(s: ModelShapes) -> dict[str, tuple[int, ...]]:
    """The whole flat tree, key -> shape: the contract with the model."""
    return {**_vision_shapes(s), **_llm_shapes(s)}


def unit_shapes(gemma2: bool, fused_qkv: bool = False) -> ModelShapes:
    """Sizes of 1 (2 query heads when q/k/v are separate): enough to list the keys and ranks."""
    sizes = {f.name: 1 for f in dataclasses.fields(ModelShapes) if f.name != "gemma2"}
    sizes["num_heads"] = 1 if fused_qkv else 2
    return ModelShapes(**sizes, gemma2=gemma2)


def expected_keys(gemma2: bool, fused_qkv: bool = False) -> set[str]:
    """Key names of the tree of a PaliGemma 1 (gemma2=False) or PaliGemma 2 model."""
    return set(expected_shapes(unit_shapes(gemma2, fused_qkv)))


# Where each size is read: (key, axis). Ranks are checked before reading.
_SIZE_SOURCES = {
    "patch_size": ("img/embedding/kernel", 0),
    "num_patches": ("img/pos_embedding", 1),
    "vision_width": ("img/embedding/kernel", 3),
    "vision_depth": (VIT_BLOCK + "MultiHeadDotProductAttention_0/query/kernel", 0),
    "vision_mlp": (VIT_BLOCK + "MlpBlock_0/Dense_0/kernel", 2),
    "vision_heads": (VIT_BLOCK + "MultiHeadDotProductAttention_0/query/kernel", 2),
    "vision_head_dim": (VIT_BLOCK + "MultiHeadDotProductAttention_0/query/kernel", 3),
    "width": ("llm/embedder/input_embedding", 1),
    "depth": (LLM_LAYERS + "attn/q_einsum/w", 0),
    "mlp": (LLM_LAYERS + "mlp/linear", 1),
    "num_heads": (LLM_LAYERS + "attn/q_einsum/w", 1),
    "num_kv_heads": (LLM_LAYERS + "attn/kv_einsum/w", 2),
    "head_dim": (LLM_LAYERS + "attn/q_einsum/w", 3),
    "vocab_size": ("llm/embedder/input_embedding", 0),
}


# A fused tree reads the attention sizes from qkv_einsum [L, 3, N, D, H] instead (K = N).
_FUSED_SIZE_SOURCES = {
    "depth": (FUSED_QKV_KEY, 0),
    "num_heads": (FUSED_QKV_KEY, 2),
    "num_kv_heads": (FUSED_QKV_KEY, 2),
    "head_dim": (FUSED_QKV_KEY, 4),
}


def shapes_from_tree(shapes: Mapping[str, tuple[int, ...]]) -> ModelShapes:
    """Read the model sizes from a flat key -> shape mapping (ranks checked, consistency not)."""
    fused = FUSED_QKV_KEY in shapes
    reference = expected_shapes(unit_shapes(gemma2=False, fused_qkv=fused))
    sources = {**_SIZE_SOURCES, **(_FUSED_SIZE_SOURCES if fused else {})}
    sizes = {}
    for field, (key, axis) in sources.items():
        found = tuple(shapes[key])
        if len(found) != len(reference[key]):
            raise WeightsError(
                f"{key} has shape {found}; expected rank {len(reference[key])} "
                f"(layout {reference[key]} with every size 1)"
            )
        sizes[field] = int(found[axis])
    return ModelShapes(**sizes, gemma2=all(k in shapes for k in GEMMA2_ONLY_KEYS))


def check_keys(keys: Iterable[str], source: str) -> None:
    """Raise a WeightsError listing missing and unexpected keys (PG2 told by its post-norms)."""
    keys = set(keys)
    gemma2 = any(k in keys for k in GEMMA2_ONLY_KEYS)
    wanted = expected_keys(gemma2, fused_qkv=FUSED_QKV_KEY in keys)
    missing, unexpected = wanted - keys, keys - wanted
    if missing or unexpected:
        raise WeightsError(key_set_message(source, missing, unexpected))


def key_set_message(source: str, missing: Iterable[str], unexpected: Iterable[str]) -> str:
    """One message naming the missing and the unexpected keys of `source`."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = [f"{source} does not match the PaliGemma parameter tree."]
    if missing:
        parts.append(f"Missing keys ({len(missing)}): {format_keys(missing)}.")
    if unexpected:
        parts.append(f"Unexpected keys ({len(unexpected)}): {format_keys(unexpected)}.")
    return " ".join(parts)


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    source: str,
    expected: ModelShapes | None = None,
    describe_fit: Callable[[ModelShapes], str] | None = None,
) -> ModelShapes:
    """Check every shape against `expected` (default: the tree's own sizes); return the found sizes.

    `describe_fit(found)` adds which preset the found sizes fit to the error message.
    """
    found = shapes_from_tree(shapes)
    table = expected_shapes(expected or found)
    wrong = [k for k in sorted(table) if tuple(shapes[k]) != table[k]]
    if wrong:
        lines = [
            f"  {k}: expected {table[k]}, found {tuple(shapes[k])}" for k in wrong[:MAX_LISTED]
        ]
        if len(wrong) > MAX_LISTED:
            lines.append(f"  ... and {len(wrong) - MAX_LISTED} more")
        fit = f"\n{describe_fit(found)}" if describe_fit else ""
        raise WeightsError(
            f"{source}: {len(wrong)} parameter shape(s) do not match:\n" + "\n".join(lines) + fit
        )
    return found


def check_dtypes(dtypes: Mapping[str, Any], source: str) -> None:
    """Raise a WeightsError naming keys whose dtype is not f32/f16/bf16."""
    bad = {k: dtype_name(d) for k, d in dtypes.items() if dtype_name(d) not in SUPPORTED_DTYPES}
    if bad:
        listed = format_keys(f"{k} ({d})" for k, d in bad.items())
        raise WeightsError(
            f"{source}: unsupported dtype in {len(bad)} array(s): {listed}. "
            f"Supported: {', '.join(SUPPORTED_DTYPES)}."
        )
