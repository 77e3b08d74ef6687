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
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from paligemma_seg import tokenizer as tokenizer_lib
from paligemma_seg.data import preprocess, tasks
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
    classes: tuple[str, ...] | None = None  # multi-class lines: the labels of the index mask
    coco_image_id: int | None = None  # COCO lines: the image's id in the annotation file
    # (size, absolute path) of the image pre-resized to size x size (`convert --resize`).
    resized: tuple[tuple[int, str], ...] = ()

    def image_at(self, size: int) -> str:
        """The file to feed the model at `size` px: the pre-resized image if there is one."""
        return dict(self.resized).get(size, self.image)


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


def _example(record: Any, base: str, where: str) -> Example:
    """One parsed JSONL line -> Example; ValueError(reason) for a line that can't be used."""
    if not isinstance(record, dict) or any(k not in record for k in _REQUIRED):
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"expected an object with keys {list(_REQUIRED)}, got {got}")
    image = os.path.join(base, str(record["image"]))
    if not os.path.isfile(image):
        raise ValueError(f"image {image} not found (paths are relative to the JSONL's folder)")
    prefix, suffix = str(record["prefix"]), str(record["suffix"])
    problem = tasks.line_problem(prefix, suffix)
    if problem:
        raise ValueError(problem)
    mask, classes = record.get("mask"), record.get("classes")
    resized = _resized(record.get("resized") or {}, base)
    return Example(
        image=image,
        prefix=prefix,
        suffix=suffix,
        mask=os.path.join(base, mask) if mask else None,
        source=where,
        classes=tuple(str(c) for c in classes) if classes else None,
        coco_image_id=record.get("coco_image_id"),
        resized=resized,
    )


def _resized(entry: Any, base: str) -> tuple[tuple[int, str], ...]:
    """A line's `resized` {"224": path} -> ((224, absolute path),); ValueError if malformed."""
    if not isinstance(entry, dict):
        raise ValueError(f"'resized' must map sizes to image paths, got {entry!r}")
    out = []
    for size, path in entry.items():
        if not str(size).isdigit():
            raise ValueError(f"'resized' key {size!r} is not a size in px (e.g. \"224\")")
        full = os.path.join(base, str(path))
        if not os.path.isfile(full):
            raise ValueError(
                f"resized image {full} not found; convert again with --resize {size}, or drop "
                "the line's 'resized' entry"
            )
        out.append((int(size), full))
    return tuple(out)


def read_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False) -> list[Example]:
    """Examples of a JSONL file (ours or another tool's: `image`, `prefix`, `suffix`, optional
    `mask`); each answer's <loc>/<seg> syntax is checked against its prompt (`tasks`).

    Bad lines (not JSON, missing keys, missing image, malformed answer) raise one ValueError that
    lists every one by file:line; with `skip_bad_lines` they are logged, each by file:line, and
    left out."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"JSONL file {path} not found; {_HOW_TO_MAKE}.")
    base = os.path.dirname(os.path.abspath(path))
    examples, bad = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                examples.append(_example(json.loads(line), base, where))
            except json.JSONDecodeError as error:
                bad.append(f"{where}: not valid JSON ({error})")
            except ValueError as error:
                bad.append(f"{where}: {error}")
    if bad and not skip_bad_lines:
        shown = "\n  ".join(bad[:20]) + (
            f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        )
        raise ValueError(
            f"{len(bad)} bad line(s) in {path}:\n  {shown}\nFix them, or leave them out with "
            "--config.data.skip_bad_lines=True (each is then logged)."
        )
    for problem in bad:
        logging.warning("left out: %s", problem)
    if not examples:
        raise ValueError(f"{path} holds no examples; {_HOW_TO_MAKE}.")
    return examples


def expand(
    examples: Sequence[Example],
    *,
    prompts: str = "joint",
    negative_rate: float = 0.0,
    task_names: Sequence[str] = ("segment",),
    seed: int = 0,
) -> list[Example]:
    """The training examples of JSONL lines: per-class or joint prompts, detection (`tasks`)."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for example in examples:
        for question in tasks.questions(
            example.prefix, example.suffix, example.classes, prompts=prompts,
            negative_rate=negative_rate, tasks=task_names, rng=rng,
        ):  # fmt: skip
            out.append(dataclasses.replace(example, prefix=question.prefix, suffix=question.suffix))
    return out


def mix(sources: Sequence[Sequence[Example]], weights: Sequence[float], seed: int) -> list[Example]:
    """One epoch of a weighted mixture (`tasks.mixture_indices`): examples repeated or subsampled
    so that source i makes a weights[i] / sum(weights) share of the examples."""
    chosen = tasks.mixture_indices([len(s) for s in sources], weights, seed)
    return [source[int(i)] for source, picks in zip(sources, chosen, strict=True) for i in picks]


def tokenize(
    examples: Sequence[Example], tokenizer: Any, seq_len: int, image_size: int | None = None
) -> TokenTable:
    """Tokenizes every example once (fixed length `seq_len`); see `tokenizer.tokenize_example`.

    The table's images are those to feed at `image_size` px (`Example.image_at`): pre-resized
    images where the JSONL has them, else the originals (also when `image_size` is None)."""
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
    at = lambda e: e.image if image_size is None else e.image_at(image_size)
    return TokenTable(
        images=np.array([at(e) for e in examples]),
        dropped_objects=dropped,
        **arrays,
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
