"""Scores a split: `run_evaluation` decodes every example of the split's JSONL (prompt = its
prefix), turns each output into a mask at the ground truth's full resolution (the codec), compares
it with the ground-truth mask file as evaluation reads it (`codec.reference_mask`) and writes into
the workdir:
  eval.json            miou (mean per-image IoU, empty vs empty = 1), miou_nonempty (over images
                       with water in the ground truth), ciou, dice, precision,
                       recall (see `metrics.py`), valid_rate, object_count_mae/bias, ceiling_miou
                       (the codec's own round trip on the same masks), num_images, step, timings;
                       for multi-class data also per_class_iou, per_class_image_iou and
                       miou_classes (`metrics.ClassIoU`; the per-image numbers are then over the
                       union of the classes); mask_ap, mask_ap50, mask_ap75, box_ap, box_ap50,
                       box_ap75 and num_instances (`metrics.InstanceAP`, COCOeval on the decoded
                       objects against the ground-truth instances of `_instances`; every object
                       scores 1.0, so AP is of the decoder's one operating point);
  eval_examples.jsonl  per image: output text, IoU, valid, object counts, ceiling IoU;
  contact_sheet.png    image | ground truth | prediction, eval.contact_sheet_rows rows (and
                       contact_sheet_step{STEP}.png when a step is given);
  metrics.jsonl        (only with a step) one line {"step", "eval_miou", ...} for the curves.
The workdir may be local or a bucket (gs://...): every output goes through etils.epath.
The CLI is `python -m paligemma_seg.evaluate`; training calls this every `eval_steps`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
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


def _examples(cfg: ml_collections.ConfigDict, split: str) -> tuple[list[Any], str]:
    """(the split's JSONL examples, at most eval.max_examples; the JSONL's path), converted
    first if missing."""
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
    return (examples[:limit] if limit > 0 else examples), path


def stored_ceilings(
    jsonl: str, split: str, examples: list[Any], codec: Any, vqvae_path: str
) -> list[float] | None:
    """Each example's ceiling IoU as convert measured it (report.json beside the JSONL), or None
    when the report cannot vouch for them: missing or unreadable, measured with another codec
    configuration or VQ-VAE file content, without ceilings (--no-ceiling), multi-class lines
    (their per-class ceilings are computed here), or entries that do not line up with the lines.

    The report's value is IoU(decoded suffix, reference mask) of the line's own suffix, the
    same number `codec.ceiling_iou` recomputes (rounded to 6 decimals)."""
    from paligemma_seg.data import convert

    try:
        with open(os.path.join(os.path.dirname(jsonl), "report.json")) as f:
            report = json.load(f)
        settings, entries = report["settings"], report["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    made = settings.get("vqvae") or {}
    if settings.get("codec") != dataclasses.asdict(codec.config) or not made.get("sha256"):
        return None
    if not os.path.isfile(vqvae_path) or convert.file_sha256(vqvae_path) != made["sha256"]:
        return None
    rows = [e for e in entries if e.get("split") == split and e.get("problem") is None]
    if len(rows) < len(examples) or any(e.classes for e in examples):
        return None
    values = []
    for example, row in zip(examples, rows, strict=False):
        shown = os.path.basename(example.image)  # the image, or its plain copy NAME.png
        if row.get("ceiling_iou") is None or shown not in (row["image"], row["image"] + ".png"):
            return None
        values.append(float(row["ceiling_iou"]))
    return values


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


def _prompts(cfg: ml_collections.ConfigDict, example: Any) -> list[str]:
    """The prompts an example is asked: its own, or one per class under data.prompts='per_class'."""
    classes = example.classes or ()
    if len(classes) > 1 and cfg.data.get("prompts", "joint") == "per_class":
        return [f"segment {label}" for label in classes]
    return [example.prefix]


def _merged(outputs: list[Any]) -> Any:
    """One Prediction of the answers to several prompts of one image (per-class prompts)."""
    if len(outputs) == 1:
        return outputs[0]
    mask = np.zeros_like(outputs[0].mask)
    for output in outputs:
        mask |= output.mask
    return segmenter_lib.Prediction(
        text=" | ".join(o.text for o in outputs),
        mask=mask,
        boxes=[b for o in outputs for b in o.boxes],
        objects=sum(o.objects for o in outputs),
        invalid_objects=sum(o.invalid_objects for o in outputs),
        finished=all(o.finished for o in outputs),
        labels=[label for o in outputs for label in o.labels],
        object_masks=[m for o in outputs for m in o.object_masks],
    )


def _truth(example: Any) -> np.ndarray:
    """Grey levels of a binary mask, or the index mask of a multi-class line (`data.classes`)."""
    from paligemma_seg.data import classes as classes_lib
    from paligemma_seg.data import images as images_lib

    if example.classes:
        return classes_lib.read_index_mask(example.mask)
    return images_lib.read_mask(example.mask).pixels


def _reader_threads() -> int:
    """Threads that read evaluation images and masks: the usable cores, at least 2."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(2, cores or 1)


def _read_chunk(
    pool: concurrent.futures.Executor, chunk: list[Any], size: int
) -> tuple[list, np.ndarray]:
    """(ground truths, model inputs [B, size, size, 3]) of a batch of examples, read in `pool`'s
    threads (PIL and TensorFlow decode without the GIL); pre-resized images where the JSONL has
    them (`Example.image_at`)."""
    truths = pool.map(_truth, chunk)
    inputs = pool.map(lambda e: preprocess.load_image(e.image_at(size), size), chunk)
    return list(truths), np.stack(list(inputs))


def _decode_chunk(
    segmenter: segmenter_lib.Segmenter, chunk: list[Any], read: tuple[list, np.ndarray]
) -> tuple[list, list]:
    """(ground truths, predictions at their sizes) of a batch of examples, read by `_read_chunk`."""
    truths, inputs = read
    asked = [_prompts(segmenter.cfg, e) for e in chunk]
    answers: list[list[Any]] = [[] for _ in chunk]
    for prompt in sorted({p for prompts in asked for p in prompts}):  # few prompts per dataset
        rows = [i for i, prompts in enumerate(asked) if prompt in prompts]
        outputs = segmenter.predict_inputs(inputs[rows], [truths[i].shape for i in rows], prompt)
        for row, output in zip(rows, outputs, strict=True):
            answers[row].append(output)
    return truths, [_merged(a) for a in answers]


def _score(
    codec: Any,
    accumulator: metrics.SegmentationMetrics,
    example: Any,
    truth: Any,
    prediction: Any,
    classes: metrics.ClassIoU | None = None,
    ceiling: float | None = None,
) -> dict[str, Any]:
    """Adds one image to `accumulator` (and, for multi-class lines, each class to `classes`);
    returns its eval_examples.jsonl record. `ceiling`: the codec's ceiling IoU on this image
    when known (`stored_ceilings`); None = computed here."""
    from paligemma_seg.data.classes import IGNORE

    gt_objects = len(codec_lib.parse_suffix(example.suffix))
    extra: dict[str, Any] = {}
    if example.classes:
        scored = truth != IGNORE
        gt = (truth >= 1) & (truth <= len(example.classes))
        predicted = prediction.mask & scored
        extra["class_iou"] = {
            label: classes.add(label, prediction.class_mask(label) & scored, truth == k)
            for k, label in enumerate(example.classes, start=1)
        }
        ceiling = _class_ceiling(codec, truth, example.classes) if ceiling is None else ceiling
    else:
        gt, predicted = codec.reference_mask(truth), prediction.mask
        ceiling = codec.ceiling_iou(truth) if ceiling is None else ceiling
    iou = accumulator.add(predicted, gt, prediction.valid, prediction.objects, gt_objects)
    return {
        "image": _display_path(example.image),
        "text": prediction.text,
        "iou": iou,
        "valid": prediction.valid,
        "objects": prediction.objects,
        "invalid_objects": prediction.invalid_objects,
        "finished": prediction.finished,
        "gt_objects": gt_objects,
        "ceiling_iou": ceiling,
        **extra,
    }


def _parts(binary: np.ndarray, config: Any) -> list[np.ndarray]:
    """One class's ground-truth instances as the converter cuts objects (`codec.to_objects`): the
    whole mask with codec.whole_mask, else its connected parts (codec.connectivity); unlike the
    converter, nothing is cleaned away or capped at max_objects (the truth, not the encoding)."""
    from scipy import ndimage

    if not binary.any():
        return []
    if config.whole_mask:
        return [binary]
    structure = ndimage.generate_binary_structure(2, 1 if config.connectivity == 4 else 2)
    parts, count = ndimage.label(binary, structure)
    return [parts == k for k in range(1, count + 1)]


@functools.lru_cache(maxsize=4)
def _coco_images(path: str) -> dict[int, Any]:
    """The image records of a COCO file by id (read once per evaluation)."""
    from paligemma_seg.data import coco as coco_lib

    return {image.id: image for image in coco_lib.read_coco(path).images.values()}


def _instances(
    cfg: ml_collections.ConfigDict, split: str, codec: Any, example: Any, truth: np.ndarray
) -> tuple[list[np.ndarray], list[str], list[bool]]:
    """(masks, labels, crowd flags) of an image's ground-truth instances for instance AP.

    COCO lines: the annotations of data.coco[split] (crowd regions flagged); class-id masks: the
    parts of each class (`_parts`), ignored pixels one crowd region per class; binary masks: the
    parts of the reference mask, labelled with the prompt's label.
    """
    from paligemma_seg.data import coco as coco_lib
    from paligemma_seg.data.classes import IGNORE

    coco = cfg.data.get("coco", None)
    if example.coco_image_id is not None and coco and split in coco:
        image = _coco_images(os.path.abspath(coco[split]))[example.coco_image_id]
        found = coco_lib.decode(image)[0]
        return list(found.masks), list(found.labels), [bool(c) for c in found.crowd]
    masks, labels, crowd = [], [], []
    if example.classes:
        for k, label in enumerate(example.classes, start=1):
            parts = _parts(truth == k, codec.config)
            masks += parts
            labels += [label] * len(parts)
            crowd += [False] * len(parts)
        if (truth == IGNORE).any():
            masks += [truth == IGNORE] * len(example.classes)
            labels += list(example.classes)
            crowd += [True] * len(example.classes)
        return masks, labels, crowd
    prompt = segmenter_lib.prompt_labels(example.prefix, codec.config.label)[1]
    parts = _parts(codec.reference_mask(truth), codec.config)
    label = prompt[0] if prompt else codec.config.label
    return parts, [label] * len(parts), [False] * len(parts)


def _class_ceiling(codec: Any, index: np.ndarray, labels: tuple[str, ...]) -> float:
    """Mean over the classes in the ground truth of each class mask's codec round trip."""
    values = [
        codec.ceiling_iou(index == k) for k in range(1, len(labels) + 1) if (index == k).any()
    ]
    return float(np.mean(values)) if values else 1.0


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
    examples, jsonl = _examples(cfg, split)
    segmenter = segmenter_lib.Segmenter(cfg, model, params)
    ceilings = stored_ceilings(jsonl, split, examples, segmenter.codec, cfg.codec.vqvae)
    logging.info(
        "eval %s: codec ceilings %s", split,
        "from report.json" if ceilings else "computed (report.json cannot vouch for them)",
    )  # fmt: skip
    accumulator = metrics.SegmentationMetrics()
    labels = next((e.classes for e in examples if e.classes), None)
    classes = metrics.ClassIoU(tuple(labels)) if labels else None
    instances = metrics.InstanceAP(list(labels or ()))
    records, sheet_rows = [], []
    decode_seconds = 0.0
    size, step_rows = segmenter.image_size, segmenter.batch_size
    chunks = [examples[i : i + step_rows] for i in range(0, len(examples), step_rows)]
    with (
        concurrent.futures.ThreadPoolExecutor(_reader_threads()) as pool,
        concurrent.futures.ThreadPoolExecutor(1) as prefetch,
    ):
        # The next chunk's files are read (in `pool`) while this one decodes on the device.
        read_ahead = lambda i: prefetch.submit(_read_chunk, pool, chunks[i], size)
        ahead = read_ahead(0) if chunks else None
        for index, chunk in enumerate(chunks):
            read = ahead.result()
            ahead = read_ahead(index + 1) if index + 1 < len(chunks) else None
            tick = time.perf_counter()
            truths, predictions = _decode_chunk(segmenter, chunk, read)
            decode_seconds += time.perf_counter() - tick
            stored = [None] * len(chunk) if ceilings is None else ceilings[index * step_rows :]
            for example, truth, prediction, ceiling in zip(
                chunk, truths, predictions, stored[: len(chunk)], strict=True
            ):
                record = _score(
                    segmenter.codec, accumulator, example, truth, prediction, classes, ceiling
                )
                records.append(record)
                gt_masks, gt_labels, crowd = _instances(cfg, split, segmenter.codec, example, truth)
                instances.add(
                    gt_masks, gt_labels, prediction.object_masks, prediction.labels,
                    prediction.boxes, crowd, shape=truth.shape[:2],
                )  # fmt: skip
                if len(sheet_rows) < int(cfg.eval.contact_sheet_rows):
                    gt = (truth > 0) if example.classes else segmenter.codec.reference_mask(truth)
                    sheet_rows.append((example.image, gt, prediction, record["iou"]))
    result = {
        "split": split,
        "step": step,
        **accumulator.result(),
        **(classes.result() if classes else {}),
        **instances.result(),
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
