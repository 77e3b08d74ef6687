"""Benchmark the convert CLI: masks/s and the ratio to only decoding the same files (the floor).

    python scripts/bench_convert.py [--images DIR --masks DIR] [--codec checkpoints/vqvae_small.npz]

The floor decodes every image and mask file once, in full, with PIL in one process. Convert runs
after a warm-up (JIT compilation and the fork server's start excluded), with and without the ceiling
IoU; floor and convert runs alternate and each figure is the best of --repeats wall-clock runs, so
the ratios compare runs under the same load. CPU-seconds (convert with one worker, in this process,
JAX threads included) are the work itself: on N free cores no wall ratio can beat CPU ratio / N. A
per-stage breakdown (one process) shows where that work goes. The last line is JSON:
{"masks_per_s", "floor_masks_per_s", "ratio", "ratio_with_ceiling", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from paligemma_seg.data import convert as convert_lib  # noqa: E402
from paligemma_seg.data import images as image_io  # noqa: E402
from paligemma_seg.data import pairs as pairs_lib  # noqa: E402

WATER = REPO.parent / "shared" / "data" / "water_bodies"


def _clock(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _pairs(images: pathlib.Path, masks: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
    listing = pairs_lib.find_pairs(images, masks)
    return [(pathlib.Path(p.image), pathlib.Path(p.mask)) for p in listing.pairs if not p.problem]


def _floor(pairs) -> None:
    for image, mask in pairs:
        for path in (image, mask):
            with Image.open(path) as file:
                file.load()


def _stages(pairs, mask_codec) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of each convert stage, run one after the other in this process."""
    from paligemma_seg.segtokens import codec

    times: dict[str, tuple[float, float]] = {}
    clock = [time.perf_counter(), time.process_time()]

    def lap(name: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        times[name] = (now[0] - clock[0], now[1] - clock[1])
        clock[:] = now

    masks = []
    for image, _ in pairs:
        image_io.inspect_image(image)
    lap("check image (1/8-scale JPEG decode)")
    for _, mask in pairs:
        masks.append(image_io.read_mask(mask).pixels)
    lap("read mask (full decode)")
    objects = [codec.to_objects(m, mask_codec.config) for m in masks]
    lap("threshold + objects + crops (codec.to_objects)")
    crops = np.concatenate([o.crops for o in objects])
    batch = convert_lib.ENCODE_BATCH
    codes = np.concatenate(
        [
            convert_lib._padded(mask_codec.vqvae.encode, crops[i : i + batch])
            for i in range(0, len(crops), batch)
        ]
    )
    lap(f"VQ-VAE encode ({len(crops)} crops)")
    unique = np.unique(codes, axis=0)
    for i in range(0, len(unique), batch):
        convert_lib._padded(mask_codec.vqvae.decode, unique[i : i + batch])
    lap(f"VQ-VAE decode ({len(unique)} distinct codes, ceiling only)")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=pathlib.Path, default=WATER / "images")
    parser.add_argument("--masks", type=pathlib.Path, default=WATER / "masks")
    parser.add_argument("--codec", default=convert_lib.DEFAULT_CODEC)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pairs = _pairs(args.images, args.masks)
    mask_codec = convert_lib.load_codec(args.codec)
    warm = np.zeros((convert_lib.ENCODE_BATCH, 64, 64, 1), np.float32)
    mask_codec.vqvae.decode(mask_codec.vqvae.encode(warm))  # JIT: convert uses this shape only

    with tempfile.TemporaryDirectory() as out:

        def run(ceiling: bool, workers: int | None = args.workers) -> None:
            convert_lib.convert(
                args.images,
                args.masks,
                out,
                codec=mask_codec,
                workers=workers,
                ceiling=ceiling,
                progress=False,
            )

        run(ceiling=False)  # starts the fork server
        best = {"floor": np.inf, "off": np.inf, "on": np.inf}
        for _ in range(args.repeats):
            best["floor"] = min(best["floor"], _clock(lambda: _floor(pairs))[0])
            best["off"] = min(best["off"], _clock(lambda: run(ceiling=False))[0])
            best["on"] = min(best["on"], _clock(lambda: run(ceiling=True))[0])
        cpu = {
            "floor": _clock(lambda: _floor(pairs))[1],
            "off": _clock(lambda: run(ceiling=False, workers=1))[1],
            "on": _clock(lambda: run(ceiling=True, workers=1))[1],
        }
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    floor = best["floor"]
    print(f"{len(pairs)} pairs, load average {os.getloadavg()[0]:.1f} on {cores} cores")
    print(f"floor (PIL decode of images + masks): {floor:.2f} s, {len(pairs) / floor:.0f} masks/s")
    for key in ("off", "on"):
        print(
            f"convert, ceiling {key}: {best[key]:.2f} s, {len(pairs) / best[key]:.1f} masks/s, "
            f"{best[key] / floor:.2f}x the floor; CPU {cpu[key]:.2f} s with one worker "
            f"= {cpu[key] / cpu['floor']:.2f}x the floor's {cpu['floor']:.2f} CPU-s"
        )
    for stage, (wall, seconds) in _stages(pairs, mask_codec).items():
        print(f"  one process: {stage}: {wall:.2f} s wall, {seconds:.2f} CPU-s")
    result = {
        "masks_per_s": round(len(pairs) / best["off"], 2),
        "floor_masks_per_s": round(len(pairs) / floor, 2),
        "ratio": round(best["off"] / floor, 3),
        "ratio_with_ceiling": round(best["on"] / floor, 3),
        "masks_per_s_with_ceiling": round(len(pairs) / best["on"], 2),
        "cpu_ratio": round(cpu["off"] / cpu["floor"], 3),
        "cpu_ratio_with_ceiling": round(cpu["on"] / cpu["floor"], 3),
        "load_average": round(os.getloadavg()[0], 2),
        "cores": cores,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
