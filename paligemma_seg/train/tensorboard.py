"""TensorBoard event files beside metrics.jsonl: `tensorboard --logdir runs/` shows every run.

Scalars are the metrics.jsonl records (loss, lr, grad_norm, examples_per_s, val_loss, eval_*) under
their own names; the evaluation's contact sheet is an image. Written with TensorFlow's own
`tf.summary.write` and the scalar/image plugins' metadata, so training needs no `tensorboard`
package (viewing does: `pip install tensorboard`); by process 0 only, flushed after every write,
into the workdir (local or gs://).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

_SKIPPED = ("step",)


def _metadata(plugin: str, data_class: str) -> Any:
    """What TensorBoard's scalar / image plugins attach to their summaries."""
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
        data_class=getattr(summary_pb2, data_class),
    )


class EventWriter:
    """tf.summary scalars and images in `logdir`; a no-op on processes other than 0."""

    def __init__(self, logdir: str | os.PathLike):
        self._writer = None
        if jax.process_index() == 0:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(os.fspath(logdir))

    def scalars(self, record: dict[str, Any]) -> None:
        """Every finite number of a metrics record, at its "step"."""
        if self._writer is None:
            return
        import tensorflow as tf

        metadata = _metadata("scalars", "DATA_CLASS_SCALAR")
        with self._writer.as_default(step=int(record["step"])):
            for name, value in record.items():
                if (
                    name in _SKIPPED
                    or isinstance(value, bool)
                    or not isinstance(value, int | float)
                ):
                    continue
                if np.isfinite(value):
                    tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=metadata)
        self._writer.flush()

    def image(self, name: str, png_path: str | None, step: int) -> None:
        """A PNG file (e.g. the contact sheet) as an image summary."""
        if self._writer is None or not png_path:
            return
        import tensorflow as tf

        with tf.io.gfile.GFile(png_path, "rb") as f:
            png = f.read()
        height, width = _png_size(png)
        tensor = tf.constant([str(width), str(height), png])  # the image plugin's layout
        with self._writer.as_default(step=step):
            tf.summary.write(name, tensor, metadata=_metadata("images", "DATA_CLASS_BLOB_SEQUENCE"))
        self._writer.flush()

    def evaluation(self, result: dict[str, Any], step: int) -> None:
        """An evaluation's headline numbers (as eval_*) and its contact sheet."""
        numbers = {f"eval_{k}": v for k, v in result.items() if k in ("miou", "ciou", "dice")}
        self.scalars({"step": step, **numbers})
        self.image("contact_sheet", result.get("contact_sheet"), step)

    def close(self) -> None:
        """Flushes and closes the event file."""
        if self._writer is not None:
            self._writer.close()


def _png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    return int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big")
