"""Masks for your own images:

    python -m paligemma_seg.predict --config CFG [--checkpoint P] IMAGE_OR_DIR ... --out DIR
        [--prompt "segment water"]

For every image (any size; folders of mixed sizes; unreadable files are reported and skipped) it
writes into --out: `NAME.txt` (the raw output text), `NAME_mask.png` (binary mask at the image's
size, 255 = inside), `NAME_overlay.png` (the image with the translucent mask and the boxes) and one
line of `predictions.jsonl` (--out may be local or a bucket, gs://...: outputs go through
etils.epath). Weights: --checkpoint (an orbax checkpoint dir of training, a
big_vision .npz or a Hugging Face directory), else the config's `init`, else random (a warning).
The engine is `infer.segmenter`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from paligemma_seg import cli
from paligemma_seg.infer import segmenter as segmenter_lib


def collect_images(paths: Sequence[str]) -> list[pathlib.Path]:
    """Files named directly, and the image files (by extension) directly inside named folders."""
    from paligemma_seg.data import images as images_lib

    found: list[pathlib.Path] = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if images_lib.is_image_file(p)))
        else:
            found.append(path)
    return found


def _unique_name(path: pathlib.Path, taken: set[str]) -> str:
    """The file's stem, disambiguated (stem_ext, then a counter) when two inputs share it."""
    name = path.stem
    if name in taken:
        name = f"{path.stem}_{path.suffix.lstrip('.')}"
    base, count = name, 2
    while name in taken:
        name, count = f"{base}_{count}", count + 1
    taken.add(name)
    return name


def _save_png(image: Any, path: epath.Path) -> None:
    with path.open("wb") as f:
        image.save(f, format="PNG")


def write_outputs(
    out: str | os.PathLike, name: str, image: np.ndarray, prediction: segmenter_lib.Prediction
) -> dict[str, Any]:
    """NAME.txt, NAME_mask.png, NAME_overlay.png; returns the predictions.jsonl record's fields."""
    from paligemma_seg import visualize

    out = epath.Path(out)
    (out / f"{name}.txt").write_text(prediction.text + "\n")
    _save_png(visualize.mask_image(prediction.mask), out / f"{name}_mask.png")
    _save_png(
        visualize.overlay(image, prediction.mask, prediction.boxes), out / f"{name}_overlay.png"
    )
    return {
        "name": name,
        "text": prediction.text,
        "mask": f"{name}_mask.png",
        "overlay": f"{name}_overlay.png",
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "objects": prediction.objects,
        "invalid_objects": prediction.invalid_objects,
        "valid": prediction.valid,
        "boxes": [list(box) for box in prediction.boxes],
        "water_fraction": float(prediction.mask.mean()),
    }


def run_prediction(
    segmenter: segmenter_lib.Segmenter, paths: Sequence[str], out: str | os.PathLike, prompt: str
) -> dict[str, int]:
    """Predicts every readable image of `paths` into `out`; returns counts of done and skipped."""
    from paligemma_seg.data import images as images_lib

    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = collect_images(paths)
    taken: set[str] = set()
    done = skipped = 0
    writes = jax.process_index() == 0  # every process decodes its share; one writes
    jsonl_path = out / "predictions.jsonl" if writes else epath.Path(os.devnull)
    with jsonl_path.open("w") as jsonl:
        for start in range(0, len(files), segmenter.batch_size):
            loaded = []
            for path in files[start : start + segmenter.batch_size]:
                try:
                    loaded.append((path, images_lib.read_image(path).pixels))
                except images_lib.ImageReadError as error:
                    print(f"skipped {path}: {error}", file=sys.stderr)
                    jsonl.write(json.dumps({"image": str(path), "error": str(error)}) + "\n")
                    skipped += 1
            if not loaded:
                continue
            predictions = segmenter.predict_images([pixels for _, pixels in loaded], prompt)
            for (path, pixels), prediction in zip(loaded, predictions, strict=True):
                if writes:
                    record = write_outputs(out, _unique_name(path, taken), pixels, prediction)
                    jsonl.write(json.dumps({"image": str(path), **record}) + "\n")
                done += 1
    return {"predicted": done, "skipped": skipped}


USAGE = (
    "usage: python -m paligemma_seg.predict --config CFG [--config.KEY=VALUE ...] "
    "[--checkpoint P] IMAGE_OR_DIR [...] --out DIR [--prompt TEXT]"
)


def main(argv: Sequence[str]) -> int:
    """The CLI; returns the exit status (1: bad arguments, missing files or no image predicted)."""
    cli.start_up()
    try:
        values, paths = cli.parse_flags(
            argv, [("out", "Output directory."), ("prompt", "Prompt (default: data.prefix).")]
        )
        if not paths or not values.out:
            raise ValueError(f"{'no images given' if not paths else '--out is required'}; {USAGE}")
        cfg = values.config
        model, params, mesh = segmenter_lib.load_model(cfg, values.checkpoint)
        with jax.set_mesh(mesh):
            segmenter = segmenter_lib.Segmenter(cfg, model, params)
            counts = run_prediction(segmenter, paths, values.out, values.prompt or cfg.data.prefix)
    except ValueError as error:
        logging.error("%s", error)
        return 1
    print(f"{counts['predicted']} images predicted, {counts['skipped']} skipped -> {values.out}")
    return 0 if counts["predicted"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
