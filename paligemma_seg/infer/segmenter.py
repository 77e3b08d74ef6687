"""The inference engine: images -> prompts -> jitted decoding -> text -> full-resolution masks.

`Segmenter` holds a model, its parameters (possibly sharded over a mesh), the tokenizer and the
codec; segmentation prompts decode under the token grammar (`grammar`), so every output parses.
`load_model` places weights from --checkpoint, a workdir, or the config's `init`. Shared by
`predict` (the CLI), `infer.evaluation` and training's periodic evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from paligemma_seg import experiment
from paligemma_seg import tokenizer as tokenizer_lib
from paligemma_seg.data import preprocess
from paligemma_seg.infer import decode, grammar, sources

SEGMENT_PREFIX = "segment"


def is_segmentation_prompt(prompt: str) -> bool:
    """PaliGemma's segmentation prompts start with "segment" (e.g. "segment water")."""
    return prompt.strip().lower().startswith(SEGMENT_PREFIX)


def prompt_labels(prompt: str, default: str) -> tuple[str | None, list[str]]:
    """(task, labels) of a prompt: ('segment', ['water', 'building']) for `segment water ;
    building`; a bare `segment` asks for `default`; (None, []) for other prompts."""
    from paligemma_seg.data import tasks

    task, labels = tasks.prompt_task(prompt)
    return task, (labels or [default]) if task else []


def example_suffix(label: str) -> str:
    """A two-object suffix written by the codec's own formatter (for the grammar's label tokens)."""
    from paligemma_seg.segtokens import codec as codec_lib

    obj = codec_lib.format_object([1, 2, 300, 400], list(range(16)), label)
    return codec_lib.join_objects([obj, obj])


def max_objects(cfg: ml_collections.ConfigDict, num_labels: int = 1) -> int:
    """Object cap of constrained decoding: decode.max_objects, within what the codec encodes for
    `num_labels` classes (codec.max_objects per class; one per class with codec.whole_mask)."""
    per_class = 1 if cfg.codec.whole_mask else int(cfg.codec.max_objects)
    return min(int(cfg.decode.max_objects), per_class * num_labels)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's result: the output text and the mask it decodes to at the image's size.

    For a detection prompt (`detect ...`) objects are boxes: `mask` and `object_masks` fill them.
    """

    text: str
    mask: np.ndarray  # bool[H, W]: union of the valid objects
    boxes: list[
        tuple[int, int, int, int]
    ]  # pixel boxes (y1, x1, y2, x2, exclusive) of valid objects
    objects: int  # valid objects
    invalid_objects: int
    finished: bool  # ended with EOS within max_new_tokens
    labels: list[str] = dataclasses.field(default_factory=list)  # of the valid objects
    object_masks: list[np.ndarray] = dataclasses.field(default_factory=list)  # bool[H, W] each

    @property
    def valid(self) -> bool:
        """The whole output parsed: EOS reached and no invalid object."""
        return self.finished and self.invalid_objects == 0

    @property
    def masks(self) -> list[np.ndarray]:
        """bool[H, W] per valid object (`object_masks`), in the order of `boxes` and `labels`."""
        return self.object_masks

    def class_mask(self, label: str) -> np.ndarray:
        """bool[H, W]: the union of the valid objects labelled `label`."""
        mask = np.zeros(self.mask.shape, bool)
        for own, object_mask in zip(self.labels, self.object_masks, strict=True):
            if own == label:
                mask |= object_mask
        return mask


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
        task, labels = prompt_labels(prompt, self.codec.config.label)
        if self.cfg.decode.constrained and task is not None:
            tables = grammar.from_labels(
                self.tokenizer,
                labels,
                vocab_size=self.model.config.llm.vocab_size,
                max_objects=max_objects(self.cfg, len(labels)),
                max_new_tokens=max_new,
                segs_per_object=16 if task == "segment" else 0,
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
            detect = prompt_labels(prompt, "")[0] == "detect"
            for index, (row, done) in enumerate(zip(ids, finished, strict=True)):
                height, width = sizes[start + index]
                results.append(self._to_prediction(row, bool(done), height, width, detect))
        return results

    def predict_images(self, images: Sequence[np.ndarray], prompt: str) -> list[Prediction]:
        """uint8[H, W, 3] images of any sizes -> one `Prediction` each."""
        inputs = np.stack([preprocess.from_pixels(image, self.image_size) for image in images])
        return self.predict_inputs(inputs, [image.shape[:2] for image in images], prompt)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, config: Any = None, **overrides: Any
    ) -> Segmenter:
        """A Segmenter for a training workdir, an orbax checkpoint, a .npz or an HF directory.

        The config is the run's config.json found beside the weights, else `config`
        (configs/NAME.py, a config.json or a ConfigDict); `overrides` set dotted keys
        (`**{"decode.max_objects": 2}`). See `infer.pretrained`.
        """
        from paligemma_seg.infer import pretrained

        return pretrained.load(cls, path, config, overrides)

    def predict(self, image: Any, prompt: str | None = None) -> Prediction:
        """One image (a path, a PIL image or a uint8 array) -> its `Prediction` at its size;
        `prompt` defaults to the config's data.prefix."""
        return self.predict_batch([image], prompt)[0]

    def predict_batch(self, images: Sequence[Any], prompt: str | None = None) -> list[Prediction]:
        """Images (paths, PIL images, uint8 arrays; any sizes) -> one `Prediction` each, decoded
        eval.batch_size at a time."""
        from paligemma_seg.infer import pretrained

        pixels = [pretrained.to_pixels(image) for image in images]
        with contextlib.ExitStack() as stack:
            if self.mesh is not None:
                stack.enter_context(jax.set_mesh(self.mesh))
            return self.predict_images(pixels, prompt or self.cfg.data.prefix)

    def _to_prediction(
        self, ids: list[int], finished: bool, height: int, width: int, detect: bool = False
    ) -> Prediction:
        text = self.tokenizer.decode(ids)
        return to_prediction(self.codec, text, finished, height, width, detect)


def to_prediction(
    codec: Any, text: str, finished: bool, height: int, width: int, detect: bool = False
) -> Prediction:
    """Output text -> Prediction at (height, width): each valid object's mask pasted into its box
    by the codec's VQ-VAE decoder (a filled box for detection outputs)."""
    from paligemma_seg.segtokens import codec as codec_lib

    parsed = codec_lib.parse_boxes(text) if detect else codec_lib.parse_suffix(text)
    boxes, kept = [], []
    for item in parsed:
        if item.problem is None:
            box = codec_lib.locs_to_box(np.asarray(item.locs), height, width)
            if box[2] > box[0] and box[3] > box[1]:  # can still collapse after the floor decode
                boxes.append(tuple(int(v) for v in box))
                kept.append(item)
    masks = []
    if kept and not detect:
        logits = codec.vqvae.decode(np.asarray([o.codes for o in kept], np.int32))[..., 0]
        masks = [
            codec_lib.paste(logit[None], np.asarray([box]), height, width)
            for logit, box in zip(logits, boxes, strict=True)
        ]
    elif kept:
        for y1, x1, y2, x2 in boxes:
            masks.append(np.zeros((height, width), bool))
            masks[-1][y1:y2, x1:x2] = True
    union = np.zeros((height, width), bool)
    for mask in masks:
        union |= mask
    labels = [o.label for o in kept]
    return Prediction(
        text, union, boxes, len(kept), len(parsed) - len(kept), finished, labels, masks
    )


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
        return sources.resolve(checkpoint).weights  # a workdir: its newest checkpoint or npz
    if workdir:
        found = sources.weights_in_workdir(workdir)
        if found:
            return found
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
