"""Where a model comes from: a PATH (workdir, orbax checkpoint, .npz, HF directory) -> its files.

Owns the reading of a training workdir's layout for inference: WORKDIR/config.json (the run's
config, written by `train.loop`), WORKDIR/checkpoints/STEP (orbax, newest first) and
WORKDIR/params.npz. It only finds files; loading them is `infer.segmenter` and `experiment`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
from etils import epath

from paligemma_seg.weights import orbax

CONFIG_JSON = "config.json"  # the run's config, beside metrics.jsonl
CHECKPOINTS = "checkpoints"
PARAMS_NPZ = "params.npz"
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclasses.dataclass(frozen=True)
class Source:
    """The weights file or directory of a PATH, what kind it is, and the run config found for it."""

    weights: str  # an orbax step directory, an .npz file or an HF directory
    kind: str  # 'orbax', 'npz' or 'hf'
    config: str | None  # a training config.json that belongs to it, or None


def _is_hf_directory(path: epath.Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in _HF_WEIGHTS)


def is_run_config(path: epath.Path) -> bool:
    """True for a config.json written by training (not an HF config.json)."""
    if not path.is_file():
        return False
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(content, dict) and {"model", "codec", "tokenizer"} <= content.keys()


def _run_config_near(path: epath.Path) -> str | None:
    """A training config.json in `path` (a directory), its parent or grandparent, or None.

    Covers WORKDIR, WORKDIR/params*.npz, WORKDIR/hf, WORKDIR/checkpoints and .../checkpoints/STEP.
    """
    start = path if path.is_dir() else path.parent
    for folder in (start, start.parent, start.parent.parent):
        if is_run_config(folder / CONFIG_JSON):
            return os.fspath(folder / CONFIG_JSON)
    return None


def weights_in_workdir(workdir: str | os.PathLike) -> str | None:
    """WORKDIR's newest orbax checkpoint step directory, else WORKDIR/params.npz, else None."""
    root = epath.Path(workdir)
    step_dir = orbax.step_dir(root / CHECKPOINTS)
    if step_dir is not None:
        return os.fspath(step_dir)
    if (root / PARAMS_NPZ).is_file():
        return os.fspath(root / PARAMS_NPZ)
    return None


def _missing_weights(path: str) -> ValueError:
    return ValueError(
        f"{path} holds no weights: looked for a training workdir's {CHECKPOINTS}/STEP/state "
        f"(orbax) and {PARAMS_NPZ}, an orbax checkpoint (STEP/state), and an HF directory "
        f"({' or '.join(_HF_WEIGHTS)}). Train into it (python -m paligemma_seg.train --config "
        "CFG --workdir DIR), or pass a .npz file or an HF directory."
    )


def resolve(path: str | os.PathLike) -> Source:
    """The weights of `path` (a workdir, an orbax checkpoint or step, an .npz, an HF directory)."""
    text = os.fspath(path)
    where = epath.Path(path)
    if not where.exists():
        raise ValueError(
            f"{text} not found; pass a training workdir, an orbax checkpoint (WORKDIR/checkpoints "
            "or WORKDIR/checkpoints/STEP), a .npz file or an HF directory."
        )
    config = _run_config_near(where)
    if where.is_file():
        if where.suffix != ".npz":
            raise ValueError(f"{text} is a file but not a .npz; weights files are big_vision .npz.")
        return Source(text, "npz", config)
    step_dir = orbax.step_dir(where)
    if step_dir is not None:
        return Source(os.fspath(step_dir), "orbax", config)
    if _is_hf_directory(where):
        return Source(text, "hf", config)
    found = weights_in_workdir(where)
    if found is None:
        raise _missing_weights(text)
    return Source(found, "npz" if found.endswith(PARAMS_NPZ) else "orbax", config)


def load_run_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """A training run's config.json as a locked ConfigDict (what `--config` would have given)."""
    content = json.loads(epath.Path(path).read_text())
    cfg = ml_collections.ConfigDict(content)
    cfg.lock()
    return cfg
