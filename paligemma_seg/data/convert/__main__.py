"""`python -m paligemma_seg.data.convert --images DIR --masks DIR --out DIR [--split N=LIST ...]`,
with `--classes "1=water,2=building"` for class-id masks, or `--coco [SPLIT=]FILE --images DIR`,
or `--scene scene.tif --scene-mask mask.tif|--scene-labels water.geojson --tile 224 --stride 224`
(tiles cut from a scene: `data.scene_tiles`).

The command line of `data.convert.convert` (see its module docstring for what it writes).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from paligemma_seg.data import convert as convert_lib
from paligemma_seg.data import pairs


def _split_arg(text: str) -> tuple[str, str]:
    name, sep, list_file = text.partition("=")
    if not sep or not list_file or not name.replace("_", "").replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"expected NAME=LIST_FILE (e.g. test=test.txt), got {text!r}"
        )
    return name, list_file


def _coco_arg(text: str) -> tuple[str, str]:
    """`[SPLIT=]FILE` -> (split, file); split 'all' when none is named."""
    name, sep, path = text.partition("=")
    if sep and name.replace("_", "").replace("-", "").isalnum() and not name.endswith(".json"):
        return name, path
    return "all", text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert images/ + masks/ into PaliGemma JSONL.")
    add = parser.add_argument
    add("--images", help="folder of images")
    add("--masks", help="folder of masks (same file names or stems): binary, or class ids")
    add(
        "--classes",
        help="class-id masks: VALUE=LABEL pairs ('1=water,2=building') or a classes.json file; "
        "without it masks are binary (--label)",
    )
    add(
        "--coco",
        action="append",
        default=[],
        metavar="[SPLIT=]ANNOTATIONS.json",
        help="COCO instance JSON instead of --masks (repeatable, one per split; default split "
        "'all'); categories become labels",
    )
    add("--out", required=True, help="output folder for NAME.jsonl and report.json")
    add(
        "--split",
        action="append",
        type=_split_arg,
        default=[],
        metavar="NAME=LIST_FILE",
        help="a split and the file listing its image names (repeatable; default: all.jsonl)",
    )
    add(
        "--prefix",
        help=f"the prompt of every example (default: {convert_lib.DEFAULT_PREFIX!r}; with "
        "classes 'segment A ; B ; ...')",
    )
    add("--label", default="water", help="the label written after each object's tokens")
    add("--codec", default=convert_lib.DEFAULT_CODEC, help="VQ-VAE npz in vae-oid format")
    add(
        "--tokenizer",
        help="the tokenizer the data is meant for: only recorded in report.json with its sha256 "
        "(default: null; conversion does not tokenize)",
    )
    add("--threshold", type=int, help="grey level above which a mask pixel is water")
    add("--max-objects", type=int, help="objects per mask, largest first")
    add("--whole-mask", action="store_true", help="one box over all water instead of one per part")
    add(
        "--refine-steps",
        type=int,
        help="sweeps of decoder-optimal code search per mask (codec.refine_steps; default 0)",
    )
    add(
        "--refine-candidates",
        type=int,
        help="codes tried per position and sweep, nearest first (default 16; 128 = all)",
    )
    add("--keep-suspicious", action="store_true", help="keep all / almost all water masks")
    add("--workers", type=int, help="worker processes (default: CPU cores)")
    add("--absolute-paths", action="store_true", help="absolute instead of relative JSONL paths")
    add("--no-ceiling", action="store_true", help="skip the ceiling IoU (faster)")
    add(
        "--resize",
        type=int,
        default=0,
        metavar="PX",
        help="also write every image resized to the model resolution (e.g. 224) as the training "
        "pipeline resizes it, in resized_PX/; training and evaluation at that resolution read "
        "these small PNGs instead of decoding the full-size images",
    )
    _scene_flags(parser.add_argument_group("scenes (data.scene_tiles; needs the geo extra)"))
    return parser


def _scene_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add("--scene", help="a raster scene (GeoTIFF) to cut into training tiles, instead of --images")
    add("--scene-mask", help="the scene's mask raster on its grid (water: values > 0)")
    add("--scene-labels", help="or water polygons (GeoJSON), rasterised into the scene's grid")
    add("--tile", type=int, default=224, help="tile side in px (default 224)")
    add("--stride", type=int, help="px between tile starts (default: --tile)")
    add("--scene-split", default="train", help="the split of every tile (default train)")
    add("--bands", help="scene bands as R,G,B (1-based), e.g. 4,3,2")
    add("--stretch", help="per-band percentiles LOW,HIGH mapped to 0..255, e.g. 2,98")
    add("--scale", help="fixed band values LOW,HIGH mapped to 0..255, e.g. 0,3000")


def _scene_spec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The `scene_tiles.TileSpec` of the flags (scenes.parse_*)."""
    from paligemma_seg.data import scene_tiles, scenes

    if args.images or args.masks or args.coco or args.classes:
        parser.error("--scene replaces --images, --masks, --coco and --classes: drop them")
    if not args.scene_mask and not args.scene_labels:
        parser.error("--scene needs --scene-mask MASK.tif or --scene-labels WATER.geojson")
    radiometry = scenes.Radiometry(
        scenes.parse_bands(args.bands),
        scenes.parse_pair(args.stretch, "--stretch"),
        scenes.parse_pair(args.scale, "--scale"),
    )
    return scene_tiles.TileSpec(
        args.scene_mask, args.scene_labels, args.tile, args.stride, radiometry
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    splits = dict(args.split)
    if len(splits) != len(args.split):
        parser.error("give each --split NAME once")
    overrides = {"label": args.label, "whole_mask": args.whole_mask}
    for key in ("threshold", "max_objects", "refine_steps", "refine_candidates"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if not args.images and not args.scene:
        parser.error("give --images DIR (the folder of the images) or --scene SCENE.tif")
    if not args.scene and not args.coco and not args.masks:
        parser.error("give --masks DIR (binary or, with --classes, class-id masks) or --coco FILE")
    if args.coco and (args.masks or args.classes or splits):
        parser.error("--coco takes its splits from its files: drop --masks, --classes, --split")
    pairs.start_workers_early()  # its imports overlap load_codec's
    try:
        codec_file = convert_lib.find_codec_file(args.codec)
        options = dict(
            codec=convert_lib.load_codec(codec_file, **overrides),
            vqvae_path=codec_file,
            tokenizer_path=args.tokenizer,
            keep_suspicious=args.keep_suspicious,
            workers=args.workers,
            absolute_paths=args.absolute_paths,
            ceiling=not args.no_ceiling,
            progress=sys.stderr.isatty(),
            resize=args.resize,
        )
        if args.prefix is not None:
            options["prefix"] = args.prefix
        if args.scene:
            from paligemma_seg.data import scene_tiles

            spec = _scene_spec(args, parser)
            report = scene_tiles.convert_scene(
                args.scene, args.out, spec, split=args.scene_split, splits=splits or None,
                **options,
            )  # fmt: skip
        elif args.coco:
            files = dict(_coco_arg(text) for text in args.coco)
            if len(files) != len(args.coco):
                parser.error("give each --coco SPLIT once")
            report = convert_lib.convert_coco(files, args.images, args.out, **options)
        elif args.classes:
            from paligemma_seg.data import classes as classes_lib

            classes = classes_lib.parse_classes(args.classes)
            report = convert_lib.convert_classes(
                args.images, args.masks, classes, args.out, splits or None, **options
            )
        else:
            report = convert_lib.convert(
                args.images, args.masks, args.out, splits or None, **options
            )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = report["counts"]
    print(
        f"wrote {counts['written']} of {counts['pairs']} pairs to {args.out}; left out "
        f"{counts['left_out']} {report['problems'] or ''}; ignored {counts['ignored_files']} files"
    )
    if "scene" in report["settings"]:
        scene = report["settings"]["scene"]
        print(
            f"  cut {scene['cut_tiles']} of {scene['tiles']} tiles from {scene['path']}; "
            f"skipped {scene['nodata_tiles']} nodata-only tiles"
        )
    for info in report["splits"].values():
        print(
            f"  {info['file']}: {info['examples']} examples ({info['empty_masks']} empty), "
            f"ceiling mIoU {info['ceiling_miou']}"
        )
    for label, info in report.get("classes", {}).items():
        print(
            f"  class {label}: {info['objects']} objects in {info['images']} images "
            f"({info['dropped']} dropped), ceiling mIoU {info['ceiling_miou']}"
        )
    if report.get("annotation_problems"):
        print(
            f"  left out {report['counts']['dropped_annotations']} annotations: "
            f"{report['annotation_problems']} (each is listed in report.json)"
        )
    return 0 if counts["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
