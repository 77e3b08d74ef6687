"""images/ + masks/ -> `NAME.jsonl` per split + `report.json`: the data set as PaliGemma text.

    python -m paligemma_seg.data.convert --images DIR --masks DIR --out DIR \\
        [--split train=train_images.txt --split test=test_images.txt] [--prefix "segment water"]

Owns pairing, split lists, checks and the output files; masks become suffixes through
`segtokens.codec`, files are read by `data.images`. A mask has its image's name (`masks/x.jpg`) or
stem (`masks/x.png`). JSONL lines are `{"image", "prefix", "suffix", "mask"}`, paths relative to the
JSONL's folder (or absolute with `absolute_paths`). Images a plain decoder would misread (CMYK,
alpha, 16-bit, PNG data in a `.jpg`, other formats) are saved as RGB PNGs in `converted_images/`
and the JSONL points there; masks are referenced as they are (read them with `images.read_mask`).

Bad pairs (missing or unreadable files, size mismatch) are reported with the reason and left out;
suspicious masks (all or almost all water, not binary) are flagged and left out unless
`keep_suspicious`; empty masks are negatives and kept. Worker processes read, check and crop; the
parent encodes crops with the VQ-VAE in batches. Output is the same for any worker count and appears
only at the end: it is staged in a temporary folder, then renamed (report.json last).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from paligemma_seg.data import images as image_io

DEFAULT_CODEC = "checkpoints/vqvae_small.npz"
DEFAULT_PREFIX = "segment water"
CONVERTED_DIR = "converted_images"
SUSPICIOUS_FRACTION = 0.98  # masks with at least this water fraction are flagged
NOT_BINARY_FRACTION = 0.10  # masks with more mid-grey (64..191) pixels than this are flagged
ENCODE_BATCH = 128  # crops per VQ-VAE call (the VQ-VAE's largest compiled batch)
PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class Pair:
    """An image to convert (absolute paths) and a problem already known (missing files)."""

    name: str
    split: str
    image: str
    mask: str | None
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class Listing:
    """What `find_pairs` found: pairs in output order, ignored files, images in no split."""

    pairs: list[Pair]
    ignored: list[dict[str, str]]
    unlisted: int


# ----------------------------------------------------------------------------------------- pairing


def read_split_file(path: PathLike) -> list[tuple[str, int]]:
    """(name, line number) for each non-empty line of a split list that is not a `#` comment."""
    if not os.path.isfile(path):
        raise ValueError(
            f"split list {path} not found; give --split NAME=LIST_FILE an existing file."
        )
    lines = pathlib.Path(path).read_text().splitlines()
    return [(s.strip(), i) for i, s in enumerate(lines, 1) if s.strip() and not s.startswith("#")]


def _folder(path: PathLike, flag: str) -> pathlib.Path:
    folder = pathlib.Path(path).resolve()
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: no such folder; pass the folder that holds the files.")
    return folder


def _members(names: list[str], splits: Mapping[str, PathLike] | None) -> list[tuple]:
    """[(split, image name or None, as listed, "file:line")] in output order."""
    if not splits:
        return [("all", name, name, "") for name in names]
    by_stem, known = {os.path.splitext(n)[0]: n for n in names}, set(names)
    seen: dict[str, str] = {}
    members = []
    for split, list_file in splits.items():
        for listed, line in read_split_file(list_file):
            base = pathlib.PurePath(listed).name  # a list may hold "images/x.jpg"
            name = base if base in known else by_stem.get(base)
            where = f"{list_file}:{line}"
            if name in seen:
                raise ValueError(
                    f"{where}: {name} is already listed at {seen[name]}; an image may appear once, "
                    "in one split. Remove one of the two lines."
                )
            if name is not None:
                seen[name] = where
            members.append((split, name, listed, where))
    return members


def find_pairs(
    images: PathLike, masks: PathLike, splits: Mapping[str, PathLike] | None = None
) -> Listing:
    """Pairs every listed image (every image without `splits`) with its mask."""
    images_dir, masks_dir = _folder(images, "--images"), _folder(masks, "--masks")
    files = sorted(p.name for p in images_dir.iterdir() if not p.name.startswith(".convert-"))
    names = [n for n in files if image_io.is_image_file(n)]
    ignored = [
        {"file": str(images_dir / n), "reason": "not an image file"}
        for n in files
        if not image_io.is_image_file(n)
    ]
    masks_by_stem: dict[str, list[str]] = collections.defaultdict(list)
    for mask in sorted(p.name for p in masks_dir.iterdir() if image_io.is_image_file(p.name)):
        masks_by_stem[os.path.splitext(mask)[0]].append(mask)
    stems = {os.path.splitext(n)[0] for n in names}
    ignored += [
        {"file": str(masks_dir / m), "reason": "mask without an image"}
        for stem, found in masks_by_stem.items()
        if stem not in stems
        for m in found
    ]
    members = _members(names, splits)
    pairs = []
    for split, name, listed, where in members:
        if name is None:
            problem = f"missing image: {listed} is listed at {where} but not in {images_dir}"
            pairs.append(Pair(listed, split, str(images_dir / listed), None, problem))
            continue
        stem = os.path.splitext(name)[0]
        candidates = masks_by_stem.get(stem, [])
        mask = name if name in candidates else next(iter(candidates), None)
        problem = None if mask else f"missing mask: no {stem}.* in {masks_dir}"
        pairs.append(
            Pair(name, split, str(images_dir / name), mask and str(masks_dir / mask), problem)
        )
    listed_names = {m[1] for m in members}
    return Listing(pairs, ignored, sum(n not in listed_names for n in names))


# ----------------------------------------------------------------------------------------- workers


@dataclasses.dataclass
class _Prepared:
    """A worker's findings: a problem, or what the parent needs to encode the mask."""

    pair: Pair
    problem: str | None = None
    suspicious: str | None = None
    notes: tuple[str, ...] = ()
    size: tuple[int, int] = (0, 0)
    water_fraction: float | None = None
    objects: Any = None  # segtokens.codec.Objects
    reference_bits: np.ndarray | None = None  # np.packbits of the ground-truth mask
    image_path: str | None = None  # what the JSONL points to

    @property
    def num_objects(self) -> int:
        return 0 if self.problem or self.objects is None else len(self.objects.boxes)


def _suspicion(grey: np.ndarray, water_fraction: float) -> str | None:
    if water_fraction >= 1.0:
        return "all water"
    if water_fraction >= SUSPICIOUS_FRACTION:
        return f"almost all water ({water_fraction:.1%})"
    mid_grey = float(((grey >= 64) & (grey < 192)).mean())
    if mid_grey > NOT_BINARY_FRACTION:
        return f"not a binary mask ({mid_grey:.0%} mid-grey pixels; is it an image?)"
    return None


def _read(pair: Pair) -> tuple[Any, Any, str | None]:
    """(image, mask, problem): every read failure becomes a problem, never an exception."""
    try:
        image = image_io.inspect_image(pair.image)
    except Exception as error:  # corrupt files raise many kinds of errors: report, never crash
        return None, None, f"unreadable image: {error}"
    try:
        mask = image_io.read_mask(pair.mask)
    except Exception as error:
        return image, None, f"unreadable mask: {error}"
    if (image.height, image.width) != (mask.height, mask.width):
        size = f"image {image.height}x{image.width} (HxW), mask {mask.height}x{mask.width}"
        return image, mask, f"size mismatch: {size}"
    return image, mask, None


def _prepare(pair: Pair, config: Any, staging: str, final: str, keep_suspicious: bool) -> _Prepared:
    """Reads and checks one pair, cuts its mask into objects (CodecConfig `config`) and saves a
    plain copy of an odd image in `staging` (which becomes `final` at the end)."""
    from paligemma_seg.segtokens import codec  # here, not at the top: the parent may not need it

    if pair.problem:
        return _Prepared(pair, problem=pair.problem)
    image, mask, problem = _read(pair)
    notes = [f"image: {n}" for n in (image.notes if image else ())]
    notes += [f"mask: {n}" for n in (mask.notes if mask else ())]
    if problem:
        return _Prepared(pair, problem=problem, notes=tuple(notes))
    reference = codec.reference_mask(mask.pixels, config.threshold)
    fraction = float(reference.mean())
    suspicious = _suspicion(mask.pixels, fraction)
    prepared = _Prepared(pair, None, suspicious, tuple(notes), reference.shape, fraction)
    if suspicious and not keep_suspicious:
        prepared.problem = f"suspicious mask: {suspicious} (keep such masks with --keep-suspicious)"
        return prepared
    prepared.objects = codec.to_objects(mask.pixels, config)
    prepared.reference_bits = np.packbits(reference)
    prepared.image_path = pair.image
    if not image_io.is_plain(image, pair.image):
        pixels = image_io.read_image(pair.image).pixels
        Image.fromarray(pixels).save(os.path.join(staging, pair.name + ".png"))
        prepared.image_path = os.path.join(final, pair.name + ".png")
    return prepared


@contextlib.contextmanager
def _ordered_map(workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """map() in input order: in-process for one worker, else over worker processes."""
    if workers <= 1:
        yield map
        return
    from concurrent.futures import ProcessPoolExecutor

    # Not fork: the parent runs JAX threads. A fork server imports the worker code once.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__, "paligemma_seg.segtokens.codec"])
    with ProcessPoolExecutor(workers, mp_context=context) as executor:

        def ordered(fn: Callable, items: Iterable) -> Iterator:
            pending: collections.deque = collections.deque()
            for item in items:
                pending.append(executor.submit(fn, item))
                if len(pending) >= 8 * workers:  # bounds the finished results held in memory
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

        yield ordered


# ------------------------------------------------------------------------------------------ parent


class _Precomputed:
    """Stands in for the VQ-VAE inside `MaskCodec.decode`: logits decoded earlier in one batch."""

    def __init__(self, codes: np.ndarray, logits: np.ndarray):
        self._logits = {c.tobytes(): x for c, x in zip(codes.astype(np.int32), logits, strict=True)}

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.stack([self._logits[np.asarray(c, np.int32).tobytes()] for c in codes])


def _batches(prepared: Iterable[_Prepared], size: int) -> Iterator[list[_Prepared]]:
    """Consecutive groups holding at least `size` crops (the last may hold fewer)."""
    batch, crops = [], 0
    for item in prepared:
        batch.append(item)
        crops += item.num_objects
        if crops >= size:
            yield batch
            batch, crops = [], 0
    if batch:
        yield batch


def _encode_batch(batch: list[_Prepared], mask_codec: Any, ceiling: bool) -> list[tuple]:
    """(prepared, suffix, ceiling IoU) per item; one VQ-VAE encode (and decode) for the batch."""
    from paligemma_seg.segtokens import codec

    config = mask_codec.config
    kept = [p for p in batch if p.num_objects]
    codes = mask_codec.vqvae.encode(np.concatenate([p.objects.crops for p in kept])) if kept else []
    decoder = None
    if ceiling and kept:
        logits = mask_codec.vqvae.decode(codes)
        decoder = codec.MaskCodec(_Precomputed(codes, logits), config)
    results, start = [], 0
    for p in batch:
        if p.problem:
            results.append((p, None, None))
            continue
        height, width = p.size
        own, start = codes[start : start + p.num_objects], start + p.num_objects
        locs = codec.box_to_locs(p.objects.boxes, height, width, config.loc_rounding)
        objects = [
            codec.format_object(loc, c, config.label) for loc, c in zip(locs, own, strict=True)
        ]
        suffix, iou = codec.join_objects(objects), None
        if ceiling:
            reference = np.unpackbits(p.reference_bits, count=height * width).reshape(p.size)
            empty = np.zeros(p.size, bool)
            decoded = decoder.decode(suffix, height, width).mask if p.num_objects else empty
            iou = codec.iou(decoded, reference.astype(bool))
        results.append((p, suffix, iou))
    return results


def _entry(p: _Prepared, iou: float | None) -> dict[str, Any]:
    return {
        "image": p.pair.name,
        "split": p.pair.split,
        "objects": p.num_objects,
        "ceiling_iou": None if iou is None else round(iou, 6),
        "problem": p.problem,
        "suspicious": p.suspicious,
        "water_fraction": None if p.water_fraction is None else round(p.water_fraction, 6),
        "dropped_objects": 0 if p.objects is None else int(p.objects.dropped),
        "notes": list(p.notes),
        "converted_image": p.image_path is not None and p.image_path != p.pair.image,
    }


# ----------------------------------------------------------------------------------------- outputs


def _miou(entries: list[dict]) -> float | None:
    values = [e["ceiling_iou"] for e in entries if e["ceiling_iou"] is not None]
    return round(float(np.mean(values)), 6) if values else None


def _report(entries: list[dict], split_names: list[str], listing: Listing, settings: dict) -> dict:
    """report.json: ceiling mIoU, per split and overall counts, then one entry per image."""
    kept = [e for e in entries if e["problem"] is None]
    splits = {}
    for split in split_names:
        rows = [e for e in kept if e["split"] == split]
        splits[split] = {
            "file": f"{split}.jsonl",
            "examples": len(rows),
            "empty_masks": sum(e["objects"] == 0 for e in rows),
            "ceiling_miou": _miou(rows),
        }
    counts = {
        "pairs": len(entries),
        "written": len(kept),
        "left_out": len(entries) - len(kept),
        "empty_masks": sum(e["objects"] == 0 for e in kept),
        "suspicious": sum(e["suspicious"] is not None for e in entries),
        "suspicious_kept": sum(e["suspicious"] is not None for e in kept),
        "dropped_objects": sum(e["dropped_objects"] for e in kept),
        "converted_images": sum(e["converted_image"] for e in kept),
        "ignored_files": len(listing.ignored),
        "images_in_no_split": listing.unlisted,
    }
    problems = collections.Counter(e["problem"].split(":")[0] for e in entries if e["problem"])
    return {
        "ceiling_miou": _miou(kept),
        "splits": splits,
        "counts": counts,
        "problems": dict(sorted(problems.items())),
        "settings": settings,
        "images": entries,
        "ignored": listing.ignored,
    }


def _publish(staging: pathlib.Path, out: pathlib.Path, texts: dict[str, str]) -> None:
    """Writes `texts` into `staging`, then renames: converted images, JSONL files, report.json."""
    for name, text in texts.items():
        (staging / name).write_text(text)
    converted = sorted((staging / CONVERTED_DIR).iterdir())
    if converted:
        (out / CONVERTED_DIR).mkdir(exist_ok=True)
    for file in converted:
        os.replace(file, out / CONVERTED_DIR / file.name)
    for name in sorted(texts, key=lambda n: n == "report.json"):
        os.replace(staging / name, out / name)


def load_codec(path: PathLike = DEFAULT_CODEC, **config_overrides: Any) -> Any:
    """MaskCodec from a VQ-VAE npz (cwd-relative, else repo-relative) and CodecConfig overrides."""
    from paligemma_seg.segtokens import codec, vqvae

    candidates = [pathlib.Path(path), pathlib.Path(__file__).resolve().parents[2] / path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ValueError(
            f"codec file {path} not found; train one with `python -m paligemma_seg.segtokens"
            ".train_vqvae` or pass --codec PATH (vae-oid.npz for real PaliGemma weights)."
        )
    return codec.MaskCodec(vqvae.load(found), codec.CodecConfig(**config_overrides))


def convert(
    images: PathLike,
    masks: PathLike,
    out: PathLike,
    splits: Mapping[str, PathLike] | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    codec: Any = None,
    keep_suspicious: bool = False,
    workers: int | None = None,
    absolute_paths: bool = False,
    ceiling: bool = True,
    progress: bool = True,
) -> dict:
    """Converts a data set as the module docstring says and returns the report it writes.

    codec: a `segtokens.codec.MaskCodec` (default `load_codec()`); splits: split name -> list file
    (default: one split "all" with every image); workers: processes (default: the CPU cores).
    """
    out_dir = pathlib.Path(out).resolve()
    listing = find_pairs(images, masks, splits)
    mask_codec = codec if codec is not None else load_codec()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(workers or cores or 1, max(1, len(listing.pairs)))
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir))
    try:
        (staging / CONVERTED_DIR).mkdir()
        prepare = functools.partial(
            _prepare,
            config=mask_codec.config,
            staging=str(staging / CONVERTED_DIR),
            final=str(out_dir / CONVERTED_DIR),
            keep_suspicious=keep_suspicious,
        )
        entries, lines = [], collections.defaultdict(list)
        with _ordered_map(workers) as ordered_map:
            prepared = tqdm(
                ordered_map(prepare, listing.pairs),
                total=len(listing.pairs),
                unit="pair",
                desc="converting",
                disable=not progress,
                leave=False,
            )
            for batch in _batches(prepared, ENCODE_BATCH):
                for p, suffix, iou in _encode_batch(batch, mask_codec, ceiling):
                    entries.append(_entry(p, iou))
                    if p.problem is None:
                        lines[p.pair.split].append(
                            _jsonl_line(p, prefix, suffix, out_dir, absolute_paths)
                        )
        split_names = list(splits) if splits else ["all"]
        settings = {
            "images": str(pathlib.Path(images).resolve()),
            "masks": str(pathlib.Path(masks).resolve()),
            "prefix": prefix,
            "codec": dataclasses.asdict(mask_codec.config),
            "keep_suspicious": keep_suspicious,
            "absolute_paths": absolute_paths,
        }
        report = _report(entries, split_names, listing, settings)
        texts = {f"{s}.jsonl": "".join(lines[s]) for s in split_names}
        texts["report.json"] = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
        _publish(staging, out_dir, texts)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _jsonl_line(
    p: _Prepared, prefix: str, suffix: str, out_dir: pathlib.Path, absolute: bool
) -> str:
    def where(path: str) -> str:
        return path if absolute else os.path.relpath(path, out_dir)

    row = {
        "image": where(p.image_path),
        "prefix": prefix,
        "suffix": suffix,
        "mask": where(p.pair.mask),
    }
    return json.dumps(row, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------- CLI


def _split_arg(text: str) -> tuple[str, str]:
    name, sep, list_file = text.partition("=")
    if not sep or not list_file or not name.replace("_", "").replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"expected NAME=LIST_FILE (e.g. test=test.txt), got {text!r}"
        )
    return name, list_file


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert images/ + masks/ into PaliGemma JSONL.")
    add = parser.add_argument
    add("--images", required=True, help="folder of images")
    add("--masks", required=True, help="folder of masks (same file names or stems)")
    add("--out", required=True, help="output folder for NAME.jsonl and report.json")
    add(
        "--split",
        action="append",
        type=_split_arg,
        default=[],
        metavar="NAME=LIST_FILE",
        help="a split and the file listing its image names (repeatable; default: all.jsonl)",
    )
    add("--prefix", default=DEFAULT_PREFIX, help="the prompt of every example")
    add("--label", default="water", help="the label written after each object's tokens")
    add("--codec", default=DEFAULT_CODEC, help="VQ-VAE npz in vae-oid format")
    add("--threshold", type=int, help="grey level above which a mask pixel is water")
    add("--max-objects", type=int, help="objects per mask, largest first")
    add("--whole-mask", action="store_true", help="one box over all water instead of one per part")
    add("--keep-suspicious", action="store_true", help="keep all / almost all water masks")
    add("--workers", type=int, help="worker processes (default: CPU cores)")
    add("--absolute-paths", action="store_true", help="absolute instead of relative JSONL paths")
    add("--no-ceiling", action="store_true", help="skip the ceiling IoU (faster)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    splits = dict(args.split)
    if len(splits) != len(args.split):
        parser.error("give each --split NAME once")
    overrides = {"label": args.label, "whole_mask": args.whole_mask}
    for key in ("threshold", "max_objects"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        report = convert(
            args.images,
            args.masks,
            args.out,
            splits or None,
            prefix=args.prefix,
            codec=load_codec(args.codec, **overrides),
            keep_suspicious=args.keep_suspicious,
            workers=args.workers,
            absolute_paths=args.absolute_paths,
            ceiling=not args.no_ceiling,
            progress=sys.stderr.isatty(),
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = report["counts"]
    print(
        f"wrote {counts['written']} of {counts['pairs']} pairs to {args.out}; left out "
        f"{counts['left_out']} {report['problems'] or ''}; ignored {counts['ignored_files']} files"
    )
    for info in report["splits"].values():
        print(
            f"  {info['file']}: {info['examples']} examples ({info['empty_masks']} empty), "
            f"ceiling mIoU {info['ceiling_miou']}"
        )
    return 0 if counts["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
