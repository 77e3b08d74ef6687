"""Benchmark the convert CLI: masks/s and the ratio to only decoding the same files (the floor).

    python scripts/bench_convert.py [--images DIR --masks DIR] [--codec checkpoints/vqvae_small.npz]

The floor decodes every image and mask file once with PIL in one process. Convert runs after a
warm-up (JIT compilation excluded), with and without the ceiling IoU; each time is the best of
--repeats wall-clock runs. A per-stage breakdown (one process) shows where the time goes. The load
average is printed too: on a shared machine wall times grow with it.
"""

from __future__ import annotations

import argparse
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

WATER = REPO.parent / "shared" / "data" / "water_bodies"


def _timed(fn, repeats: int) -> float:
    """Best wall-clock seconds of `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _pairs(images: pathlib.Path, masks: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
    listing = convert_lib.find_pairs(images, masks)
    return [(pathlib.Path(p.image), pathlib.Path(p.mask)) for p in listing.pairs if not p.problem]


def _floor(pairs) -> None:
    for image, mask in pairs:
        for path in (image, mask):
            with Image.open(path) as file:
                file.load()


def _stages(pairs, mask_codec) -> dict[str, float]:
    """Seconds of each convert stage, run one after the other in this process."""
    from paligemma_seg.segtokens import codec

    times: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        times[name], start = time.perf_counter() - start, time.perf_counter()

    masks = []
    for image, mask in pairs:
        image_io.inspect_image(image)
        masks.append(image_io.read_mask(mask).pixels)
    lap("check image (1/8-scale decode) + read mask")
    objects = [codec.to_objects(m, mask_codec.config) for m in masks]
    lap("threshold + objects + crops")
    crops = np.concatenate([o.crops for o in objects])
    codes = mask_codec.vqvae.encode(crops)
    lap(f"VQ-VAE encode ({len(crops)} crops)")
    mask_codec.vqvae.decode(codes)
    lap(f"VQ-VAE decode ({len(crops)} crops, ceiling only)")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=pathlib.Path, default=WATER / "images")
    parser.add_argument("--masks", type=pathlib.Path, default=WATER / "masks")
    parser.add_argument("--codec", default=convert_lib.DEFAULT_CODEC)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    pairs = _pairs(args.images, args.masks)
    mask_codec = convert_lib.load_codec(args.codec)
    mask_codec.vqvae.decode(mask_codec.vqvae.encode(np.zeros((130, 64, 64, 1), np.float32)))  # JIT
    floor = _timed(lambda: _floor(pairs), args.repeats)
    print(f"{len(pairs)} pairs, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"floor (PIL decode of images + masks): {floor:.2f} s, {len(pairs) / floor:.0f} pairs/s")
    with tempfile.TemporaryDirectory() as out:
        for ceiling in (False, True):

            def run(ceiling: bool = ceiling) -> None:
                convert_lib.convert(
                    args.images,
                    args.masks,
                    out,
                    codec=mask_codec,
                    workers=args.workers,
                    ceiling=ceiling,
                    progress=False,
                )

            wall = _timed(run, args.repeats)
            print(
                f"convert, ceiling {'on' if ceiling else 'off'}: {wall:.2f} s, "
                f"{len(pairs) / wall:.1f} masks/s, {wall / floor:.2f}x the floor"
            )
    for stage, seconds in _stages(pairs, mask_codec).items():
        print(f"  one process: {stage}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
