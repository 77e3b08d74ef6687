"""Masks for your own images:

    python -m paligemma_seg.predict --config CFG [--checkpoint P] IMAGE_OR_DIR ... --out DIR
        [--prompt "segment water"]

For every image (any size; folders of mixed sizes; unreadable files are reported and skipped) it
writes into --out: `NAME.txt` (the raw output text), `NAME_mask.png` (binary mask at the image's
size, 255 = inside), `NAME_overlay.png` (the image with the translucent mask and the boxes) and one
line of `predictions.jsonl`. Weights: --checkpoint (an orbax checkpoint dir of training, a
big_vision .npz or a Hugging Face directory), else the config's `init`, else random (a warning).

`Segmenter` is the engine shared with `evaluate.py`: images -> prompts -> jitted decoding (with the
segmentation grammar for segmentation prompts) -> text -> full-resolution masks via the codec.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from paligemma_seg import checkpoint as checkpoint_lib
from paligemma_seg import decode, experiment, grammar
from paligemma_seg import tokenizer as tokenizer_lib

SEGMENT_PREFIX = "segment"


def is_segmentation_prompt(prompt: str) -> bool:
    """PaliGemma's segmentation prompts start with "segment" (e.g. "segment water")."""
    return prompt.strip().lower().startswith(SEGMENT_PREFIX)


def model_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8[H, W, 3] -> float32[size, size, 3] in [-1, 1], resized exactly as training does
    (`tf.image.resize` bilinear, see `data.pipeline.preprocess_image`)."""
    import tensorflow as tf

    resized = tf.image.resize(tf.cast(pixels, tf.float32), (size, size), method="bilinear")
    return (resized / 127.5 - 1.0).numpy()


def example_suffix(label: str) -> str:
    """A two-object suffix written by the codec's own formatter (for the grammar's label tokens)."""
    from paligemma_seg.segtokens import codec as codec_lib

    obj = codec_lib.format_object([1, 2, 300, 400], list(range(16)), label)
    return codec_lib.join_objects([obj, obj])


def max_objects(cfg: ml_collections.ConfigDict) -> int:
    """Object cap of constrained decoding: decode.max_objects, within what the codec encodes."""
    cap = min(int(cfg.decode.max_objects), int(cfg.codec.max_objects))
    return 1 if cfg.codec.whole_mask else cap


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's result: the output text and the mask it decodes to at the image's size."""

    text: str
    mask: np.ndarray  # bool[H, W]
    boxes: list[
        tuple[int, int, int, int]
    ]  # pixel boxes (y1, x1, y2, x2, exclusive) of valid objects
    objects: int  # valid objects
    invalid_objects: int
    finished: bool  # ended with EOS within max_new_tokens

    @property
    def valid(self) -> bool:
        """The whole output parsed: EOS reached and no invalid object."""
        return self.finished and self.invalid_objects == 0


def _mesh_of(params: Any) -> Any:
    """The mesh of the first NamedSharding-placed parameter, or None (unsharded)."""
    for leaf in jax.tree_util.tree_leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


class Segmenter:
    """Model, parameters, tokenizer and codec: images -> `Prediction`s, in fixed-size batches.

    Parameters may be sharded over a mesh (as training leaves them): the batch is then split over
    every device (`sharding.batch_sharding`) and the result gathered on all hosts.
    """

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        model: Any,
        params: Any,
        tokenizer: Any = None,
        codec: Any = None,
    ):
        self.cfg, self.model, self.params = cfg, model, params
        self.tokenizer = tokenizer or experiment.load_tokenizer(cfg)
        self.codec = codec or experiment.load_codec(cfg)
        self.image_size = model.config.vision.image_size
        self.mesh = _mesh_of(params)
        devices = 1 if self.mesh is None else self.mesh.devices.size
        self.batch_size = -(-int(cfg.eval.batch_size) // devices) * devices
        self._decoders: dict[str, tuple[Any, grammar.GrammarTables | None, int]] = {}
        self._batches = 0  # folded into the sampling key, so batches draw different samples

    def _decoding(self, prompt: str) -> tuple[Any, grammar.GrammarTables | None, int]:
        """(decode function, grammar tables or None, prompt length) for `prompt`, built once."""
        if prompt not in self._decoders:
            self._decoders[prompt] = self._build_decoding(prompt)
        return self._decoders[prompt]

    def _build_decoding(self, prompt: str) -> tuple[Any, grammar.GrammarTables | None, int]:
        from paligemma_seg import sharding

        prompt_len = decode.prompt_length(self.tokenizer, [prompt])
        max_new = decode.resolve_max_new_tokens(self.cfg.decode, self.cfg.seq_len, prompt_len)
        settings = decode.DecodeConfig(
            max_new_tokens=max_new,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            temperature=float(self.cfg.decode.temperature),
            top_k=int(self.cfg.decode.top_k),
        )
        rules, out = (), None
        if self.mesh is not None:
            rules = sharding.get_rules(self.cfg.mesh.strategy)
            out = sharding.replicated(self.mesh)
        fn = decode.make_decode_fn(self.model, settings, rules=rules, out_shardings=out)
        tables = None
        if self.cfg.decode.constrained and is_segmentation_prompt(prompt):
            tables = grammar.from_suffix(
                self.tokenizer,
                example_suffix(self.codec.config.label),
                vocab_size=self.model.config.llm.vocab_size,
                max_objects=max_objects(self.cfg),
                max_new_tokens=max_new,
            )
            if self.mesh is not None:
                tables = jax.device_put(tables, out)
        return fn, tables, prompt_len

    def _place(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Host arrays (the same full batch on every host) -> arrays split over the mesh."""
        if self.mesh is None:
            return batch
        from paligemma_seg import sharding

        split = sharding.batch_sharding(self.mesh)
        return {
            key: jax.make_array_from_callback(value.shape, split, lambda index, v=value: v[index])
            for key, value in batch.items()
        }

    def predict_inputs(
        self, inputs: np.ndarray, sizes: Sequence[tuple[int, int]], prompt: str
    ) -> list[Prediction]:
        """Model inputs float32[N, S, S, 3] in [-1, 1] of images of (height, width) `sizes`."""
        fn, tables, prompt_len = self._decoding(prompt)
        tokens = tokenizer_lib.tokenize_example(self.tokenizer, prompt, None, prompt_len)
        results: list[Prediction] = []
        for start in range(0, len(inputs), self.batch_size):
            count = min(self.batch_size, len(inputs) - start)
            batch = {
                "image": np.asarray(inputs[start : start + count], np.float32),
                "text": np.tile(tokens.text, (count, 1)),
                "mask_ar": np.tile(tokens.mask_ar, (count, 1)),
                "mask_input": np.tile(tokens.mask_input, (count, 1)),
                "image_sizes": np.asarray(sizes[start : start + count], np.int32),
            }
            batch = decode.pad_batch(batch, self.batch_size)
            rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), self._batches)
            self._batches += 1
            result = fn(self.params, self._place(batch), tables, rng)
            ids = decode.output_ids(result)[:count]
            finished = np.asarray(jax.device_get(result.finished))[:count]
            for index, (row, done) in enumerate(zip(ids, finished, strict=True)):
                height, width = sizes[start + index]
                results.append(self._to_prediction(row, bool(done), height, width))
        return results

    def predict_images(self, images: Sequence[np.ndarray], prompt: str) -> list[Prediction]:
        """uint8[H, W, 3] images of any sizes -> one `Prediction` each."""
        inputs = np.stack([model_input(image, self.image_size) for image in images])
        return self.predict_inputs(inputs, [image.shape[:2] for image in images], prompt)

    def _to_prediction(self, ids: list[int], finished: bool, height: int, width: int) -> Prediction:
        from paligemma_seg.segtokens import codec as codec_lib

        text = self.tokenizer.decode(ids)
        decoded = self.codec.decode(text, height, width)
        boxes = [
            tuple(int(v) for v in codec_lib.locs_to_box(np.asarray(o.locs), height, width))
            for o in decoded.objects
            if o.problem is None
        ]
        return Prediction(text, decoded.mask, boxes, decoded.valid, decoded.invalid, finished)


# ------------------------------------------------------------------------------ model + weights


def params_source(
    cfg: ml_collections.ConfigDict, checkpoint: str | None, workdir: str | None = None
) -> str:
    """Where weights come from: --checkpoint, else WORKDIR's training checkpoints or params.npz,
    else the config's `init`; '' means random initialisation."""
    if checkpoint:
        if not os.path.exists(checkpoint):
            raise ValueError(
                f"--checkpoint {checkpoint} not found; pass a training checkpoint directory "
                "(WORKDIR/checkpoints or WORKDIR/checkpoints/STEP), a .npz file or an HF directory."
            )
        return checkpoint
    if workdir:
        for candidate in ("checkpoints", "params.npz"):
            path = os.path.join(workdir, candidate)
            if os.path.exists(path) and (
                candidate == "params.npz" or checkpoint_lib.is_orbax_checkpoint(path)
            ):
                return path
    return cfg.init


def load_model(
    cfg: ml_collections.ConfigDict, checkpoint: str | None = None, workdir: str | None = None
) -> tuple[Any, Any, Any]:
    """(model, params, mesh): parameters placed on the config's mesh as training places them."""
    from paligemma_seg import sharding
    from paligemma_seg.model import logical_axes, param_shapes

    model, model_cfg = experiment.build_model(cfg)
    source = params_source(cfg, checkpoint, workdir)
    if not source:
        logging.warning(
            "No --checkpoint and no init in the config: using RANDOM weights; the masks will be "
            "meaningless (pass --checkpoint WORKDIR/checkpoints or a .npz / HF directory)."
        )
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    rules = sharding.get_rules(cfg.mesh.strategy)
    specs, _ = sharding.param_specs(param_shapes(model_cfg), logical_axes(model_cfg), mesh, rules)
    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        cfg.init = source
    params = experiment.initial_params(
        cfg, model, jax.random.PRNGKey(cfg.seed), sharding.to_shardings(mesh, specs)
    )
    logging.info("Weights: %s", source or "random initialisation")
    return model, params, mesh


# ------------------------------------------------------------------------------ CLI


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


def write_outputs(
    out: pathlib.Path, name: str, image: np.ndarray, prediction: Prediction
) -> dict[str, Any]:
    """NAME.txt, NAME_mask.png, NAME_overlay.png; returns the predictions.jsonl record's fields."""
    from paligemma_seg import visualize

    (out / f"{name}.txt").write_text(prediction.text + "\n", encoding="utf-8")
    visualize.mask_image(prediction.mask).save(out / f"{name}_mask.png")
    visualize.overlay(image, prediction.mask, prediction.boxes).save(out / f"{name}_overlay.png")
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
    segmenter: Segmenter, paths: Sequence[str], out: str | os.PathLike, prompt: str
) -> dict[str, int]:
    """Predicts every readable image of `paths` into `out`; returns counts of done and skipped."""
    from paligemma_seg.data import images as images_lib

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = collect_images(paths)
    taken: set[str] = set()
    done = skipped = 0
    writes = jax.process_index() == 0  # every process decodes its share; one writes
    with open(out / "predictions.jsonl" if writes else os.devnull, "w", encoding="utf-8") as jsonl:
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


def parse_flags(
    argv: Sequence[str], extra: Sequence[tuple[str, str]] = ()
) -> tuple[Any, list[str]]:
    """(flag values, positional arguments) of a command line with --config (+ overrides),
    --checkpoint and the `extra` (name, help) string flags. Fresh flag values on every call, so
    CLIs can be run in-process (tests) as well as from `python -m`."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (configs/*.py).", flag_values=values, sys_argv=argv
    )
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Training checkpoint dir (WORKDIR/checkpoints[/STEP]), .npz file or HF directory.",
        flag_values=values,
    )
    for name, help_text in extra:
        flags.DEFINE_string(name, None, help_text, flag_values=values)
    try:
        positional = values(argv)[1:]
    except flags.Error as error:
        raise ValueError(str(error)) from None
    if values.config is None:
        raise ValueError("--config is required, e.g. --config configs/water_tiny.py")
    return values, positional


def start_up() -> None:
    """Joins a multi-host run if there is one (before anything touches a device), then logging:
    INFO on process 0, warnings elsewhere; TensorFlow and absl chatter muted."""
    from paligemma_seg import sharding

    sharding.initialize_distributed()
    logging.basicConfig(
        level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("absl", "tensorflow", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


USAGE = (
    "usage: python -m paligemma_seg.predict --config CFG [--config.KEY=VALUE ...] "
    "[--checkpoint P] IMAGE_OR_DIR [...] --out DIR [--prompt TEXT]"
)


def main(argv: Sequence[str]) -> int:
    """The CLI; returns the exit status (1: bad arguments, missing files or no image predicted)."""
    start_up()
    try:
        values, paths = parse_flags(
            argv, [("out", "Output directory."), ("prompt", "Prompt (default: data.prefix).")]
        )
        if not paths or not values.out:
            raise ValueError(f"{'no images given' if not paths else '--out is required'}; {USAGE}")
        cfg = values.config
        model, params, mesh = load_model(cfg, values.checkpoint)
        with jax.set_mesh(mesh):
            segmenter = Segmenter(cfg, model, params)
            counts = run_prediction(segmenter, paths, values.out, values.prompt or cfg.data.prefix)
    except ValueError as error:
        logging.error("%s", error)
        return 1
    print(f"{counts['predicted']} images predicted, {counts['skipped']} skipped -> {values.out}")
    return 0 if counts["predicted"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
