"""Masks for your own images:

    python -m paligemma_seg.predict [--config CFG] [--checkpoint P | --workdir W] IMAGE_OR_DIR ...
        --out DIR [--prompt "segment water"]

For every image (any size; folders of mixed sizes; unreadable files are reported and skipped) it
writes into --out: `NAME.txt` (the raw output text), `NAME_mask.png` (binary mask at the image's
size, 255 = inside; for answers with several classes also `NAME_mask_<label>.png` per class and
`NAME_index.png`, value k = the k-th label of the record's `classes`), `NAME_overlay.png` (the
image with the translucent mask and the boxes) and one
line of `predictions.jsonl` (--out may be local or a bucket, gs://...: outputs go through
etils.epath). Weights: --checkpoint or --workdir (a training workdir: its newest
checkpoint, else params.npz; an orbax checkpoint dir, a big_vision .npz or a Hugging Face
directory), else the config's `init`, else random (a warning). Without --config, the config.json
that training wrote beside the weights. The weights file used is logged.
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
from PIL import Image

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


def _file_label(label: str) -> str:
    """A label as a file-name part: letters, digits, '-' and '_' kept, the rest '_'."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


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
    labels = list(dict.fromkeys(prediction.labels))
    if len(labels) > 1:  # several classes: one mask each and an index mask (value k = labels[k-1])
        index = np.zeros(prediction.mask.shape, np.uint8)
        for k, label in enumerate(labels, start=1):
            own = prediction.class_mask(label)
            _save_png(visualize.mask_image(own), out / f"{name}_mask_{_file_label(label)}.png")
            index[own & (index == 0)] = k
        _save_png(Image.fromarray(index, mode="L"), out / f"{name}_index.png")
    return {
        "name": name,
        "text": prediction.text,
        "mask": f"{name}_mask.png",
        "overlay": f"{name}_overlay.png",
        "labels": list(prediction.labels),
        "classes": {f"{name}_mask_{_file_label(label)}.png": label for label in labels}
        if len(labels) > 1
        else {},
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "objects": prediction.objects,
        "invalid_objects": prediction.invalid_objects,
        "valid": prediction.valid,
        "boxes": [list(box) for box in prediction.boxes],
        "water_fraction": float(prediction.mask.mean()),
    }


def _tiled_files(
    files: list[pathlib.Path], tiling: dict[str, Any], model_side: int
) -> list[tuple[pathlib.Path, int]]:
    """(file, tile side) of the files predicted tile by tile (--tile N, or auto's choice)."""
    from paligemma_seg.data import geo
    from paligemma_seg.infer import scenes as scenes_lib

    tile = tiling["tile"]
    if tile == "auto":
        from PIL import Image

        chosen = []
        for path in files:
            if geo.is_raster_file(path):
                chosen.append((path, model_side))
                continue
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except Exception:  # unreadable: the whole-image path reports it
                continue
            side = scenes_lib.auto_tile(str(path), height, width, model_side)
            if side:
                chosen.append((path, side))
        return chosen
    side = int(tile)
    return [(path, side) for path in files] if side > 0 else []


def run_prediction(
    segmenter: segmenter_lib.Segmenter,
    paths: Sequence[str],
    out: str | os.PathLike,
    prompt: str,
    tiling: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Predicts every readable image of `paths` into `out`; returns counts of done and skipped.

    tiling: {"tile": "auto" | N (0 = whole image), "overlap", "radiometry"} (infer.scenes)."""
    from paligemma_seg.data import images as images_lib

    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = collect_images(paths)
    taken: set[str] = set()
    done = skipped = 0
    writes = jax.process_index() == 0  # every process decodes its share; one writes
    jsonl_path = out / "predictions.jsonl" if writes else epath.Path(os.devnull)
    tiling = tiling or {"tile": "auto", "overlap": 0.25, "radiometry": None}
    tiled = _tiled_files(files, tiling, segmenter.image_size)
    files = [path for path in files if path not in dict(tiled)]
    with jsonl_path.open("w") as jsonl:
        for path, side in tiled:
            from paligemma_seg.data import scenes as scene_readers
            from paligemma_seg.infer import scenes as scenes_lib

            record = scenes_lib.predict_scene(
                segmenter, str(path), str(out), _unique_name(path, taken), prompt, side,
                tiling["overlap"], tiling["radiometry"] or scene_readers.Radiometry(),
                progress=sys.stderr.isatty(), wgs84=tiling.get("wgs84", False),
            )  # fmt: skip
            jsonl.write(json.dumps({"image": str(path), **record}) + "\n")
            done += 1
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
    "usage: python -m paligemma_seg.predict [--config CFG] [--config.KEY=VALUE ...] "
    "[--checkpoint P | --workdir W] IMAGE_OR_DIR [...] --out DIR [--prompt TEXT]"
)


def workdir_config(values: Any) -> tuple[Any, str | None]:
    """(config, weights path) of --config and --checkpoint/--workdir: without --config, the
    config.json that training wrote beside the weights."""
    from paligemma_seg.infer import pretrained, sources

    checkpoint = values.checkpoint or values.workdir
    if values.config is not None:
        return values.config, checkpoint
    if not checkpoint:
        raise ValueError(f"pass --config, or --workdir/--checkpoint of a training run; {USAGE}")
    return pretrained.run_config(sources.resolve(checkpoint), None), checkpoint


def _tiling(values: Any) -> dict[str, Any]:
    """The tiling flags as run_prediction's `tiling`; ValueError naming a bad flag."""
    from paligemma_seg.data import scenes

    tile = values.tile or "auto"
    if tile != "auto" and not (tile.isdigit()):
        raise ValueError(f"--tile {tile!r}: give auto, 0 (whole image) or a side in pixels")
    radiometry = scenes.Radiometry(
        scenes.parse_bands(values.bands),
        scenes.parse_pair(values.stretch, "--stretch"),
        scenes.parse_pair(values.scale, "--scale"),
    )
    overlap = float(values.overlap) if values.overlap else 0.25
    geojson_crs = (values.geojson_crs or "input").upper()
    if geojson_crs not in ("INPUT", "EPSG:4326"):
        raise ValueError(f"--geojson_crs {values.geojson_crs!r}: give input or EPSG:4326")
    wgs84 = geojson_crs == "EPSG:4326"
    return {"tile": tile, "overlap": overlap, "radiometry": radiometry, "wgs84": wgs84}


def main(argv: Sequence[str]) -> int:
    """The CLI; returns the exit status (1: bad arguments, missing files or no image predicted)."""
    cli.start_up()
    try:
        values, paths = cli.parse_flags(
            argv,
            [
                ("out", "Output directory."),
                ("prompt", "Prompt (default: data.prefix)."),
                ("workdir", "Training workdir: its newest checkpoint, else params.npz."),
                ("tile", "Tile side in px: auto (default), 0 = whole image, or N."),
                ("overlap", "Overlap of neighbouring tiles, a fraction (default 0.25)."),
                ("bands", "Raster bands as R,G,B (1-based), e.g. 4,3,2."),
                ("stretch", "Per-band percentiles LOW,HIGH mapped to 0..255, e.g. 2,98."),
                ("scale", "Fixed band values LOW,HIGH mapped to 0..255, e.g. 0,3000."),
                ("geojson_crs", "NAME.geojson's CRS: input (default, the scene's) or EPSG:4326."),
            ],
            config_required=False,
        )
        if not paths or not values.out:
            raise ValueError(f"{'no images given' if not paths else '--out is required'}; {USAGE}")
        cfg, checkpoint = workdir_config(values)
        model, params, mesh = segmenter_lib.load_model(cfg, checkpoint)
        with jax.set_mesh(mesh):
            segmenter = segmenter_lib.Segmenter(cfg, model, params)
            counts = run_prediction(
                segmenter, paths, values.out, values.prompt or cfg.data.prefix, _tiling(values)
            )
    except ValueError as error:
        logging.error("%s", error)
        return 1
    print(f"{counts['predicted']} images predicted, {counts['skipped']} skipped -> {values.out}")
    return 0 if counts["predicted"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
