"""`python -m paligemma_seg.weights info PATH` and `... convert SRC DST` (npz <-> HF directory).

`convert params.npz OUT_HF --tokenizer checkpoints/paligemma_tokenizer.model` also writes the
tokenizer and preprocessor files, so transformers' PaliGemmaProcessor (and vLLM, TGI) load OUT_HF.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from paligemma_seg.model.config import COMPATS, DTYPES
from paligemma_seg.weights import Summary, WeightsError, convert, inspect
from paligemma_seg.weights.config import describe_sizes
from paligemma_seg.weights.safetensors import DEFAULT_MAX_SHARD_BYTES
from paligemma_seg.weights.spec import Progress

BIG_FILE_BYTES = 256 * 2**20  # progress is printed for checkpoints larger than this


def _size_on_disk(path: pathlib.Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size if path.is_file() else 0


def _stderr_progress(path: pathlib.Path) -> Progress:
    """A progress printer for big checkpoints, None for small ones."""
    if _size_on_disk(path) < BIG_FILE_BYTES:
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
    conv.add_argument(
        "--tokenizer",
        help="SentencePiece .model to export with the weights (npz -> HF): tokenizer and "
        "preprocessor files for PaliGemmaProcessor",
    )
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
                tokenizer=args.tokenizer,
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
