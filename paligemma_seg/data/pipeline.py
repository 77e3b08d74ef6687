"""JSONL examples (from the convert CLI) -> tf.data -> batches, per host, in a restartable order.

Batch contract (numpy per process; `to_global` makes global jax arrays over the mesh):
  image       float32[B, H, W, 3] in [-1, 1] (bilinear resize to the model's resolution)
  text        int32[B, T] token ids: [BOS] prefix "\\n" suffix [EOS] padding
  mask_ar     int32[B, T] 0 = full attention (prefix), 1 = causal (suffix, padding)
  mask_loss   int32[B, T] 1 on suffix + EOS (the supervised tokens)
  mask_input  int32[B, T] 1 = real token, 0 = padding
Order: each epoch is a permutation of all examples seeded by (seed, epoch); global batch s holds
positions [s*B, (s+1)*B) of the concatenated epochs. The order therefore depends on neither the
number of hosts nor where a run was restarted: resuming at step s continues with batch s. Each
process decodes only the rows of the global batch that its devices hold. TensorFlow is kept off
GPUs/TPUs (it is used for input only; see `preprocess`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from paligemma_seg import tokenizer as tokenizer_lib
from paligemma_seg.data import preprocess
from paligemma_seg.data.preprocess import load_image as load_image  # re-exported

BATCH_KEYS = ("image", "text", "mask_ar", "mask_loss", "mask_input")
TEXT_KEYS = ("text", "mask_ar", "mask_loss", "mask_input")
_REQUIRED = ("image", "prefix", "suffix")
_HOW_TO_MAKE = "write it with `python -m paligemma_seg.data.convert` (see data/README.md)"


@dataclasses.dataclass(frozen=True)
class Example:
    """One JSONL line, with the image path made absolute."""

    image: str
    prefix: str
    suffix: str
    mask: str | None
    source: str  # "file.jsonl:LINE", for error messages.


@dataclasses.dataclass(frozen=True)
class TokenTable:
    """A split ready for batching: image paths and the tokenized text of every example."""

    images: np.ndarray  # str[N] absolute paths
    text: np.ndarray  # int32[N, T]
    mask_ar: np.ndarray  # int32[N, T]
    mask_loss: np.ndarray  # int32[N, T]
    mask_input: np.ndarray  # int32[N, T]
    dropped_objects: int  # Whole objects dropped from suffixes to fit seq_len, over the split.

    def __len__(self) -> int:
        return len(self.images)


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Examples of a convert-CLI JSONL file; a bad line or missing image names the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"JSONL file {path} not found; {_HOW_TO_MAKE}.")
    base = os.path.dirname(os.path.abspath(path))
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error}); {_HOW_TO_MAKE}.") from error
            if not isinstance(record, dict) or any(k not in record for k in _REQUIRED):
                got = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{where}: expected an object with keys {list(_REQUIRED)}, got {got}."
                )
            image = os.path.join(base, record["image"])
            if not os.path.isfile(image):
                raise ValueError(
                    f"{where}: image {image} not found (paths are relative to the JSONL's folder)."
                )
            mask = record.get("mask")
            examples.append(
                Example(
                    image=image,
                    prefix=str(record["prefix"]),
                    suffix=str(record["suffix"]),
                    mask=os.path.join(base, mask) if mask else None,
                    source=where,
                )
            )
    if not examples:
        raise ValueError(f"{path} holds no examples; {_HOW_TO_MAKE}.")
    return examples


def tokenize(examples: Sequence[Example], tokenizer: Any, seq_len: int) -> TokenTable:
    """Tokenizes every example once (fixed length `seq_len`); see `tokenizer.tokenize_example`."""
    rows = {key: [] for key in TEXT_KEYS}
    dropped = 0
    for example in examples:
        try:
            tokens = tokenizer_lib.tokenize_example(
                tokenizer, example.prefix, example.suffix, seq_len
            )
        except ValueError as error:
            raise ValueError(f"{example.source}: {error}") from error
        for key in TEXT_KEYS:
            rows[key].append(getattr(tokens, key))
        dropped += tokens.dropped_objects
    arrays = {key: np.stack(value).astype(np.int32) for key, value in rows.items()}
    return TokenTable(
        images=np.array([e.image for e in examples]), dropped_objects=dropped, **arrays
    )


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def example_indices(
    num_examples: int, seed: int, shuffle: bool, start: int, count: int
) -> np.ndarray:
    """Example indices at positions [start, start + count) of the endless per-epoch stream."""
    positions = np.arange(start, start + count)
    out = np.empty(count, np.int64)
    for epoch in np.unique(positions // num_examples):
        here = positions // num_examples == epoch
        out[here] = _epoch_order(num_examples, seed, int(epoch), shuffle)[
            positions[here] % num_examples
        ]
    return out


def _dataset(
    table: TokenTable, indices: tf.data.Dataset, size: int, parallel: int
) -> tf.data.Dataset:
    """Index dataset -> example dicts (image decoded and resized, text looked up)."""
    paths = tf.constant(table.images)
    text = {key: tf.constant(getattr(table, key)) for key in TEXT_KEYS}

    def load(index: tf.Tensor) -> dict[str, tf.Tensor]:
        example = {key: tf.gather(value, index) for key, value in text.items()}
        example["image"] = preprocess.from_bytes(tf.io.read_file(tf.gather(paths, index)), size)
        return example

    return indices.map(load, num_parallel_calls=parallel, deterministic=True)


def _fixed_options() -> tf.data.Options:
    """No autotuning: parallelism and prefetch depth are set by the config. With autotuning on,
    deleting a long-lived iterator waited for tf.data's model thread (8-60 s at the end of
    training, measured with py-spy)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def train_batches(
    table: TokenTable,
    *,
    batch_size: int,
    rows: slice,
    image_size: int,
    seed: int,
    shuffle: bool = True,
    start_step: int = 0,
    num_parallel_calls: int = 4,
    prefetch: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless local batches: rows `rows` of global batches start_step, start_step + 1, ...

    `batch_size` is the global batch; `rows` (`sharding.local_batch_rows`) the rows this process
    feeds.
    """
    local = rows.stop - rows.start

    def step_indices(step: np.ndarray) -> np.ndarray:
        first = int(step) * batch_size + rows.start
        return example_indices(len(table), seed, shuffle, first, local)

    def lookup(step: tf.Tensor) -> tf.Tensor:
        found = tf.numpy_function(step_indices, [step], tf.int64, stateful=False)
        return tf.ensure_shape(found, (local,))

    # A numpy_function per step, not Dataset.from_generator: closing a generator-fed pipeline
    # blocked the end of training for ~30 s (tf.data finalising the Python generator).
    steps = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    indices = steps.map(lookup).unbatch()
    dataset = _dataset(table, indices, image_size, num_parallel_calls)
    dataset = dataset.batch(local, drop_remainder=True).prefetch(prefetch)
    return dataset.with_options(_fixed_options()).as_numpy_iterator()


def eval_batches(
    table: TokenTable,
    *,
    batch_size: int,
    rows: slice,
    image_size: int,
    max_examples: int = 0,
    num_parallel_calls: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass in file order; the last global batch is padded with copies of example 0 whose
    `mask_loss` is 0: every process sees the same number of full batches, padding scores nothing."""
    count = len(table) if max_examples <= 0 else min(max_examples, len(table))
    num_batches = -(-count // batch_size)
    positions = np.concatenate(
        [
            np.arange(b * batch_size + rows.start, b * batch_size + rows.stop)
            for b in range(num_batches)
        ]
    )
    real = positions < count
    indices = tf.data.Dataset.from_tensor_slices(np.where(real, positions, 0).astype(np.int64))
    dataset = _dataset(table, indices, image_size, num_parallel_calls)
    weight = tf.data.Dataset.from_tensor_slices(real.astype(np.int32))

    def mask_padding(example: dict[str, tf.Tensor], keep: tf.Tensor) -> dict[str, tf.Tensor]:
        return {**example, "mask_loss": example["mask_loss"] * keep}

    dataset = tf.data.Dataset.zip(dataset, weight).map(mask_padding)
    dataset = dataset.batch(rows.stop - rows.start).prefetch(2)
    return dataset.with_options(_fixed_options()).as_numpy_iterator()


def to_global(batch: dict[str, np.ndarray], sharding: Any, batch_size: int) -> dict[str, Any]:
    """Process-local rows -> global jax arrays of `batch_size` rows laid out by `sharding`.

    An intended host-to-device copy: allowed even under `jax.transfer_guard("disallow")`
    (multi-process JAX performs it as a batched device_put, which the guard counts as implicit).
    """
    with jax.transfer_guard_host_to_device("allow"):
        return {
            key: jax.make_array_from_process_local_data(
                sharding, batch[key], (batch_size, *batch[key].shape[1:])
            )
            for key in BATCH_KEYS
        }
