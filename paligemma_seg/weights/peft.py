"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

`save_peft` writes what `peft.PeftModel.from_pretrained(hf_base, directory)` serves on top of the
base model's HF export; `load_peft` reads such a directory back into `params['lora']`. Module
names are transformers 5.x's for PaliGemmaForConditionalGeneration
(`model.language_model.layers.{i}.self_attn.q_proj`, `model.vision_tower.encoder.layers.{i}...`,
`model.multi_modal_projector.linear`); each PEFT module is one slot of one layer of our stacked
adapters. Tensors: lora_A.weight [r, in_features], lora_B.weight [out_features, r], in and out
features flattened in our axis order, which is the order the HF mapping (`hf.py`) uses.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from paligemma_seg.model.lora import COLLECTION, LoraPair, flatten_adapters
from paligemma_seg.model.projections import PROJECTIONS
from paligemma_seg.weights import hf
from paligemma_seg.weights.spec import WeightsError, as_numpy, flatten, shapes_from_tree

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# Hub-style prefix (hf.py) -> transformers 5.x module prefix.
_MODULE_PREFIXES = (
    (hf.VISION, "model.vision_tower."),
    (hf.TEXT, "model.language_model."),
    (hf.PROJECTOR, "model.multi_modal_projector."),
)


def _module_name(tensor_name: str) -> str:
    """'language_model.model.layers.3.mlp.up_proj.weight' -> 'model.language_model.layers.3...'."""
    name = tensor_name.removesuffix(".weight")
    for hub, module in _MODULE_PREFIXES:
        if name.startswith(hub):
            return module + name[len(hub) :]
    raise AssertionError(f"no module prefix for {tensor_name}")


def _modules(base_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[tuple[str, Any]]]:
    """Our projection path -> [(PEFT module name, index into the stacked weight)]."""
    sizes = shapes_from_tree(base_shapes)
    modules: dict[str, list[tuple[str, Any]]] = {}
    for stack in hf.stacks(sizes):
        if stack.key not in PROJECTIONS:
            continue
        for layer in range(stack.depth):
            for slot, template, _ in stack.parts:
                index = (layer,) if slot is None else (layer, slot)
                entry = (_module_name(template.format(i=layer)), index)
                modules.setdefault(stack.key, []).append(entry)
    for tensor_name, key, _ in hf.GLOBALS:
        if key in PROJECTIONS:
            modules[key] = [(_module_name(tensor_name), ())]
    return modules


def _base_shapes(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    base = {k: v for k, v in params.items() if k != COLLECTION}
    return {k: tuple(v.shape) for k, v in flatten(base).items()}


def _settings(pairs: dict[str, LoraPair]) -> tuple[int, float, float]:
    """(rank, alpha, dropout) shared by every adapter (PEFT's config has one of each)."""
    found = {(p.rank, p.scale * p.rank, p.dropout) for p in pairs.values()}
    if len(found) != 1:
        raise WeightsError(f"adapters differ in (rank, alpha, dropout): {sorted(found)}")
    return found.pop()


def save_peft(
    params: Mapping[str, Any], directory: str | os.PathLike, *, base_model: str | None = None
) -> pathlib.Path:
    """Write `params['lora']` as a PEFT LoRA adapter directory; `base_model` goes into the config
    as base_model_name_or_path (e.g. the HF export of the base weights)."""
    import safetensors.numpy

    pairs = flatten_adapters(dict(params))
    if not pairs:
        raise WeightsError("the parameter tree has no 'lora' adapters (optim.lora.rank = 0?)")
    rank, alpha, dropout = _settings(pairs)
    modules = _modules(_base_shapes(params))
    tensors: dict[str, np.ndarray] = {}
    for path, pair in pairs.items():
        if path not in modules:
            raise WeightsError(f"{path}: no PEFT (nn.Linear) module for this adapter")
        a, b = as_numpy(pair.a).astype(np.float32), as_numpy(pair.b).astype(np.float32)
        for module, index in modules[path]:
            lora_a, lora_b = a[index], b[index]  # [*inputs, r], [r, *outputs]
            tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = lora_a.reshape(-1, rank).T.copy()
            tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = lora_b.reshape(rank, -1).T.copy()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(m for path in pairs for m, _ in modules[path]),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_peft(directory: str | os.PathLike, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` (the base tree: shapes are read from it) with `params['lora']` read from a PEFT
    LoRA directory. Every layer and slot of an adapted weight must be present."""
    import safetensors.numpy

    directory = pathlib.Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    for key in ("use_rslora", "use_dora"):
        if config.get(key):
            raise WeightsError(f"{directory}: {key}=true is not supported; plain LoRA only")
    if config.get("peft_type", "LORA") != "LORA":
        raise WeightsError(f"{directory}: peft_type={config.get('peft_type')!r}; expected 'LORA'")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    tensors = safetensors.numpy.load_file(str(directory / WEIGHTS_FILE))
    base_shapes = _base_shapes(params)
    pairs: dict[str, LoraPair] = {}
    for path, modules in _modules(base_shapes).items():
        present = [f"{_PEFT_PREFIX}{m}.lora_A.weight" in tensors for m, _ in modules]
        if not any(present):
            continue
        if not all(present):
            missing = [m for (m, _), found in zip(modules, present, strict=True) if not found]
            raise WeightsError(f"{directory}: {path} is adapted but not in {missing[:3]}, ...")
        pair = _read_pair(tensors, modules, base_shapes[path], PROJECTIONS[path], rank)
        dropout = float(config.get("lora_dropout", 0.0))
        pairs[path] = pair.replace(scale=alpha / rank, dropout=dropout)
    if not pairs:
        raise WeightsError(f"{directory}: no adapter of a known PaliGemma module")
    adapters: dict[str, Any] = {}
    for path, pair in pairs.items():
        *parents, leaf = path.split("/")
        node = adapters
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = pair
    return {**{k: v for k, v in params.items() if k != COLLECTION}, COLLECTION: adapters}


def _read_pair(
    tensors: Mapping[str, np.ndarray],
    modules: list[tuple[str, Any]],
    shape: tuple[int, ...],
    projection: Any,
    rank: int,
) -> LoraPair:
    stack = shape[: projection.stack]
    inputs = tuple(shape[i] for i in projection.inputs)
    outputs = tuple(shape[i] for i in projection.outputs(len(shape)))
    a = np.zeros(stack + inputs + (rank,), np.float32)
    b = np.zeros(stack + (rank,) + outputs, np.float32)
    for module, index in modules:
        lora_a = tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"]
        lora_b = tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"]
        a[index] = lora_a.T.reshape(inputs + (rank,))
        b[index] = lora_b.T.reshape((rank,) + outputs)
    return LoraPair(a=a, b=b)
