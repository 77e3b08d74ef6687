"""Ceiling mIoU of the mask codec on a folder of masks, for one or several codec options.

    python scripts/codec_ceiling.py --masks ../shared/data/water_bodies/masks \
        --list ../shared/data/water_bodies/test_images.txt --vqvae checkpoints/vqvae_small.npz
    python scripts/codec_ceiling.py ... --sweep            # the table used to choose the defaults
    python scripts/codec_ceiling.py ... --vqvae bilinear   # no VQ-VAE: the 64x64 crop itself
    python scripts/codec_ceiling.py ... --refine 1:16 --refine 2:128  # + rows with refined codes

The ceiling of a mask is IoU(reference mask, decode(encode(mask))); mIoU averages it over masks.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from paligemma_seg.segtokens import codec, vqvae
from paligemma_seg.segtokens.train_vqvae import list_masks, read_mask

SWEEP: list[dict] = [
    {},
    {"whole_mask": True},
    {"max_objects": 1},
    {"max_objects": 4},
    {"max_objects": 16},
    {"crop_others": True},
    {"connectivity": 4},
    {"loc_rounding": "round"},
    {"threshold": 63},
    {"threshold": 191},
    {"open_radius": 1},
    {"close_radius": 1},
    {"open_radius": 1, "close_radius": 1},
    {"min_area": 1e-4},
    {"min_area": 1e-3},
    {"open_radius": 1, "min_area": 1e-4},
]


def bilinear_ceiling(mask: np.ndarray, config: codec.CodecConfig) -> float:
    """Ceiling without the VQ-VAE: the 64x64 crops (> 0.5) pasted into the decoded boxes."""
    height, width = mask.shape
    objects = codec.to_objects(mask, config)
    locs = codec.box_to_locs(objects.boxes, height, width, config.loc_rounding)
    boxes = codec.locs_to_box(locs, height, width)
    predicted = codec.paste(objects.crops[..., 0] - 0.5, boxes, height, width)
    return codec.iou(predicted, codec.reference_mask(mask, config.threshold))


def evaluate(masks: dict[str, np.ndarray], config: codec.CodecConfig, model) -> dict:
    """mIoU and clean-up statistics of one config over all masks."""
    mask_codec = codec.MaskCodec(model, config) if model is not None else None
    ious, changed, water, removed, dropped, objects = [], 0, 0, 0, 0, 0
    for mask in masks.values():
        if mask_codec is None:
            ious.append(bilinear_ceiling(mask, config))
            parts = codec.to_objects(mask, config)
            counts = (parts.cleaned_pixels, parts.removed_parts, parts.dropped, len(parts.boxes))
        else:
            encoded = mask_codec.encode(mask)
            decoded = mask_codec.decode(encoded.suffix, *mask.shape)
            ious.append(codec.iou(decoded.mask, mask_codec.reference_mask(mask)))
            counts = (
                encoded.cleaned_pixels,
                encoded.removed_parts,
                encoded.dropped,
                encoded.objects,
            )
        water += int(codec.reference_mask(mask, config.threshold).sum())
        changed, removed = changed + counts[0], removed + counts[1]
        dropped, objects = dropped + counts[2], objects + counts[3]
    return {
        "miou": float(np.mean(ious)),
        "min_iou": float(np.min(ious)),
        "cleaned_pixels_pct_of_water": 100.0 * changed / max(water, 1),
        "removed_parts": removed,
        "dropped_parts": dropped,
        "objects_per_mask": objects / len(masks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--masks", action="append", required=True, help="folder of masks (repeatable)"
    )
    parser.add_argument("--list", default=None, help="only these file names (one per line)")
    parser.add_argument("--vqvae", default="checkpoints/vqvae_small.npz", help="npz, or 'bilinear'")
    parser.add_argument(
        "--sweep", action="store_true", help="evaluate the option table, not one config"
    )
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument(
        "--refine",
        action="append",
        default=[],
        metavar="STEPS:CANDIDATES",
        help="also rows with codec.refine_steps/refine_candidates (repeatable, e.g. 1:16)",
    )
    args = parser.parse_args()

    base = codec.CodecConfig()
    for item in args.set:
        key, value = item.split("=", 1)
        kind = type(getattr(base, key))
        base = dataclasses.replace(base, **{key: value == "True" if kind is bool else kind(value)})
    model = None if args.vqvae == "bilinear" else vqvae.load(args.vqvae)
    masks = {path.name: read_mask(path) for path in list_masks(args.masks, args.list)}
    print(f"{len(masks)} masks, codec: {args.vqvae}, base config: {base}")
    options = SWEEP if args.sweep else [{}, {"whole_mask": True}]
    for item in args.refine:
        steps, candidates = (int(v) for v in item.split(":"))
        refined = {"refine_steps": steps, "refine_candidates": candidates}
        options += [refined] if args.sweep else [refined, {"whole_mask": True, **refined}]
    if model is not None:  # compile every refinement shape before the timed rows
        for option in options:
            evaluate(dict(list(masks.items())[:1]), dataclasses.replace(base, **option), model)
    columns = ("mIoU", "min", "clean%", "removed", "dropped", "obj/img", "s", "masks/s")
    print(f"{'options':<40} " + " ".join(f"{c:>8}" for c in columns))
    for option in options:
        start = time.time()
        result = evaluate(masks, dataclasses.replace(base, **option), model)
        seconds = time.time() - start
        name = ", ".join(f"{k}={v}" for k, v in option.items()) or "defaults"
        values = (
            f"{result['miou']:.4f}",
            f"{result['min_iou']:.3f}",
            f"{result['cleaned_pixels_pct_of_water']:.3f}",
            result["removed_parts"],
            result["dropped_parts"],
            f"{result['objects_per_mask']:.2f}",
            f"{seconds:.0f}",
            f"{len(masks) / seconds:.1f}",
        )
        print(f"{name:<40} " + " ".join(f"{v:>8}" for v in values), flush=True)


if __name__ == "__main__":
    main()
