"""Load and save PaliGemma weights: big_vision `.npz` files and Hugging Face safetensors dirs.

Every loader returns big_vision's tree (`img/...`, `llm/...`, layers stacked on axis 0) as nested
dicts of numpy arrays. The pieces: `weights_tree.py` (keys, shapes, errors), `weights_npz.py`,
`weights_hf.py` (the HF mapping table), `weights_hf_convert.py`, `weights_safetensors.py`,
`weights_config.py` (presets, config.json).

CLI: `python -m paligemma_seg.weights convert SRC DST` (npz <-> HF directory) and `... info PATH`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from paligemma_seg.model.config import COMPATS, DTYPES, PaliGemmaConfig, get_preset
from paligemma_seg.weights_config import (
    check_fits,
    config_from_shapes,
    describe_sizes,
    hf_config_json,
    hf_generation_config,
    matching_presets,
)
from paligemma_seg.weights_hf import key_style
from paligemma_seg.weights_hf_convert import (
    check_hf_source,
    hf_tensor_plan,
    kept_vocab,
    params_from_hf_state_dict,
    params_from_source,
    params_to_hf_state_dict,
)
from paligemma_seg.weights_npz import check_npz, load_npz, save_npz
from paligemma_seg.weights_safetensors import (
    DEFAULT_MAX_SHARD_BYTES,
    SafetensorsReader,
    write_directory,
)
from paligemma_seg.weights_tree import (
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
    "load_hf",
    "load_npz",
    "load_params",
    "params_from_hf_state_dict",
    "params_to_hf_state_dict",
    "save_hf",
    "save_npz",
]

CONFIG_FILE = "config.json"
_BIG_FILE_BYTES = 256 * 2**20  # the CLI prints progress for checkpoints larger than this


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
    """(PaliGemma model, params) from an .npz file or HF directory; the config comes from shapes.

    Sizes are read from the tensors; soft-caps, window and query scaling come from the preset whose
    sizes match (`compat` as in `get_preset`). `preset=` instead demands that preset's sizes.
    `overrides` (PaliGemmaConfig.replace rules, e.g. dtype='bfloat16') win; `param_dtype` defaults
    to the stored dtype, and parameters are cast to it.
    """
    from paligemma_seg.model import PaliGemma

    summary = inspect(path)
    found = summary.shapes
    if preset is not None:
        config = get_preset(preset, compat=compat)
        check_fits(found, config, f"{path} (asked for preset {preset})")
    else:
        config = config_from_shapes(found, compat=compat)
    stored = summary.dtypes[0] if len(summary.dtypes) == 1 else "float32"
    overrides.setdefault("param_dtype", stored if stored in DTYPES else "float32")
    config = config.replace(**overrides)
    check_fits(found, config, str(path))
    params, _ = load_params(path, dtype=config.param_dtype)
    return PaliGemma(config), params


def save_hf(
    params: Mapping[str, Any],
    config: PaliGemmaConfig | None,
    directory: str | os.PathLike,
    *,
    compat: str = "big_vision",
    image_token_index: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: Progress = None,
) -> pathlib.Path:
    """Write an HF directory (hub key style, config.json) that transformers loads; atomically.

    `config` gives the behaviour written to config.json (soft-caps, window); None derives it from
    the shapes like `load` (with `compat`). Shards hold at most `max_shard_bytes` each.
    """
    shapes, plan = hf_tensor_plan(params)
    if config is None:
        config = config_from_shapes(shapes, compat=compat)
    check_fits(shapes, config, "parameter tree")
    dtype = dtype_name(next(t.dtype for t in plan if t.name.endswith("embed_tokens.weight")))
    files = {
        CONFIG_FILE: hf_config_json(config, dtype, image_token_index=image_token_index),
        "generation_config.json": hf_generation_config(),
    }
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
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress = None,
) -> pathlib.Path:
    """npz file -> HF directory, or HF directory -> npz file."""
    destination = pathlib.Path(destination)
    to_npz = pathlib.Path(source).is_dir()
    if to_npz != (destination.suffix == ".npz"):
        wanted = "an .npz file" if to_npz else "a directory (not *.npz)"
        raise WeightsError(f"converting {source} needs {wanted} as destination, got {destination}")
    if destination.exists() and not overwrite:
        raise WeightsError(f"{destination} already exists; remove it or pass overwrite=True")
    params, _ = load_params(source, dtype=dtype, progress=progress)
    if to_npz:
        return save_npz(params, destination, progress=progress)
    return save_hf(
        params,
        None,
        destination,
        compat=compat,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
    )


def _size_on_disk(path: pathlib.Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size if path.is_file() else 0


def _stderr_progress(path: pathlib.Path) -> Progress:
    """A progress printer for big checkpoints, None for small ones."""
    if _size_on_disk(path) < _BIG_FILE_BYTES:
        return None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _print_summary(summary: Summary) -> None:
    s = summary.shapes
    presets = " / ".join(summary.presets) or "none (sizes below)"
    print(f"path:       {summary.path}")
    print(f"format:     {summary.format} (keys {summary.key_style})")
    print(f"preset:     {presets}")
    print(f"sizes:      {describe_sizes(s)}")
    print(
        f"parameters: {summary.num_params():,} (img {summary.num_params('img/'):,}; "
        f"llm {summary.num_params('llm/'):,})"
    )
    print(f"dtype:      {', '.join(summary.dtypes)}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m paligemma_seg.weights", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print the preset, sizes, parameter count and dtype")
    info.add_argument("path", help=".npz file or HF checkpoint directory")
    conv = commands.add_parser("convert", help="npz -> HF directory, or HF directory -> npz")
    conv.add_argument("source", help=".npz file or HF checkpoint directory")
    conv.add_argument("destination", help="HF directory (from .npz) or .npz file (from HF)")
    conv.add_argument("--dtype", choices=DTYPES, help="cast parameters (default: keep)")
    conv.add_argument("--compat", choices=COMPATS, default="big_vision", help="PG2 config.json")
    conv.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**30)
    conv.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; a WeightsError is printed as one line and exits with status 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            _print_summary(inspect(args.path))
        else:
            written = convert(
                args.source,
                args.destination,
                dtype=args.dtype,
                compat=args.compat,
                overwrite=args.overwrite,
                max_shard_bytes=int(args.max_shard_gb * 2**30),
                progress=_stderr_progress(pathlib.Path(args.source)),
            )
            print(f"wrote {written}")
    except WeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
