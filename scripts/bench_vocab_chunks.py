"""The loss at Gemma's vocabulary: full [B, T, V] logits vs `loss.vocab_chunks` slices, same run.

    python scripts/bench_vocab_chunks.py [--batch 2 --tokens 128 --width 1152 --chunks 16]

Forward + backward (the gradient of the hidden states; with --train-table also of the table) of
the next-token cross-entropy from final hidden states [B, T, D] and a bfloat16 tied embedding
[257152, D], as the train step computes it: `next_token_loss` on `Embedder.decode`-style logits
(float32) against `next_token_loss_from_hidden` with the vocabulary in N slices. Both jitted,
warm, the median of --repeats timed calls; XLA's compiled temporaries beside the times, and the
largest relative difference of the loss and the hidden-state gradient. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench_common import cpu_model  # noqa: E402

from paligemma_seg.train import loss as loss_lib  # noqa: E402

VOCAB = 257_152  # PaliGemma's tokenizer
GIB = 2**30


def make_loss(chunks: int, cap: float | None, train_table: bool):
    """A jitted (hidden, table, text, mask_loss) -> (loss, (d hidden[, d table]))."""

    def loss(hidden, table, text, mask_loss):
        if chunks <= 1:
            logits = jnp.einsum(
                "BTD,VD->BTV", hidden, table.astype(hidden.dtype),
                preferred_element_type=jnp.float32,
            )  # fmt: skip
            logits = jnp.tanh(logits / cap) * cap if cap else logits
            total, count = loss_lib.next_token_loss(logits, text, mask_loss)
        else:
            total, count = loss_lib.next_token_loss_from_hidden(
                hidden, table, cap, chunks, text, mask_loss
            )
        return total / count

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1) if train_table else (0,)))


def timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--cap", type=float, default=30.0, help="final soft-cap (0: none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--train-table", action="store_true",
        help="also differentiate the table (optim.trainable='all'); default frozen, as LoRA",
    )  # fmt: skip
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(args.batch, args.tokens, args.width)), jnp.bfloat16)
    table = jnp.asarray(rng.normal(size=(VOCAB, args.width)) * 0.02, jnp.bfloat16)
    text = jnp.asarray(rng.integers(0, VOCAB, (args.batch, args.tokens)), jnp.int32)
    mask_loss = jnp.ones((args.batch, args.tokens), jnp.int32)
    cap = args.cap or None
    chunks = loss_lib.vocab_chunks(VOCAB, args.chunks)
    inputs = (hidden, table, text, mask_loss)
    rows = {}
    for name, n in (("full", 1), ("chunked", chunks)):
        fn = make_loss(n, cap, args.train_table)
        temp = fn.lower(*inputs).compile().memory_analysis().temp_size_in_bytes
        value, (grad_hidden, *_) = fn(*inputs)
        rows[name] = dict(
            seconds=timed(fn, inputs, args.repeats), temp_gib=temp / GIB,
            loss=float(value), grad_hidden=np.asarray(grad_hidden, np.float32),
        )  # fmt: skip
        print(f"{name:8s} chunks={n:3d}: {rows[name]['seconds'] * 1e3:8.1f} ms, "
              f"XLA temporaries {rows[name]['temp_gib']:.2f} GiB")  # fmt: skip
    full, chunked = rows["full"], rows["chunked"]
    scale = np.abs(full["grad_hidden"]).max()
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "backend": jax.default_backend(),
        "batch": args.batch, "tokens": args.tokens, "width": args.width, "vocab": VOCAB,
        "chunks": chunks, "train_table": args.train_table,
        "full_ms": full["seconds"] * 1e3, "chunked_ms": chunked["seconds"] * 1e3,
        "chunked_vs_full_time": chunked["seconds"] / full["seconds"],
        "full_temp_gib": full["temp_gib"], "chunked_temp_gib": chunked["temp_gib"],
        "loss_rel_diff": abs(chunked["loss"] - full["loss"]) / abs(full["loss"]),
        "grad_hidden_max_diff_rel": float(
            np.abs(chunked["grad_hidden"] - full["grad_hidden"]).max() / scale
        ),
    }  # fmt: skip
    print(
        f"chunked / full time {result['chunked_vs_full_time']:.2f}x; temporaries "
        f"{result['full_temp_gib']:.2f} -> {result['chunked_temp_gib']:.2f} GiB on {result['cpu']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
