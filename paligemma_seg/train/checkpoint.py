"""Training checkpoints: a thin wrapper around orbax's CheckpointManager.

Owns the on-disk training state (WORKDIR/checkpoints/STEP/{state,meta}): `state` is the pytree
{step, params, opt_state, rng}, `meta` a small JSON (step, examples seen, batch size, seed, the
training JSONL's path and sha256) that pins the data position. Saves are asynchronous (training
continues while arrays are written), atomic (a step directory appears only once complete, so a
killed run never leaves a half checkpoint that is read back) and cooperative (every process calls
`save`; each writes its own shards). Keeps the last K. Reading only the parameters back
(evaluation, prediction, `init`) is `weights/orbax.py`.

Where a run starts (decided in train/setup.py, in this order; the branch taken is logged):
  1. the latest checkpoint in WORKDIR/checkpoints: parameters, optimizer state, step, RNG, data
     position;
  2. `init`: weights only, from an orbax checkpoint (`restore_params`), a big_vision .npz or an HF
     directory;
  3. random initialisation.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from paligemma_seg.weights.orbax import META, STATE, absolute, is_orbax_checkpoint, restore_params

__all__ = ["Checkpointer", "is_orbax_checkpoint", "restore_params"]


class Checkpointer:
    """Save/restore the training state under `directory` (created if missing)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.directory = absolute(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE, META)
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
                **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of checkpoint `step`; arrays come back with `abstract_state`'s shardings"""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
            ),
        )
        return restored[STATE], dict(restored[META])

    def wait(self) -> None:
        """Blocks until pending background writes are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
