"""Hugging Face tensors <-> big_vision's tree: the conversion, using the table in `hf.py`.

Loading reads one source tensor at a time into preallocated stacked arrays; export builds one HF
tensor at a time (`hf_tensor_plan`), so neither direction holds two copies of a large model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from paligemma_seg.weights.config import check_fits
from paligemma_seg.weights.hf import (
    GLOBALS,
    HUB_PADDED_VOCAB,
    LM_HEAD,
    PALIGEMMA_VOCAB,
    TEXT,
    Stack,
    Transform,
    canonical_name,
    config_dict,
    hf_shapes,
    key_style,
    shapes_from_hf,
    stacks,
)
from paligemma_seg.weights.safetensors import ArraySource, PlannedTensor, TensorSource
from paligemma_seg.weights.spec import (
    MAX_LISTED,
    Index,
    LeafSource,
    LoadInfo,
    ModelShapes,
    WeightsError,
    as_numpy,
    block,
    check_dtypes,
    check_keys,
    check_shapes,
    expected_shapes,
    flatten,
    numpy_dtype,
    unflatten,
)


def _canonical_names(names: list[str]) -> dict[str, str]:
    """Hub-style name -> name in the source; two names for one tensor is an error."""
    mapping: dict[str, str] = {}
    for name in names:
        hub = canonical_name(name)
        if hub in mapping:
            raise WeightsError(
                f"HF checkpoint holds one tensor twice, as {mapping[hub]} and {name}"
            )
        mapping[hub] = name
    return mapping


def read_stack(
    stack: Stack,
    s: ModelShapes,
    read: Callable[[str], np.ndarray],
    dtype: Any,
    layers: range | None = None,
) -> np.ndarray:
    """Fill one stacked parameter (its `layers`, default all) layer by layer, so only one source
    tensor is held at a time."""
    layers = range(stack.depth) if layers is None else layers
    out = None
    for row, i in enumerate(layers):
        for slot, template, transform in stack.parts:
            value = transform.to_ours(read(template.format(i=i)), s)
            if out is None:
                part_shape = value.shape if slot is None else (len(stack.parts), *value.shape)
                out = np.empty((len(layers), *part_shape), dtype or value.dtype)
            out[(row,) if slot is None else (row, slot)] = value
    return out


def kept_vocab(rows: int, vocab_size: int | None = None) -> int:
    """Embedding rows kept on load: `vocab_size` if given, else all but the hub's padding rows."""
    if vocab_size is None:
        return PALIGEMMA_VOCAB if rows == HUB_PADDED_VOCAB else rows
    if not 0 < vocab_size <= rows:
        raise WeightsError(f"vocab_size={vocab_size} must be in 1..{rows} (rows of embed_tokens)")
    return vocab_size


def _strip_vocab(
    embedding: np.ndarray, vocab_size: int | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Keep `kept_vocab` rows (a view: the dropped rows are not copied)."""
    rows = embedding.shape[0]
    keep = kept_vocab(rows, vocab_size)
    if keep == rows:
        return embedding, ()
    return embedding[:keep], (
        f"dropped {rows - keep} padding rows of embed_tokens ({rows} -> {keep})",
    )


def _check_tied_head(source: TensorSource, names: Mapping[str, str]) -> tuple[str, ...]:
    """lm_head must equal the embedding (PaliGemma ties them); then it is dropped."""
    if LM_HEAD not in names:
        return ()
    head = source.read(names[LM_HEAD])
    embedding = source.read(names[TEXT + "embed_tokens.weight"])
    if head.shape != embedding.shape or not np.array_equal(head, embedding):
        raise WeightsError(
            f"{names[LM_HEAD]} differs from the token embedding; PaliGemma ties them and an "
            "untied output head is not supported. Remove lm_head.weight only if the model was "
            "meant to be tied."
        )
    return (f"dropped {names[LM_HEAD]} (equal to the tied embedding)",)


def check_hf_source(source: TensorSource, hf_config: Any) -> tuple[dict[str, str], ModelShapes]:
    """Check names, dtypes and shapes; returns (hub name -> source name, model sizes)."""
    names = _canonical_names(list(source.shapes))
    check_dtypes({name: source.dtypes[name] for name in names.values()}, "HF checkpoint")
    shapes = {hub: tuple(source.shapes[name]) for hub, name in names.items()}
    s = shapes_from_hf(hf_config, shapes)
    expected = hf_shapes(s)
    wrong = [k for k in expected if shapes[k] != expected[k]]
    if wrong:
        listed = "\n".join(
            f"  {names[k]}: expected {expected[k]}, found {shapes[k]}" for k in wrong[:MAX_LISTED]
        )
        more = f"\n  ... and {len(wrong) - MAX_LISTED} more" if len(wrong) > MAX_LISTED else ""
        raise WeightsError(
            f"HF checkpoint: {len(wrong)} tensor shape(s) do not fit its config.json (heads, "
            f"layers) and the other tensors:\n{listed}{more}"
        )
    return names, s


def params_from_source(
    source: TensorSource,
    hf_config: Any,
    *,
    dtype: str | None = None,
    vocab_size: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Convert checked HF tensors to the nested tree; returns (params, notes on dropped data)."""
    names, s = check_hf_source(source, hf_config)
    notes = _check_tied_head(source, names)
    out_dtype = numpy_dtype(dtype) if dtype else None
    read = lambda hub: source.read(names[hub])
    flat = {}
    for name, key, transform in GLOBALS:
        value = transform.to_ours(read(name), s)
        flat[key] = value.astype(out_dtype) if out_dtype and value.dtype != out_dtype else value
    for stack in stacks(s):
        flat[stack.key] = read_stack(stack, s, read, out_dtype)
        if progress:
            progress(f"converted {stack.key} {flat[stack.key].shape}")
    embedding, vocab_notes = _strip_vocab(flat["llm/embedder/input_embedding"], vocab_size)
    flat["llm/embedder/input_embedding"] = embedding
    return unflatten(flat), notes + vocab_notes


def leaf_sources(
    source: TensorSource, hf_config: Any, *, vocab_size: int | None = None
) -> tuple[dict[str, LeafSource], ModelShapes]:
    """Checked HF tensors -> key -> LeafSource of big_vision's tree, and the model sizes.

    A block of a stacked parameter reads only the layers it spans (one HF tensor at a time);
    the embedding keeps `kept_vocab` rows. Nothing is read before a `read` call.
    """
    names, s = check_hf_source(source, hf_config)
    _check_tied_head(source, names)
    read_hf = lambda hub: source.read(names[hub])
    table = expected_shapes(s)
    leaves: dict[str, LeafSource] = {}
    for name, key, transform in GLOBALS:
        shape = table[key]
        dtype = np.dtype(numpy_dtype(source.dtypes[names[name]]))

        def read(index: Index | None, name=name, transform=transform) -> np.ndarray:
            return np.asarray(block(transform.to_ours(read_hf(name), s), index))

        leaves[key] = LeafSource(shape, dtype, read)
    for stack in stacks(s):
        shape = table[stack.key]
        first = names[stack.parts[0][1].format(i=0)]
        dtype = np.dtype(numpy_dtype(source.dtypes[first]))

        def read(index: Index | None, stack=stack) -> np.ndarray:
            layers = range(stack.depth) if index is None else range(stack.depth)[index[0]]
            part = read_stack(stack, s, read_hf, None, layers)
            return part if index is None else part[(slice(None), *index[1:])]

        leaves[stack.key] = LeafSource(shape, dtype, read)
    embedding = leaves["llm/embedder/input_embedding"]
    keep = kept_vocab(embedding.shape[0], vocab_size)
    if keep != embedding.shape[0]:
        full = embedding.read
        leaves["llm/embedder/input_embedding"] = LeafSource(
            (keep, *embedding.shape[1:]),
            embedding.dtype,
            lambda index: block(full((slice(0, keep),)), index),
        )
    return leaves, dataclasses.replace(s, vocab_size=keep)


def params_from_hf_state_dict(
    state_dict: Mapping[str, Any],
    hf_config: Any,
    *,
    dtype: str | None = None,
    vocab_size: int | None = None,
) -> tuple[dict[str, Any], LoadInfo]:
    """An HF PaliGemma state dict (any key style) -> (big_vision tree of numpy arrays, LoadInfo).

    `hf_config`: a transformers config or its config.json dict (heads and layer counts).
    `dtype`: cast on the way ('float32', 'bfloat16', ...); default keeps the stored dtype.
    `vocab_size`: embedding rows to keep; default drops only the hub's 64 padding rows.
    """
    source = ArraySource(state_dict)
    params, notes = params_from_source(source, hf_config, dtype=dtype, vocab_size=vocab_size)
    info = LoadInfo(
        source="state dict",
        format="hf",
        key_style=key_style(list(state_dict)),
        dtypes=tuple(sorted(set(source.dtypes.values()))),
        notes=notes,
        hf_config=config_dict(hf_config),
    )
    return params, info


def hf_tensor_plan(params: Mapping[str, Any]) -> tuple[ModelShapes, list[PlannedTensor]]:
    """Check the tree, then list every hub-style HF tensor with a function that builds it."""
    flat = {k: as_numpy(v) for k, v in flatten(params).items()}
    check_keys(flat, "parameter tree")
    check_dtypes({k: v.dtype for k, v in flat.items()}, "parameter tree")
    s = check_shapes({k: v.shape for k, v in flat.items()}, "parameter tree")
    shapes = hf_shapes(s)

    def build(transform: Transform, array: np.ndarray) -> Callable[[], np.ndarray]:
        return lambda: np.ascontiguousarray(transform.to_hf(array, s))

    plan = [PlannedTensor(n, shapes[n], flat[k].dtype, build(t, flat[k])) for n, k, t in GLOBALS]
    for stack in stacks(s):
        array = flat[stack.key]
        for i in range(stack.depth):
            for slot, template, transform in stack.parts:
                part = array[i] if slot is None else array[i, slot]
                name = template.format(i=i)
                plan.append(PlannedTensor(name, shapes[name], array.dtype, build(transform, part)))
    return s, plan


def params_to_hf_state_dict(params: Mapping[str, Any], config: Any = None) -> dict[str, np.ndarray]:
    """The big_vision tree -> hub-style HF state dict of numpy arrays (tied: no lm_head.weight).

    Sizes are read from the tree; a `PaliGemmaConfig`, if given, must fit them.
    """
    shapes, plan = hf_tensor_plan(params)
    if config is not None:
        check_fits(shapes, config, "parameter tree")
    return {tensor.name: tensor.make() for tensor in plan}
