"""Scores a split: `run_evaluation` decodes every example of the split's JSONL (prompt = its
prefix), turns each output into a mask at the ground truth's full resolution (the codec), compares
it with the ground-truth mask file as evaluation reads it (`codec.reference_mask`) and writes into
the workdir:
  eval.json            miou (mean per-image IoU, empty vs empty = 1), ciou, dice, precision,
                       recall (see `metrics.py`), valid_rate, object_count_mae/bias, ceiling_miou
                       (the codec's own round trip on the same masks), num_images, step, timings;
  eval_examples.jsonl  per image: output text, IoU, valid, object counts, ceiling IoU;
  contact_sheet.png    image | ground truth | prediction, eval.contact_sheet_rows rows (and
                       contact_sheet_step{STEP}.png when a step is given);
  metrics.jsonl        (only with a step) one line {"step", "eval_miou", ...} for the curves.
The workdir may be local or a bucket (gs://...): every output goes through etils.epath.
The CLI is `python -m paligemma_seg.evaluate`; training calls this every `eval_steps`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from paligemma_seg import metrics
from paligemma_seg.data import prepare, preprocess
from paligemma_seg.infer import segmenter as segmenter_lib
from paligemma_seg.segtokens import codec as codec_lib


def _examples(cfg: ml_collections.ConfigDict, split: str) -> list[Any]:
    """The split's JSONL examples (converted first if missing), at most eval.max_examples."""
    from paligemma_seg.data import pipeline

    path = prepare.split_jsonl(cfg, split)
    if not os.path.isfile(path):
        path = prepare.prepare_data(cfg, (split,))[split]
    examples = pipeline.read_jsonl(path)
    missing = [e.source for e in examples if not e.mask]
    if missing:
        raise ValueError(
            f"{len(missing)} examples of {path} have no 'mask' (first: {missing[0]}); evaluation "
            "needs the ground-truth mask files: re-run the convert CLI."
        )
    limit = int(cfg.eval.max_examples)
    return examples[:limit] if limit > 0 else examples


def _display_path(path: str) -> str:
    """Relative to the working directory when inside it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _write_json(path: epath.Path, value: Any) -> None:
    """Atomically: a temporary file next to `path`, then renamed over it."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def _save_png(image: Any, path: epath.Path) -> None:
    with path.open("wb") as f:
        image.save(f, format="PNG")


def _contact_sheet(rows: list[tuple], workdir: epath.Path, step: int | None) -> str:
    """contact_sheet.png (+ a per-step copy) of (image path, gt, prediction, IoU) rows."""
    from paligemma_seg import visualize
    from paligemma_seg.data import images as images_lib

    sheet_rows = [
        visualize.SheetRow(
            image=images_lib.read_image(image).pixels,
            gt_mask=gt,
            pred_mask=prediction.mask,
            pred_boxes=prediction.boxes,
            caption=f"{os.path.basename(image)}  IoU {iou:.3f}"
            + ("" if prediction.valid else "  (invalid output)"),
        )
        for image, gt, prediction, iou in rows
    ]
    sheet = visualize.contact_sheet(sheet_rows)
    path = workdir / "contact_sheet.png"
    _save_png(sheet, path)
    if step is not None:
        _save_png(sheet, workdir / f"contact_sheet_step{step:06d}.png")
    return os.fspath(path)


def _decode_chunk(segmenter: segmenter_lib.Segmenter, chunk: list[Any]) -> tuple[list, list]:
    """(ground-truth grey masks, predictions at the masks' sizes) of a batch of examples."""
    from paligemma_seg.data import images as images_lib

    greys = [images_lib.read_mask(e.mask).pixels for e in chunk]
    inputs = np.stack([preprocess.load_image(e.image, segmenter.image_size) for e in chunk])
    predictions: list[Any] = [None] * len(chunk)
    for prompt in sorted({e.prefix for e in chunk}):  # one prompt per dataset in practice
        rows = [i for i, e in enumerate(chunk) if e.prefix == prompt]
        outputs = segmenter.predict_inputs(inputs[rows], [greys[i].shape for i in rows], prompt)
        for row, output in zip(rows, outputs, strict=True):
            predictions[row] = output
    return greys, predictions


def _score(
    codec: Any, accumulator: metrics.SegmentationMetrics, example: Any, grey: Any, prediction: Any
) -> dict[str, Any]:
    """Adds one image to `accumulator`; returns its eval_examples.jsonl record."""
    gt_objects = len(codec_lib.parse_suffix(example.suffix))
    gt = codec.reference_mask(grey)
    iou = accumulator.add(prediction.mask, gt, prediction.valid, prediction.objects, gt_objects)
    return {
        "image": _display_path(example.image),
        "text": prediction.text,
        "iou": iou,
        "valid": prediction.valid,
        "objects": prediction.objects,
        "invalid_objects": prediction.invalid_objects,
        "finished": prediction.finished,
        "gt_objects": gt_objects,
        "ceiling_iou": codec.ceiling_iou(grey),
    }


def run_evaluation(
    cfg: ml_collections.ConfigDict,
    model: Any,
    params: Any,
    workdir: str,
    split: str,
    step: int | None = None,
) -> dict[str, Any]:
    """Decodes and scores `split`; writes eval.json, eval_examples.jsonl and the contact sheet.

    Every process decodes (parameters may be sharded over the mesh); process 0 writes the files.
    Returns the eval.json dict.
    """
    start = time.perf_counter()
    examples = _examples(cfg, split)
    segmenter = segmenter_lib.Segmenter(cfg, model, params)
    accumulator = metrics.SegmentationMetrics()
    records, sheet_rows = [], []
    decode_seconds = 0.0
    for first in range(0, len(examples), segmenter.batch_size):
        chunk = examples[first : first + segmenter.batch_size]
        tick = time.perf_counter()
        greys, predictions = _decode_chunk(segmenter, chunk)
        decode_seconds += time.perf_counter() - tick
        for example, grey, prediction in zip(chunk, greys, predictions, strict=True):
            record = _score(segmenter.codec, accumulator, example, grey, prediction)
            records.append(record)
            if len(sheet_rows) < int(cfg.eval.contact_sheet_rows):
                gt = segmenter.codec.reference_mask(grey)
                sheet_rows.append((example.image, gt, prediction, record["iou"]))
    result = {
        "split": split,
        "step": step,
        **accumulator.result(),
        "ceiling_miou": float(np.mean([r["ceiling_iou"] for r in records])) if records else 0.0,
        "invalid_objects": int(sum(r["invalid_objects"] for r in records)),
        "constrained": bool(cfg.decode.constrained),
        "decode_seconds": decode_seconds,
        "seconds": time.perf_counter() - start,
    }
    if jax.process_index() == 0:
        _write_outputs(result, records, sheet_rows, workdir, step)
    return result


def _write_outputs(
    result: dict[str, Any],
    records: list[dict[str, Any]],
    sheet_rows: list[tuple],
    workdir: str,
    step: int | None,
) -> None:
    out = epath.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    result["contact_sheet"] = _contact_sheet(sheet_rows, out, step) if sheet_rows else None
    _write_json(out / "eval.json", result)
    with (out / "eval_examples.jsonl").open("w") as f:
        for record in records:  # (tf.io.gfile's files, behind gs://, have no writelines)
            f.write(json.dumps(record) + "\n")
    if step is not None:
        curve = {"step": step, **{f"eval_{k}": result[k] for k in metrics.METRIC_NAMES}}
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(curve) + "\n")
    logging.info(
        "eval %s (step %s): mIoU %.4f cIoU %.4f valid %.3f ceiling %.4f on %d images -> %s",
        result["split"], step, result["miou"], result["ciou"], result["valid_rate"],
        result["ceiling_miou"], result["num_images"], workdir,
    )  # fmt: skip
