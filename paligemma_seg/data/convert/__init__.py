"""images/ + masks/ -> `NAME.jsonl` per split + `report.json`: the data set as PaliGemma text.

    python -m paligemma_seg.data.convert --images DIR --masks DIR --out DIR \\
        [--split train=train_images.txt --split test=test_images.txt] [--prefix "segment water"]

(the command line is `__main__.py`). Owns the VQ-VAE encoding, the ceiling IoU and the output
files; pairing, split lists, reading and checks are `data.pairs` (run in worker processes), masks
become suffixes through `segtokens.codec`. JSONL lines are `{"image", "prefix", "suffix", "mask"}`,
paths relative to the JSONL's folder (or absolute with `absolute_paths`); odd images point to
plain RGB copies in `converted_images/`, masks are referenced as they are (read them with
`images.read_mask`).

Bad pairs are reported with the reason and left out; suspicious masks are flagged and left out
unless `keep_suspicious`; empty masks are negatives and kept (see `data.pairs`). Workers read, check
and crop while the parent encodes crops with the VQ-VAE in batches of exactly ENCODE_BATCH (one
compiled shape), and decodes each distinct code once for the ceiling. Output is the same for any
worker count and appears only at the end: it is staged in a temporary folder, then renamed
(report.json last). `report.json`'s settings name the VQ-VAE file that made the `<seg>` codes and
the tokenizer the data is meant for (null when none was given), each as {path, sha256}; training
refuses JSONL made with another VQ-VAE than its config's (`data.prepare`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from tqdm import tqdm

from paligemma_seg.data import pairs
from paligemma_seg.data.pairs import Listing, Pair, PathLike, Prepared, find_pairs, read_split_file

__all__ = [
    "Listing",
    "Pair",
    "convert",
    "file_sha256",
    "find_codec_file",
    "find_pairs",
    "load_codec",
    "read_split_file",
]

DEFAULT_CODEC = "checkpoints/vqvae_small.npz"
DEFAULT_PREFIX = "segment water"
CONVERTED_DIR = "converted_images"
MASKS_DIR = "converted_masks"  # index masks of multi-class data (data.multiclass)
ENCODE_BATCH = 128  # rows per VQ-VAE call, always (the VQ-VAE's largest compiled batch)


# ------------------------------------------------------------------------------------------ parent


class _Logits:
    """Stands in for the VQ-VAE inside `MaskCodec.decode`: logits of codes decoded earlier.

    Each distinct code sequence is decoded once (small parts often share one), in batches of
    exactly ENCODE_BATCH rows: the VQ-VAE's output for a row does not depend on its batch's other
    rows (for batches of 8 or more), and one batch shape means one JIT compilation."""

    def __init__(self, vqvae: Any):
        self.vqvae = vqvae
        self.cache: dict[bytes, np.ndarray] = {}  # decoded
        self.queued: dict[bytes, np.ndarray] = {}  # to decode

    def request(self, keys: list[bytes], codes: np.ndarray) -> None:
        for key, row in zip(keys, codes, strict=True):
            if key not in self.cache:
                self.queued.setdefault(key, row)
        while len(self.queued) >= ENCODE_BATCH:
            self._decode()

    def flush(self) -> None:
        while self.queued:
            self._decode()

    def _decode(self) -> None:
        keys = list(self.queued)[:ENCODE_BATCH]
        logits = _padded(self.vqvae.decode, np.stack([self.queued.pop(k) for k in keys]))
        self.cache.update(zip(keys, logits, strict=True))

    def forget_all_but(self, keep: Iterable[bytes]) -> None:
        """Bounds the cache (16 KiB a code): keeps only the logits still needed."""
        if len(self.cache) > 8 * ENCODE_BATCH:
            self.cache = {k: self.cache[k] for k in keep if k in self.cache}

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.stack([self.cache[np.asarray(c, np.int32).tobytes()] for c in codes])


def _padded(fn: Any, rows: np.ndarray) -> np.ndarray:
    """fn(rows) run on exactly ENCODE_BATCH rows (zeros appended; their outputs dropped)."""
    count, padding = len(rows), np.zeros((ENCODE_BATCH - len(rows), *rows.shape[1:]), rows.dtype)
    return fn(np.concatenate([rows, padding]) if len(padding) else rows)[:count]


class _Encoder:
    """The parent's VQ-VAE work, streamed: crops are encoded in batches of exactly ENCODE_BATCH,
    codes decoded for the ceiling likewise; `run` yields (prepared, suffix, ceiling IoU or None)
    in input order, each as soon as its codes (and logits) are known."""

    def __init__(self, mask_codec: Any, ceiling: bool):
        from paligemma_seg.segtokens import codec

        self.codec, self.config, self.vqvae = codec, mask_codec.config, mask_codec.vqvae
        self.logits = _Logits(mask_codec.vqvae) if ceiling else None
        self.decoder = codec.MaskCodec(self.logits, self.config) if ceiling else None
        self.waiting: collections.deque[Prepared] = collections.deque()  # not yet encoded
        self.crops: list[np.ndarray] = []  # their crops, in order
        self.queued = 0  # rows in self.crops
        self.codes = np.zeros((0, 16), np.int32)  # encoded rows not yet given to a pair
        self.encoded: collections.deque[tuple] = collections.deque()  # (prepared, codes, keys)

    def run(self, prepared: Iterable[Prepared]) -> Iterator[tuple]:
        for item in prepared:
            self.waiting.append(item)
            if item.num_objects:
                self.crops.append(item.objects.crops)
                self.queued += item.num_objects
            while self.queued >= ENCODE_BATCH:
                self._encode()
            yield from self._ready()
        while self.queued:
            self._encode()
        if self.logits is not None:
            self.logits.flush()
        yield from self._ready()

    def _encode(self) -> None:
        crops = np.concatenate(self.crops) if len(self.crops) > 1 else self.crops[0]
        count = min(ENCODE_BATCH, len(crops))
        self.crops, self.queued = [crops[count:]], self.queued - count
        codes = _padded(self.vqvae.encode, crops[:count])
        if self.config.refine_steps > 0:  # only the real rows (the padding is not refined)
            steps, candidates = self.config.refine_steps, self.config.refine_candidates
            codes = self.vqvae.refine(crops[:count], codes, steps, candidates)
        self.codes = np.concatenate([self.codes, codes])
        while self.waiting and self.waiting[0].num_objects <= len(self.codes):
            p = self.waiting.popleft()
            own, self.codes = self.codes[: p.num_objects], self.codes[p.num_objects :]
            keys = [row.tobytes() for row in own.astype(np.int32)]
            if self.logits is not None:
                self.logits.request(keys, own)
            self.encoded.append((p, own, keys))

    def _ready(self) -> Iterator[tuple]:
        """Pairs at the front whose codes (and, for the ceiling, logits) are all known."""
        while self.waiting and self.waiting[0].num_objects == 0:  # nothing to encode
            self.encoded.append((self.waiting.popleft(), self.codes[:0], []))
        while self.encoded:
            p, codes, keys = self.encoded[0]
            if self.logits is not None and not all(k in self.logits.cache for k in keys):
                break
            self.encoded.popleft()
            yield self._result(p, codes)
        if self.logits is not None:
            self.logits.forget_all_but(k for _, _, keys in self.encoded for k in keys)

    def _result(self, p: Prepared, codes: np.ndarray) -> tuple:
        if p.problem:
            return p, None, None
        codec, config = self.codec, self.config
        height, width = p.size
        locs = codec.box_to_locs(p.objects.boxes, height, width, config.loc_rounding)
        labels = p.labels if p.labels is not None else [config.label] * len(locs)
        objects = [
            codec.format_object(loc, c, label)
            for loc, c, label in zip(locs, codes, labels, strict=True)
        ]
        suffix, iou = codec.join_objects(objects), None
        if self.decoder is not None and p.pair.multiclass:
            iou = self._class_ceilings(p, objects, labels)
        elif self.decoder is not None:
            reference = np.unpackbits(p.reference_bits, count=height * width).reshape(p.size)
            empty = np.zeros(p.size, bool)
            decoded = self.decoder.decode(suffix, height, width).mask if p.num_objects else empty
            iou = codec.iou(decoded, reference.astype(bool))
        return p, suffix, iou

    def _class_ceilings(self, p: Prepared, objects: list[str], labels: list[str]) -> float:
        """Per-class ceiling IoUs into `p.class_counts`; returns their mean over the classes in
        the ground truth (1.0 for an image with none). IGNORE pixels count for no class."""
        from paligemma_seg.data.classes import IGNORE

        height, width = p.size
        scored = p.reference_index != IGNORE
        values = []
        for position, label in enumerate(p.pair.classes.labels, start=1):
            truth = p.reference_index == position
            own = [o for o, lab in zip(objects, labels, strict=True) if lab == label]
            if not truth.any() and not own:
                continue
            suffix = self.codec.join_objects(own)
            decoded = self.decoder.decode(suffix, height, width).mask & scored
            iou = self.codec.iou(decoded, truth)
            p.class_counts.setdefault(label, {"objects": 0, "dropped": 0})["ceiling_iou"] = round(
                iou, 6
            )
            if truth.any():
                values.append(iou)
        return float(np.mean(values)) if values else 1.0


# ----------------------------------------------------------------------------------------- outputs


def _miou(entries: list[dict]) -> float | None:
    values = [e["ceiling_iou"] for e in entries if e["ceiling_iou"] is not None]
    return round(float(np.mean(values)), 6) if values else None


def _report(
    entries: list[dict],
    split_names: list[str],
    listing: Listing,
    settings: dict,
    annotation_problems: list[dict] | None = None,
) -> dict:
    """report.json: ceiling mIoU, per split and overall counts, then one entry per image; for
    multi-class data also per class, and every annotation left out with the reason."""
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
    report = {
        "ceiling_miou": _miou(kept),
        "splits": splits,
        "counts": counts,
        "problems": dict(sorted(problems.items())),
    }
    if any("classes" in e for e in entries):
        report["classes"] = _class_summary(kept)
        dropped = [a for e in entries for a in e.get("dropped_annotations", []) if "reason" in a]
        dropped += annotation_problems or []
        report["counts"]["dropped_annotations"] = len(dropped)
        report["annotation_problems"] = dict(
            sorted(collections.Counter(a["reason"].split(" (")[0] for a in dropped).items())
        )
        report["unmatched_annotations"] = annotation_problems or []
    return report | {"settings": settings, "images": entries, "ignored": listing.ignored}


def _class_summary(entries: list[dict]) -> dict[str, dict]:
    """Per class over the written images: images holding it, objects, dropped, ceiling mIoU."""
    summary: dict[str, dict] = {}
    for entry in entries:
        for label, counts in entry.get("classes", {}).items():
            row = summary.setdefault(label, {"images": 0, "objects": 0, "dropped": 0, "ious": []})
            row["images"] += counts.get("objects", 0) > 0
            row["objects"] += counts.get("objects", 0)
            row["dropped"] += counts.get("dropped", 0)
            if counts.get("ceiling_iou") is not None:
                row["ious"].append(counts["ceiling_iou"])
    for row in summary.values():
        ious = row.pop("ious")
        row["ceiling_miou"] = round(float(np.mean(ious)), 6) if ious else None
    return summary


def _publish(staging: pathlib.Path, out: pathlib.Path, texts: dict[str, str]) -> None:
    """Writes `texts` into `staging`, then renames: converted and resized images, index masks,
    JSONL files, report.json."""
    for name, text in texts.items():
        (staging / name).write_text(text)
    resized = sorted(p.name for p in staging.glob(pairs.RESIZED_PREFIX + "*") if p.is_dir())
    for folder in (CONVERTED_DIR, MASKS_DIR, *resized):
        converted = sorted((staging / folder).iterdir()) if (staging / folder).is_dir() else []
        if converted:
            (out / folder).mkdir(exist_ok=True)
        for file in converted:
            os.replace(file, out / folder / file.name)
    for name in sorted(texts, key=lambda n: n == "report.json"):
        os.replace(staging / name, out / name)


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks (a local path or gs://...)."""
    from etils import epath

    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _file_record(path: PathLike | None, what: str) -> dict[str, str] | None:
    """{path (absolute), sha256} of a file that made or goes with the data; None for no file."""
    if path is None:
        return None
    text = os.fspath(path)
    try:
        sha256 = file_sha256(path)
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"{what} file {text} not found") from None
    return {"path": text if "://" in text else os.path.abspath(text), "sha256": sha256}


def find_codec_file(path: PathLike = DEFAULT_CODEC) -> pathlib.Path:
    """The VQ-VAE npz at `path` (cwd-relative, else repo-relative); ValueError if neither exists."""
    candidates = [pathlib.Path(path), pathlib.Path(__file__).resolve().parents[3] / path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ValueError(
            f"codec file {path} not found; train one with `python -m paligemma_seg.segtokens"
            ".train_vqvae` or pass --codec PATH (vae-oid.npz for real PaliGemma weights)."
        )
    return found


def load_codec(path: PathLike = DEFAULT_CODEC, **config_overrides: Any) -> Any:
    """MaskCodec from a VQ-VAE npz (cwd-relative, else repo-relative) and CodecConfig overrides."""
    from paligemma_seg.segtokens import codec, vqvae

    found = find_codec_file(path)
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
    vqvae_path: PathLike | None = None,
    tokenizer_path: PathLike | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    resize: int = 0,
) -> dict:
    """Converts a data set as the module docstring says and returns the report it writes.

    codec: a `segtokens.codec.MaskCodec` (default `load_codec()`); splits: split name -> list file
    (default: one split "all" with every image); workers: processes (default: the CPU cores).
    vqvae_path: the file `codec`'s VQ-VAE was loaded from (default: DEFAULT_CODEC's file when
    `codec` is None, else unknown: null); tokenizer_path: the tokenizer the data is meant for
    (default null). Both are only recorded in report.json, with their sha256. extra_settings:
    more entries for report.json's settings (e.g. `scene`, from `data.scene_tiles`). resize: also
    write each image resized to the model resolution (resized_SIZE/, the JSONL's `resized`), so
    that training reads small PNGs instead of decoding full-size images every step.
    """
    listing = find_pairs(images, masks, splits)
    sources = {
        "images": str(pathlib.Path(images).resolve()),
        "masks": str(pathlib.Path(masks).resolve()),
        **(extra_settings or {}),
    }
    return _convert_listing(
        listing, out, list(splits) if splits else ["all"], sources, prefix=prefix, codec=codec,
        keep_suspicious=keep_suspicious, workers=workers, absolute_paths=absolute_paths,
        ceiling=ceiling, progress=progress, vqvae_path=vqvae_path, tokenizer_path=tokenizer_path,
        resize=resize,
    )  # fmt: skip


def convert_classes(
    images: PathLike,
    masks: PathLike,
    classes: Any,
    out: PathLike,
    splits: Mapping[str, PathLike] | None = None,
    **options: Any,
) -> dict:
    """Class-id masks (`classes`: a `data.classes.ClassList`) -> JSONL + report, as `convert`.

    Each line's prompt names every class (`segment water ; building`), its answer holds every
    object labelled; `data.prompts` decides how training asks (see `data.tasks`).
    """
    from paligemma_seg.data import multiclass

    listing = multiclass.find_class_pairs(images, masks, classes, splits)
    sources = {
        "images": str(pathlib.Path(images).resolve()),
        "masks": str(pathlib.Path(masks).resolve()),
        "classes": classes.to_dict(),
    }
    options.setdefault("prefix", f"segment {classes.prompt_labels}")
    return _convert_listing(listing, out, list(splits) if splits else ["all"], sources, **options)


def convert_coco(
    annotations: Mapping[str, PathLike] | PathLike, images: PathLike, out: PathLike, **options: Any
) -> dict:
    """COCO instance JSON (one file, or split name -> file) + its images -> JSONL + report.

    Categories become labels, each non-crowd annotation one object; see `data.coco`.
    """
    from paligemma_seg.data import multiclass

    if not isinstance(annotations, Mapping):
        annotations = {"all": annotations}
    listing, classes, problems = multiclass.find_coco_pairs(annotations, images)
    sources = {
        "images": str(pathlib.Path(images).resolve()),
        "coco": {s: os.path.abspath(p) for s, p in annotations.items()},
        "classes": classes.to_dict(),
    }
    options.setdefault("prefix", f"segment {classes.prompt_labels}")
    return _convert_listing(listing, out, list(annotations), sources, problems=problems, **options)


def _convert_listing(
    listing: Listing,
    out: PathLike,
    split_names: list[str],
    sources: dict[str, Any],
    *,
    prefix: str = DEFAULT_PREFIX,
    codec: Any = None,
    keep_suspicious: bool = False,
    workers: int | None = None,
    absolute_paths: bool = False,
    ceiling: bool = True,
    progress: bool = True,
    vqvae_path: PathLike | None = None,
    tokenizer_path: PathLike | None = None,
    problems: list[dict] | None = None,
    resize: int = 0,
) -> dict:
    if resize < 0:
        raise ValueError(f"resize={resize}: give the model resolution in px (e.g. 224), or 0")
    out_dir = pathlib.Path(out).resolve()
    if codec is None:
        vqvae_path = vqvae_path or find_codec_file()
    mask_codec = codec if codec is not None else load_codec(vqvae_path)
    files = {
        "vqvae": _file_record(vqvae_path, "VQ-VAE"),
        "tokenizer": _file_record(tokenizer_path, "tokenizer"),
    }
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(workers or cores or 1, max(1, len(listing.pairs)))
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir))
    try:
        (staging / CONVERTED_DIR).mkdir()
        entries, lines = [], collections.defaultdict(list)
        encoder = _Encoder(mask_codec, ceiling)
        with pairs.prepared_stream(
            workers,
            listing.pairs,
            config=mask_codec.config,
            staging=str(staging / CONVERTED_DIR),
            final=str(out_dir / CONVERTED_DIR),
            keep_suspicious=keep_suspicious,
            ceiling=ceiling,
            resize=resize,
        ) as prepared:
            shown = {"total": len(listing.pairs), "unit": "pair", "desc": "converting"}
            bar = tqdm(prepared, **shown, disable=not progress, leave=False)
            for p, suffix, iou in encoder.run(bar):
                entries.append(p.entry(iou))
                if p.problem is None:
                    lines[p.pair.split].append(
                        _jsonl_line(p, prefix, suffix, out_dir, absolute_paths, resize)
                    )
        settings = {
            **sources,
            "prefix": prefix,
            "codec": dataclasses.asdict(mask_codec.config),
            "keep_suspicious": keep_suspicious,
            "absolute_paths": absolute_paths,
            "resize": resize or None,
            **files,
        }
        report = _report(entries, split_names, listing, settings, problems)
        texts = {f"{s}.jsonl": "".join(lines[s]) for s in split_names}
        texts["report.json"] = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
        _publish(staging, out_dir, texts)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _jsonl_line(
    p: Prepared, prefix: str, suffix: str, out_dir: pathlib.Path, absolute: bool, resize: int
) -> str:
    def where(path: str) -> str:
        return path if absolute else os.path.relpath(path, out_dir)

    row = {"image": where(p.image_path), "prefix": prefix, "suffix": suffix}
    if p.resized_path:  # {size: path}; the pipeline reads it at that resolution (data.pipeline)
        row["resized"] = {str(resize): where(p.resized_path)}
    if p.pair.multiclass:  # the index mask evaluation reads, and the classes its values name
        row["mask"] = where(p.index_path)
        row["classes"] = list(p.pair.classes.labels)
        if p.pair.coco is not None:
            row["coco_image_id"] = p.pair.coco.id
    else:
        row["mask"] = where(p.pair.mask)
    return json.dumps(row, ensure_ascii=False) + "\n"
