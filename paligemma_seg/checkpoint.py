"""Training checkpoints: a thin wrapper around orbax's CheckpointManager, and reading weights back.

Owns the on-disk training state (WORKDIR/checkpoints/STEP/{state,meta}): `state` is the pytree
{step, params, opt_state, rng}, `meta` a small JSON (step, examples seen, batch size, seed) that
pins the data position. Saves are asynchronous (training continues while arrays are written), atomic
(a step directory appears only once complete, so a killed run never leaves a half checkpoint that is
read back) and cooperative (every process calls `save`; each writes its own shards). Keeps the last
K.

Where a run starts (decided in train.py, in this order; the branch taken is logged):
  1. the latest checkpoint in WORKDIR/checkpoints: parameters, optimizer state, step, RNG, data
     position;
  2. `init`: weights only, from an orbax checkpoint (`restore_params`), a big_vision .npz or an HF
     directory;
  3. random initialisation.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

_STATE, _META = "state", "meta"


class Checkpointer:
    """Save/restore the training state under `directory` (created if missing)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.directory = _absolute(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _META)
        )

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts writing `state` (pytree of global arrays) and `meta` (JSON) as checkpoint `step`.

        Returns once the arrays are copied off the devices; the write finishes in the background.
        """
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of checkpoint `step`; arrays come back with `abstract_state`'s shardings"""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
            ),
        )
        return restored[_STATE], dict(restored[_META])

    def wait(self) -> None:
        """Blocks until pending background writes are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _absolute(path: str | os.PathLike) -> epath.Path:
    """Local paths made absolute; remote ones (gs://...) as they are."""
    path = epath.Path(path)
    return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(path))


def _step_dir(path: epath.Path) -> epath.Path | None:
    """The step directory of `path` (itself, or the newest numbered child), or None."""
    if not path.is_dir():
        return None
    if (path / _STATE).is_dir():
        return path
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / _STATE).is_dir()]
    return path / str(max(steps)) if steps else None


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True for a checkpoint directory of this project (a step directory or its parent)."""
    return _step_dir(_absolute(path)) is not None


def restore_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Only the parameters of a training checkpoint (a step dir or a checkpoints/ dir: newest step).

    `abstract_params`: tree of jax.ShapeDtypeStruct with shardings (the checkpoint's shapes).
    """
    step_dir = _step_dir(_absolute(path))
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
            step_dir / _STATE,
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
