"""The data a run needs, made when missing: generated tiles and converted JSONL per split.

`prepare_data(cfg, splits)` generates synthetic tiles (`data.synthetic`) when the config asks for
them and they are missing or were made with other settings, and runs the converter (`data.convert`)
when a split's JSONL is missing or `report.json` shows other conversion settings (`data.resize`
> 0 also writes each image at that resolution, which the pipeline then reads instead). JSONL whose
report.json names another VQ-VAE file content than `codec.vqvae` is refused (ValueError): its
`<seg>` codes are another codebook's. Only process 0 decides and writes; it tells the others what
it does (a broadcast) and all meet at one barrier after it wrote, or all raise if it failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from paligemma_seg import experiment

# What process 0 tells the others (broadcast_one_to_all of one int32).
_NOTHING, _WRITE, _FAILED = 0, 1, 2


def split_examples(cfg: ml_collections.ConfigDict, path: str, train: bool) -> list[Any]:
    """The examples training makes of a split's JSONL (`data.prompts`, `data.negative_rate`,
    `data.tasks`; see `data.tasks`); for the train split (`train`) mixed with `data.mixture`."""
    from paligemma_seg.data import pipeline

    skip = bool(cfg.data.get("skip_bad_lines", False))
    task_names = [t.strip() for t in str(cfg.data.get("tasks", "segment")).split(",") if t.strip()]
    options = dict(
        prompts=cfg.data.get("prompts", "joint"),
        negative_rate=float(cfg.data.get("negative_rate", 0.0)),
        task_names=task_names,
        seed=int(cfg.seed),
    )
    examples = pipeline.expand(pipeline.read_jsonl(path, skip), **options)
    mixture = list(cfg.data.get("mixture", None) or [])
    if not train or not mixture:
        return examples
    sources, weights = [examples], [float(cfg.data.get("train_weight", 1.0))]
    for position, entry in enumerate(mixture):
        entry = dict(entry)
        if "jsonl" not in entry:
            raise ValueError(
                f"data.mixture[{position}] = {entry} lacks 'jsonl'; write entries as "
                "{'jsonl': PATH, 'weight': W}."
            )
        sources.append(pipeline.expand(pipeline.read_jsonl(entry["jsonl"], skip), **options))
        weights.append(float(entry.get("weight", 1.0)))
    mixed = pipeline.mix(sources, weights, int(cfg.seed))
    logging.info(
        "Training mixture: %s",
        ", ".join(
            f"{len(s)} examples x weight {w:g}" for s, w in zip(sources, weights, strict=True)
        ),
    )
    return mixed


def split_jsonl(cfg: ml_collections.ConfigDict, split: str) -> str:
    """Path of `split`'s JSONL file (it may not exist yet; see `prepare_data`)."""
    return os.path.join(cfg.data.jsonl_dir, f"{split}.jsonl")


def prepare_data(cfg: ml_collections.ConfigDict, splits: tuple[str, ...]) -> dict[str, str]:
    """Makes sure `splits` exist as JSONL: generates synthetic tiles, runs convert if needed.

    Returns split -> JSONL path. Process 0 decides and writes; every process reaches the same
    broadcasts and, when process 0 wrote, the same barrier, so none reads half-written JSONL and
    an error on process 0 makes the others raise too instead of waiting forever.
    """
    paths = {split: split_jsonl(cfg, split) for split in splits}
    plan, error = None, None
    if jax.process_index() == 0:
        try:
            plan = _plan(cfg, paths)
        except Exception as e:  # Re-raised below, once the others know.
            error = e
    code = _from_process_0(_FAILED if error else _WRITE if plan else _NOTHING)
    if code == _WRITE:
        if jax.process_index() == 0:
            try:
                _write(cfg, *plan)
            except Exception as e:  # Re-raised below, once the others know.
                error = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("prepare_data")
        code = _from_process_0(_FAILED if error else _NOTHING)
    if error is not None:
        raise error
    if code == _FAILED:
        raise RuntimeError(
            f"process 0 failed to prepare {cfg.data.jsonl_dir} (its log says why); this process "
            "stops with it."
        )
    still = [p for p in paths.values() if not os.path.isfile(p)]
    if still:
        raise ValueError(
            f"{', '.join(still)} not found after conversion; check that data.splits "
            f"({sorted(cfg.data.splits.to_dict())}) names the splits {list(splits)}."
        )
    return paths


def _from_process_0(code: int) -> int:
    """Process 0's `code`, on every process (one small broadcast; itself when single-process)."""
    if jax.process_count() == 1:
        return code
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.array([code], np.int32))[0])


def _plan(cfg: ml_collections.ConfigDict, paths: dict[str, str]) -> tuple[str, Any] | None:
    """(why tiles must be generated or '', codec) when something must be written, else None.

    Raises ValueError for JSONL made with another VQ-VAE (`_check_vqvae`).
    """
    codec = experiment.load_codec(cfg)  # Fail on a missing codec before generating anything.
    _check_vqvae(cfg)
    missing = [s for s, p in paths.items() if not os.path.isfile(p)]
    generate = _synthetic_to_generate(cfg)
    if generate:
        missing = list(paths)  # New tiles: any JSONL there is of the old ones.
    if not missing:
        reason = _stale_conversion(cfg, codec)
        if reason:  # Converted with other settings: reconverting beats silently training on them.
            logging.warning("Reconverting %s: %s", cfg.data.jsonl_dir, reason)
            missing = list(paths)
    return (generate, codec) if missing else None


def _write(cfg: ml_collections.ConfigDict, generate: str, codec: Any) -> None:
    """Generates tiles (when `generate` says why), then converts."""
    if generate:
        from paligemma_seg.data import synthetic as synthetic_lib

        logging.info("Generating tiles into %s: %s", _synthetic_dir(cfg), generate)
        wanted = cfg.data.synthetic
        synthetic_lib.generate(
            _synthetic_dir(cfg), wanted.num_images, wanted.size, wanted.seed,
            classes=_synthetic_classes(cfg),
        )  # fmt: skip
    _convert(cfg, codec)


def _synthetic_classes(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """data.synthetic.classes ('water' or 'water,building') as a tuple."""
    text = str(cfg.data.synthetic.get("classes", "water"))
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _synthetic_dir(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    return pathlib.Path(cfg.data.images).parent


def _synthetic_to_generate(cfg: ml_collections.ConfigDict) -> str:
    """Why generated tiles must be (re)made ('' = not): data.images is missing, or was generated
    with other data.synthetic settings. A folder not made by the generator is never touched."""
    wanted = cfg.data.synthetic
    if wanted.num_images <= 0:
        return ""
    if not os.path.isdir(cfg.data.images):
        return f"{cfg.data.images} does not exist"
    from paligemma_seg.data import synthetic as synthetic_lib

    made = synthetic_lib.read_manifest(_synthetic_dir(cfg))
    want = synthetic_lib.manifest(
        wanted.num_images, wanted.size, wanted.seed, _synthetic_classes(cfg)
    )
    if made is not None and made != want:
        return f"it holds {made}, the config asks for {want}"
    return ""


def _report_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """data.jsonl_dir's report.json settings; None without a (readable) report."""
    try:
        with open(os.path.join(cfg.data.jsonl_dir, "report.json")) as f:
            return json.load(f).get("settings", {})
    except (OSError, ValueError):
        return None


def _check_vqvae(cfg: ml_collections.ConfigDict) -> None:
    """ValueError when report.json says another VQ-VAE (by content) made the `<seg>` codes.

    JSONL without a report (another tool's), or a report naming no VQ-VAE file, is trusted.
    """
    made = (_report_settings(cfg) or {}).get("vqvae") or {}
    if not made.get("sha256"):
        return
    from paligemma_seg.data import convert

    configured = cfg.codec.vqvae
    digest = convert.file_sha256(configured)
    if digest == made["sha256"]:
        return
    used, same_file = made.get("path"), os.path.abspath(configured) == made.get("path")
    raise ValueError(
        f"{cfg.data.jsonl_dir} was made with the VQ-VAE {used} (sha256 {made['sha256'][:12]}), "
        f"but codec.vqvae is {configured} (sha256 {digest[:12]}"
        f"{', the file changed since' if same_file else ''}); fix: reconvert into another "
        f"data.jsonl_dir (--config.data.jsonl_dir=NEW_DIR) or point codec.vqvae at the file "
        f"used (--config.codec.vqvae={used})."
    )


def _stale_conversion(cfg: ml_collections.ConfigDict, codec: Any) -> str:
    """Why data.jsonl_dir's report.json does not match this config ('' = it matches).

    JSONL without a convert report (written by another tool) is trusted as it is.
    """
    settings = _report_settings(cfg)
    if settings is None:
        return ""
    expected: dict[str, Any] = {"images": str(pathlib.Path(cfg.data.images).resolve())}
    coco = cfg.data.get("coco", None)
    if coco:
        expected["coco"] = {s: os.path.abspath(p) for s, p in coco.to_dict().items()}
    else:
        expected["masks"] = str(pathlib.Path(cfg.data.masks).resolve())
    if cfg.data.get("classes", "") and not coco:
        from paligemma_seg.data import classes

        expected["classes"] = classes.parse_classes(cfg.data.classes).to_dict()
    elif not coco:
        expected["prefix"] = cfg.data.prefix
    expected["codec"] = dataclasses.asdict(codec.config)
    if cfg.data.resize:  # 0 = no resized copies asked; any made earlier are harmless
        expected["resize"] = cfg.data.resize
    changed = [key for key, value in expected.items() if settings.get(key) != value]
    return f"settings changed: {', '.join(changed)}" if changed else ""


def _convert(cfg: ml_collections.ConfigDict, codec: Any) -> None:
    """Converts data.images/masks (binary or, with data.classes, class ids) or data.coco with
    paligemma_seg.data.convert and the config's codec."""
    coco = cfg.data.get("coco", None)
    coco = coco.to_dict() if coco else {}
    for key in ("images",) if coco else ("images", "masks"):
        if not os.path.isdir(cfg.data[key]):
            raise ValueError(
                f"data.{key} folder {cfg.data[key]} not found (expected at "
                f"{os.path.abspath(cfg.data[key])}); point --config.data.{key} at it."
            )
    from paligemma_seg.data import convert

    options = dict(
        codec=codec,
        vqvae_path=cfg.codec.vqvae,
        tokenizer_path=cfg.tokenizer if os.path.isfile(cfg.tokenizer) else None,
        resize=cfg.data.resize,
    )
    if coco:
        report = convert.convert_coco(coco, cfg.data.images, cfg.data.jsonl_dir, **options)
    elif cfg.data.get("classes", ""):
        from paligemma_seg.data import classes

        report = convert.convert_classes(
            cfg.data.images, cfg.data.masks, classes.parse_classes(cfg.data.classes),
            cfg.data.jsonl_dir, cfg.data.splits.to_dict(), **options,
        )  # fmt: skip
    else:
        report = convert.convert(
            cfg.data.images, cfg.data.masks, cfg.data.jsonl_dir, cfg.data.splits.to_dict(),
            prefix=cfg.data.prefix, **options,
        )  # fmt: skip
    logging.info(
        "Converted %d image/mask pairs into %s (ceiling mIoU %s)",
        len(report.get("images", [])),
        cfg.data.jsonl_dir,
        report.get("ceiling_miou"),
    )
