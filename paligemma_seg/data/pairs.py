"""Which files make a data set, and what is in each pair: the worker side of `data.convert`.

An image is any file with an image extension in the images folder (others are ignored with a
note); its mask has the image's name (`masks/x.jpg`) or stem (`masks/x.png`). Split lists hold
one image name (or stem, or a path ending in one) per line; `#` lines are comments.

`prepare` reads and checks one pair and cuts its mask into objects (`segtokens.codec.to_objects`);
`prepared_stream` runs it over worker processes, in order. Bad pairs (missing or unreadable files,
size mismatch) become a `problem`; suspicious masks (all or almost all water, not binary) are
flagged and become a problem unless `keep_suspicious`. Images a plain decoder would misread (CMYK,
alpha, 16-bit, PNG data in a `.jpg`, other formats) are saved as RGB PNGs for the JSONL.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image

from paligemma_seg.data import images as image_io

PathLike = str | os.PathLike
SUSPICIOUS_FRACTION = 0.98  # masks with at least this water fraction are flagged
NOT_BINARY_FRACTION = 0.10  # masks with more mid-grey (64..191) pixels than this are flagged


@dataclasses.dataclass(frozen=True)
class Pair:
    """An image to convert (absolute paths) and a problem already known (missing files)."""

    name: str
    split: str
    image: str
    mask: str | None
    problem: str | None = None
    classes: Any = None  # data.classes.ClassList of a class-id mask (multi-class data)
    coco: Any = None  # data.coco.CocoImage: the image's COCO annotations (instead of a mask)

    @property
    def multiclass(self) -> bool:
        return self.classes is not None or self.coco is not None


@dataclasses.dataclass(frozen=True)
class Listing:
    """What `find_pairs` found: pairs in output order, ignored files, images in no split."""

    pairs: list[Pair]
    ignored: list[dict[str, str]]
    unlisted: int


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

# Extensions decoded once, in full: no plain decoder reads them, so their pixels are needed anyway.
_NEVER_PLAIN = tuple(e for e in image_io.IMAGE_EXTENSIONS if e not in (".jpg", ".jpeg", ".png"))


@dataclasses.dataclass
class Prepared:
    """A worker's findings: a problem, or what the parent needs to encode the mask."""

    pair: Pair
    problem: str | None = None
    suspicious: str | None = None
    notes: tuple[str, ...] = ()
    size: tuple[int, int] = (0, 0)
    water_fraction: float | None = None
    objects: Any = None  # segtokens.codec.Objects
    reference_bits: np.ndarray | None = None  # np.packbits of the ground truth (ceiling only)
    image_path: str | None = None  # what the JSONL points to
    resized_path: str | None = None  # the image pre-resized to `resize` px (convert --resize)
    # Multi-class data (data.multiclass): each object's label, the index mask (ceiling only),
    # where it was written, per-class counts and the annotations left out (with the reason).
    labels: tuple[str, ...] | None = None
    reference_index: np.ndarray | None = None
    index_path: str | None = None
    class_counts: dict[str, dict[str, int]] | None = None
    annotation_problems: tuple[dict[str, Any], ...] = ()

    @property
    def num_objects(self) -> int:
        return 0 if self.problem or self.objects is None else len(self.objects.boxes)

    def entry(self, iou: float | None) -> dict[str, Any]:
        """This pair's entry in report.json, with its ceiling IoU."""
        return {
            "image": self.pair.name,
            "split": self.pair.split,
            "objects": self.num_objects,
            "ceiling_iou": None if iou is None else round(iou, 6),
            "problem": self.problem,
            "suspicious": self.suspicious,
            "water_fraction": None
            if self.water_fraction is None
            else round(self.water_fraction, 6),
            "dropped_objects": 0 if self.objects is None else int(self.objects.dropped),
            "notes": list(self.notes),
            "converted_image": self.image_path is not None and self.image_path != self.pair.image,
        } | self._multiclass_entry()

    def _multiclass_entry(self) -> dict[str, Any]:
        if not self.pair.multiclass:
            return {}
        return {
            "classes": self.class_counts or {},
            "dropped_annotations": list(self.annotation_problems),
        }


def _suspicion(grey: np.ndarray, water_fraction: float) -> str | None:
    if water_fraction >= 1.0:
        return "all water"
    if water_fraction >= SUSPICIOUS_FRACTION:
        return f"almost all water ({water_fraction:.1%})"
    if grey.dtype == np.uint8:  # 64 <= grey < 192 in one pass: uint8 arithmetic wraps around
        mid_grey = np.count_nonzero(grey - np.uint8(64) < 128) / grey.size
    else:
        mid_grey = float(((grey >= 64) & (grey < 192)).mean())
    if mid_grey > NOT_BINARY_FRACTION:
        return f"not a binary mask ({mid_grey:.0%} mid-grey pixels; is it an image?)"
    return None


def read_image_checked(path: str) -> tuple[Any, np.ndarray | None, str | None]:
    """(image info, pixels or None, problem) of an image file; a read failure is the problem."""
    try:
        if path.lower().endswith(_NEVER_PLAIN):
            image = image_io.read_image(path)
            return image, image.pixels, None
        return image_io.inspect_image(path), None, None
    except Exception as error:  # corrupt files raise many kinds of errors: report, never crash
        return None, None, f"unreadable image: {error}"


def plain_image_path(
    pair: Pair, image: Any, pixels: np.ndarray | None, staging: str, final: str
) -> str:
    """What the JSONL points to: the image itself, or a plain RGB copy saved in `staging`."""
    if image_io.is_plain(image, pair.image):
        return pair.image
    if pixels is None:
        pixels = image_io.read_image(pair.image).pixels
    Image.fromarray(pixels).save(os.path.join(staging, pair.name + ".png"))
    return os.path.join(final, pair.name + ".png")


def _read(pair: Pair) -> tuple[Any, np.ndarray | None, Any, str | None]:
    """(image info, image pixels or None, mask, problem): every read failure becomes a problem.

    JPEG and PNG files are checked by `inspect_image` (JPEGs at 1/8 scale) and decoded in full
    only if they need a plain copy; other formats always do, so they are decoded once, in full."""
    image, pixels, problem = read_image_checked(pair.image)
    if problem:
        return None, None, None, problem
    try:
        mask = image_io.read_mask(pair.mask)
    except Exception as error:
        return image, pixels, None, f"unreadable mask: {error}"
    if (image.height, image.width) != (mask.height, mask.width):
        size = f"image {image.height}x{image.width} (HxW), mask {mask.height}x{mask.width}"
        return image, pixels, mask, f"size mismatch: {size}"
    return image, pixels, mask, None


RESIZED_PREFIX = "resized_"


def resized_dir(size: int) -> str:
    """The output folder of images pre-resized to `size` px (convert --resize): resized_SIZE."""
    return f"{RESIZED_PREFIX}{size}"


def write_resized(image_path: str, name: str, size: int, staging: str, final: str) -> str:
    """Saves the image at `image_path` resized as the training pipeline resizes it
    (`preprocess.resized_pixels`) as resized_SIZE/NAME.png beside `staging` (the converted-images
    folder, as in `plain_image_path`); -> its path beside `final`."""
    from paligemma_seg.data import preprocess  # TensorFlow: only in workers that resize

    pixels = preprocess.resized_pixels(image_io.read_image(image_path).pixels, size)
    folder = os.path.join(os.path.dirname(staging), resized_dir(size))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(folder, name + ".png"))
    return os.path.join(os.path.dirname(final), resized_dir(size), name + ".png")


def prepare(
    pair: Pair,
    config: Any,
    staging: str,
    final: str,
    keep_suspicious: bool,
    ceiling: bool,
    resize: int = 0,
) -> Prepared:
    """Reads and checks one pair, cuts its mask into objects (CodecConfig `config`) and saves a
    plain copy of an odd image in `staging` (which becomes `final` at the end); with `resize`
    also the image at the model resolution (`write_resized`)."""
    prepared = _prepare(pair, config, staging, final, keep_suspicious, ceiling)
    if resize and prepared.problem is None:
        source = prepared.image_path  # the image, or its plain copy (still in `staging`)
        if os.path.dirname(source) == final:
            source = os.path.join(staging, os.path.basename(source))
        prepared.resized_path = write_resized(source, pair.name, resize, staging, final)
    return prepared


def _prepare(
    pair: Pair, config: Any, staging: str, final: str, keep_suspicious: bool, ceiling: bool
) -> Prepared:
    from paligemma_seg.segtokens import codec  # here, not at the top: the parent may not need it

    if pair.problem:
        return Prepared(pair, problem=pair.problem)
    if pair.multiclass:
        from paligemma_seg.data import multiclass

        return multiclass.prepare(pair, config, staging, final, ceiling)
    image, pixels, mask, problem = _read(pair)
    notes = [f"image: {n}" for n in (image.notes if image else ())]
    notes += [f"mask: {n}" for n in (mask.notes if mask else ())]
    if problem:
        return Prepared(pair, problem=problem, notes=tuple(notes))
    reference = codec.reference_mask(mask.pixels, config.threshold)
    fraction = np.count_nonzero(reference) / reference.size  # == reference.mean(), exactly
    suspicious = _suspicion(mask.pixels, fraction)
    prepared = Prepared(pair, None, suspicious, tuple(notes), reference.shape, fraction)
    if suspicious and not keep_suspicious:
        prepared.problem = f"suspicious mask: {suspicious} (keep such masks with --keep-suspicious)"
        return prepared
    prepared.objects = codec.to_objects(mask.pixels, config)
    if ceiling:
        prepared.reference_bits = np.packbits(reference)
    prepared.image_path = plain_image_path(pair, image, pixels, staging, final)
    return prepared


def prepare_all(pairs: list[Pair], **kwargs: Any) -> list[Prepared]:
    """`prepare` for a chunk of pairs: one task (and one message back) per chunk."""
    return [prepare(pair, **kwargs) for pair in pairs]


def _context() -> multiprocessing.context.BaseContext:
    """Not fork: the parent runs JAX threads. A fork server imports the worker code once."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    multiprocessing.set_forkserver_preload([__name__, "paligemma_seg.segtokens.codec"])
    return multiprocessing.get_context("forkserver")


def start_workers_early() -> None:
    """Starts the fork server now, so that its imports overlap the caller's (e.g. loading JAX)."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


@contextlib.contextmanager
def prepared_stream(workers: int, pairs: list[Pair], **kwargs: Any) -> Iterator[Iterator[Prepared]]:
    """`prepare(pair, **kwargs)` for every pair, in input order: in this process for one worker,
    else over worker processes, in chunks, with a bounded number of chunks in flight so that the
    workers keep reading while the parent encodes."""
    if workers <= 1:
        yield (prepare(pair, **kwargs) for pair in pairs)
        return
    from concurrent.futures import ProcessPoolExecutor

    chunk = max(1, min(16, len(pairs) // (8 * workers)))
    chunks = [pairs[i : i + chunk] for i in range(0, len(pairs), chunk)]
    task = functools.partial(prepare_all, **kwargs)
    with ProcessPoolExecutor(workers, mp_context=_context()) as executor:

        def ordered() -> Iterator[Prepared]:
            pending: collections.deque = collections.deque()
            for part in chunks:
                pending.append(executor.submit(task, part))
                if len(pending) >= 4 * workers:  # bounds the finished results held in memory
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()

        yield ordered()
