"""Parameters of a training checkpoint (orbax): the on-disk layout and reading `params` back.

A training run writes WORKDIR/checkpoints/STEP/{state,meta} (`train/checkpoint.py`): `state` is
the pytree {step, params, opt_state, rng}, `meta` a small JSON. Evaluation, prediction and `init`
read only `params`, through here.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE, META = "state", "meta"  # the two items of a checkpoint step


def absolute(path: str | os.PathLike) -> epath.Path:
    """Local paths made absolute; remote ones (gs://...) as they are."""
    path = epath.Path(path)
    return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(path))


def _step_dir(path: epath.Path) -> epath.Path | None:
    """The step directory of `path` (itself, or the newest numbered child), or None."""
    if not path.is_dir():
        return None
    if (path / STATE).is_dir():
        return path
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / STATE).is_dir()]
    return path / str(max(steps)) if steps else None


def step_dir(path: str | os.PathLike) -> epath.Path | None:
    """The step directory `path` names (itself, or its newest step), made absolute; or None."""
    return _step_dir(absolute(path))


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True for a checkpoint directory of this project (a step directory or its parent)."""
    return _step_dir(absolute(path)) is not None


def restore_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Only the parameters of a training checkpoint (a step dir or a checkpoints/ dir: newest step).

    `abstract_params`: tree of jax.ShapeDtypeStruct with shardings (the checkpoint's shapes).
    """
    step_dir = _step_dir(absolute(path))
    if step_dir is None:
        raise ValueError(
            f"{path} is not an orbax checkpoint of this project (expected STEP/state/ inside, e.g. "
            "WORKDIR/checkpoints or WORKDIR/checkpoints/300)."
        )
    restore_args = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract_params,
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            step_dir / STATE,
            args=ocp.args.PyTreeRestore(
                item={"params": abstract_params},
                restore_args={"params": restore_args},
                partial_restore=True,
            ),
        )
    params = restored["params"]
    if not all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params)):
        raise ValueError(f"{step_dir} holds no 'params' tree matching the model's parameters.")
    return params
