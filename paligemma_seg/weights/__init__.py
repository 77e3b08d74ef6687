"""Load, save, convert and inspect PaliGemma weights: big_vision `.npz`, Hugging Face directories.

Every loader returns big_vision's tree (`img/...`, `llm/...`, layers stacked on axis 0) as nested
dicts of numpy arrays. The modules: `spec` (the tree contract: keys, shapes, dtypes, errors, path
flattening), `npz`, `safetensors` (sharded directories), `hf` (the HF name mapping table),
`hf_convert` (HF tensors <-> the tree), `config` (model config <-> shapes, HF config.json),
`hf_processor` (tokenizer + preprocessor files of an export), `orbax` (parameters of a training
checkpoint). `open_leaves` reads a checkpoint leaf by leaf and block by block.

CLI (`__main__.py`): `python -m paligemma_seg.weights convert SRC DST` and `... info PATH`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

from paligemma_seg.model.config import DTYPES, PaliGemmaConfig, get_preset
from paligemma_seg.weights import hf_processor
from paligemma_seg.weights.config import (
    check_fits,
    config_from_hf,
    config_from_shapes,
    hf_config_json,
    hf_generation_config,
    matching_presets,
)
from paligemma_seg.weights.hf import key_style
from paligemma_seg.weights.hf_convert import (
    check_hf_source,
    hf_tensor_plan,
    kept_vocab,
    params_from_hf_state_dict,
    params_from_source,
    params_to_hf_state_dict,
)
from paligemma_seg.weights.hf_convert import leaf_sources as leaf_sources_hf
from paligemma_seg.weights.npz import check_npz, load_npz, save_npz
from paligemma_seg.weights.npz import leaf_sources as leaf_sources_npz
from paligemma_seg.weights.safetensors import (
    DEFAULT_MAX_SHARD_BYTES,
    SafetensorsReader,
    write_directory,
)
from paligemma_seg.weights.spec import (
    LeafSource,
    LoadInfo,
    ModelShapes,
    Progress,
    WeightsError,
    dtype_name,
    expected_shapes,
)

__all__ = [
    "LoadInfo",
    "Summary",
    "WeightsError",
    "convert",
    "inspect",
    "load",
    "load_config",
    "load_hf",
    "load_npz",
    "load_params",
    "open_leaves",
    "params_from_hf_state_dict",
    "params_to_hf_state_dict",
    "save_hf",
    "save_npz",
]

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a checkpoint holds, read from headers only."""

    path: str
    format: str  # "npz" or "hf"
    shapes: ModelShapes  # vocab_size: the rows a load keeps
    dtypes: tuple[str, ...]
    key_style: str

    @property
    def presets(self) -> list[str]:
        return matching_presets(self.shapes)

    def num_params(self, prefix: str = "") -> int:
        """Parameters under `prefix` ('img/', 'llm/' or '' for all)."""
        table = expected_shapes(self.shapes)
        return sum(math.prod(shape) for key, shape in table.items() if key.startswith(prefix))


def _read_hf_config(directory: pathlib.Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(
            f"{directory} has no {CONFIG_FILE}; an HF checkpoint directory needs one"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path} is not valid JSON: {error}") from None


def _hf_directory(path: str | os.PathLike) -> pathlib.Path:
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise WeightsError(f"no such checkpoint directory: {directory}")
    return directory


def load_hf(
    directory: str | os.PathLike,
    *,
    dtype: str | None = None,
    vocab_size: int | None = None,
    progress: Progress = None,
) -> tuple[dict[str, Any], LoadInfo]:
    """An HF PaliGemma directory (config.json + safetensors, single or sharded) -> (params, info).

    `dtype` casts on the way; `vocab_size` keeps that many embedding rows (default: all but the
    hub's padding rows, 257,216 -> 257,152).
    """
    directory = _hf_directory(directory)
    hf_config = _read_hf_config(directory)
    with SafetensorsReader(directory) as reader:
        params, notes = params_from_source(
            reader, hf_config, dtype=dtype, vocab_size=vocab_size, progress=progress
        )
        info = LoadInfo(
            source=str(directory),
            format="hf",
            key_style=key_style(list(reader.shapes)),
            dtypes=tuple(sorted(set(reader.dtypes.values()))),
            notes=notes,
            hf_config=hf_config,
        )
    return params, info


def load_params(
    path: str | os.PathLike, *, dtype: str | None = None, progress: Progress = None
) -> tuple[dict[str, Any], LoadInfo]:
    """A big_vision .npz file or an HF directory -> (params, info)."""
    if pathlib.Path(path).is_dir():
        return load_hf(path, dtype=dtype, progress=progress)
    return load_npz(path, dtype=dtype, progress=progress)


@contextlib.contextmanager
def open_leaves(
    path: str | os.PathLike, *, vocab_size: int | None = None
) -> Iterator[tuple[dict[str, LeafSource], ModelShapes]]:
    """(key -> LeafSource, model sizes) of an .npz or HF directory, checked; reads no tensor yet.

    For loading a large model leaf by leaf and block by block (each host reads only the blocks its
    devices hold): `experiment.initial_params`. The sources are valid inside the `with` block.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        hf_config = _read_hf_config(_hf_directory(path))
        with SafetensorsReader(path) as reader:
            yield leaf_sources_hf(reader, hf_config, vocab_size=vocab_size)
    else:
        yield leaf_sources_npz(path)


def inspect(path: str | os.PathLike) -> Summary:
    """Sizes, dtypes and key style of a checkpoint, checked, without reading any tensor data."""
    path = pathlib.Path(path)
    if path.is_dir():
        hf_config = _read_hf_config(path)
        with SafetensorsReader(path) as reader:
            _, shapes = check_hf_source(reader, hf_config)
            dtypes, style = set(reader.dtypes.values()), key_style(list(reader.shapes))
        shapes = dataclasses.replace(shapes, vocab_size=kept_vocab(shapes.vocab_size))
        return Summary(str(path), "hf", shapes, tuple(sorted(dtypes)), style)
    entries, shapes = check_npz(path)
    dtypes = tuple(sorted({dtype_name(e.dtype) for e in entries.values()}))
    prefixed = any(e.member.startswith("params/") for e in entries.values())
    return Summary(str(path), "npz", shapes, dtypes, "params/*" if prefixed else "img/*, llm/*")


def load(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    compat: str = "big_vision",
    **overrides: Any,
) -> tuple[Any, dict[str, Any]]:
    """(PaliGemma model, params) from an .npz file or HF directory; the config comes from the file.

    Sizes are read from the tensors. Behaviour (soft-caps, window, query scaling, RoPE base, norm
    epsilons): an HF directory's config.json says it (`weights.config.config_from_hf`); an .npz
    carries none, so it comes from the preset whose sizes match, or the Gemma 1/2 family's
    published behaviour for other sizes, with `compat` as in `get_preset`. `preset=` instead
    demands that preset's sizes and behaviour. `overrides` (PaliGemmaConfig.replace rules, e.g.
    dtype='bfloat16') win; `param_dtype` defaults to the stored dtype, and parameters are cast to
    it.
    """
    from paligemma_seg.model import PaliGemma

    config = load_config(path, preset=preset, compat=compat, **overrides)
    params, _ = load_params(path, dtype=config.param_dtype)
    return PaliGemma(config), params


def load_config(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    compat: str = "big_vision",
    **overrides: Any,
) -> PaliGemmaConfig:
    """The model config `load` would build for `path`, reading headers only (see `load`)."""
    summary = inspect(path)
    found = summary.shapes
    if preset is not None:
        config = get_preset(preset, compat=compat)
        check_fits(found, config, f"{path} (asked for preset {preset})")
    elif summary.format == "hf":
        config = config_from_hf(_read_hf_config(pathlib.Path(path)), found, str(path))
    else:
        config = config_from_shapes(found, compat=compat)
    stored = summary.dtypes[0] if len(summary.dtypes) == 1 else "float32"
    overrides.setdefault("param_dtype", stored if stored in DTYPES else "float32")
    config = config.replace(**overrides)
    check_fits(found, config, str(path))
    return config


def save_hf(
    params: Mapping[str, Any],
    config: PaliGemmaConfig | None,
    directory: str | os.PathLike,
    *,
    compat: str = "big_vision",
    image_token_index: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: Progress = None,
) -> pathlib.Path:
    """Write an HF directory (hub key style, config.json) that transformers loads; atomically.

    `config` gives the behaviour written to config.json (soft-caps, window); None derives it from
    the shapes like `load` (with `compat`). Shards hold at most `max_shard_bytes` each.
    `image_token_index` defaults to the vocabulary size. `tokenizer` (a SentencePiece .model, e.g.
    checkpoints/paligemma_tokenizer.model) adds the tokenizer and preprocessor files
    (`hf_processor`), with `<image>` at `image_token_index`, so that
    `PaliGemmaProcessor.from_pretrained(directory)` prepares inputs as `infer.segmenter` does.
    """
    shapes, plan = hf_tensor_plan(params)
    if config is None:
        config = config_from_shapes(shapes, compat=compat)
    check_fits(shapes, config, "parameter tree")
    dtype = dtype_name(next(t.dtype for t in plan if t.name.endswith("embed_tokens.weight")))
    if image_token_index is None:
        image_token_index = config.llm.vocab_size
    files = {
        CONFIG_FILE: hf_config_json(config, dtype, image_token_index=image_token_index),
        "generation_config.json": hf_generation_config(),
    }
    if tokenizer is not None:
        files.update(hf_processor.processor_files(tokenizer, config, image_token_index))
    return write_directory(
        directory,
        plan,
        files,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        progress=progress,
    )


def convert(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    dtype: str | None = None,
    compat: str = "big_vision",
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress = None,
) -> pathlib.Path:
    """npz file -> HF directory, or HF directory -> npz file.

    `tokenizer` (npz -> HF only): a SentencePiece .model whose tokenizer and preprocessor files
    are written into the directory too (see `save_hf`), so transformers, vLLM or TGI serve it.
    """
    destination = pathlib.Path(destination)
    to_npz = pathlib.Path(source).is_dir()
    if to_npz != (destination.suffix == ".npz"):
        wanted = "an .npz file" if to_npz else "a directory (not *.npz)"
        raise WeightsError(f"converting {source} needs {wanted} as destination, got {destination}")
    if destination.exists() and not overwrite:
        raise WeightsError(f"{destination} already exists; remove it or pass overwrite=True")
    if tokenizer is not None:
        if to_npz:
            raise WeightsError(
                "a tokenizer is written only into an HF directory (npz -> HF); an .npz file "
                "holds parameters only"
            )
        hf_processor.load_tokenizer(tokenizer)  # fail before reading a large checkpoint
    params, _ = load_params(source, dtype=dtype, progress=progress)
    if to_npz:
        return save_npz(params, destination, progress=progress)
    return save_hf(
        params,
        None,
        destination,
        compat=compat,
        tokenizer=tokenizer,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
    )
