"""The training input pipeline alone: examples/s from full-size JPEGs vs pre-resized PNGs
(`convert --resize`), against what one full-size train step would consume on an H100.

    python scripts/bench_pipeline.py [--images DIR --masks DIR] [--size 224] [--batch 32]
        [--batches 20] [--repeats 3] [--params 2.92e9] [--text-tokens 64] [--mfu 0.4]

Converts the water data twice into a temporary folder (plain, and with --resize SIZE; the shipped
codec, no ceiling), then times `pipeline.train_batches` (tf.data: read, decode, resize, batch) over
--batches batches of --batch examples after one warm-up batch, for each JSONL in turn, --repeats
times alternating; each figure is the best run. The demand estimate of a train step is
    examples/s = peak FLOP/s x MFU / (FLOPs per param-token x params x (image + text tokens)),
an H100's dense bf16 peak (989 TFLOP/s) at --mfu, 6 FLOPs per parameter and token (forward +
backward, a full fine-tune; LoRA and frozen towers cost less per example and so consume more), and
the PaliGemma 2 3B's parameters. The last line is JSON: {"resized_examples_per_s",
"full_size_examples_per_s", "h100_step_examples_per_s", "resized_ratio", ...}.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import machine, print_summary  # noqa: E402

from paligemma_seg.data import convert as convert_lib  # noqa: E402
from paligemma_seg.data import pipeline  # noqa: E402
from paligemma_seg.tokenizer import Tokenizer  # noqa: E402

WATER = REPO.parent / "shared" / "data" / "water_bodies"
H100_BF16_FLOPS = 989e12  # dense (no sparsity), SXM


def time_pipeline(table: pipeline.TokenTable, size: int, batch: int, batches: int) -> float:
    """Examples/s of `batches` batches after a warm-up one (tf.data started and warm)."""
    batches_iter = pipeline.train_batches(
        table, batch_size=batch, rows=slice(0, batch), image_size=size, seed=0,
        num_parallel_calls=os.cpu_count() or 1,
    )  # fmt: skip
    next(batches_iter)
    start = time.perf_counter()
    for _ in range(batches):
        images = next(batches_iter)["image"]
    elapsed = time.perf_counter() - start
    assert images.shape == (batch, size, size, 3)
    return batches * batch / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(WATER / "images"))
    parser.add_argument("--masks", default=str(WATER / "masks"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", type=float, default=2.92e9, help="PaliGemma 2 3B")
    parser.add_argument("--text-tokens", type=int, default=64, help="prefix + suffix per example")
    parser.add_argument("--flops-per-param-token", type=float, default=6.0)
    parser.add_argument("--mfu", type=float, default=0.4)
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.load(str(REPO / "checkpoints" / "tokenizer_small.model"))
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, resize in (("full_size", 0), ("resized", args.size)):
            out = pathlib.Path(tmp) / name
            convert_lib.convert(
                args.images, args.masks, out, ceiling=False, progress=False, resize=resize
            )
            examples = pipeline.read_jsonl(out / "all.jsonl")
            tables[name] = pipeline.tokenize(examples, tokenizer, 128, args.size)
        resized_files = sum(str(p).endswith(".png") for p in tables["resized"].images)
        assert resized_files == len(tables["resized"]), "the resized JSONL must feed the PNGs"
        best = {name: 0.0 for name in tables}
        for _ in range(args.repeats):
            for name, table in tables.items():
                rate = time_pipeline(table, args.size, args.batch, args.batches)
                best[name] = max(best[name], rate)
    image_tokens = (args.size // 14) ** 2
    step_flops = args.flops_per_param_token * args.params * (image_tokens + args.text_tokens)
    demand = H100_BF16_FLOPS * args.mfu / step_flops
    print(f"machine: {machine()}; {len(tables['resized'])} images, batch {args.batch}")
    for name, rate in best.items():
        print(f"pipeline, {name:9s}: {rate:8.1f} examples/s  ({rate / demand:.1f}x the H100 step)")
    print(
        f"H100 step estimate: {demand:.1f} examples/s ({args.params:.3g} params, {image_tokens} + "
        f"{args.text_tokens} tokens, MFU {args.mfu:.0%} of {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s)"
    )
    print_summary(
        {
            "resized_examples_per_s": round(best["resized"], 1),
            "full_size_examples_per_s": round(best["full_size"], 1),
            "h100_step_examples_per_s": round(demand, 1),
            "resized_ratio": round(best["resized"] / demand, 2),
            "full_size_ratio": round(best["full_size"] / demand, 2),
            "resized_speedup": round(best["resized"] / best["full_size"], 2),
            "size": args.size,
            "batch": args.batch,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
