"""`python -m paligemma_seg.train --config configs/X.py [--config.a.b=v ...] [--workdir DIR]`.

The command line of training: flags, multi-host start-up, logging set-up; the run itself is
`train_loop.run` and the pure step is `train_step.make_train_step` (re-exported here). Multi-host:
run the same command on every host. TPU pods and SLURM/Open MPI GPU clusters are detected
automatically (--distributed=auto); elsewhere pass --coordinator_address=HOST:PORT
--num_processes=N --process_id=I on each host.
Running the same command again in the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from paligemma_seg.train_step import TrainState, make_eval_step, make_train_step, next_token_loss

__all__ = ["TrainState", "main", "make_eval_step", "make_train_step", "next_token_loss"]

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory; default: the config's `workdir`."
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process start-up: auto-detect (Cloud TPU VM, SLURM, Open MPI), always, or never.",
)  # fmt: skip
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a manual multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes of a manual multi-process run."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a manual run.")


_NOISY_LOGGERS = ("absl", "tensorflow", "jax._src", "orbax")


def _configure_logging(process_index: int) -> None:
    """INFO on process 0, warnings only elsewhere; library chatter (JAX, orbax, TF) muted."""
    logging.basicConfig(
        level=logging.INFO if process_index == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _raised_by_us(error: BaseException) -> bool:
    """Whether `error` was raised in this package (our checks word their messages)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}paligemma_seg{os.sep}" in frames[-1].filename


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/water_tiny.py")
    for noisy in _NOISY_LOGGERS:  # Before JAX starts its backends (absl logs INFO by default).
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from paligemma_seg import sharding  # Nothing may touch a device before the next line.

    sharding.initialize_distributed(
        _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    import jax

    _configure_logging(jax.process_index())
    workdir = _WORKDIR.value or cfg.workdir
    if not workdir:
        raise app.UsageError("No workdir: pass --workdir DIR or set the config's `workdir`.")
    from paligemma_seg import train_loop

    try:
        result = train_loop.run(cfg, workdir)
    except ValueError as error:
        if not _raised_by_us(error):
            raise
        logging.error("%s", error)  # Our config/file checks: one clear line, no traceback.
        sys.exit(1)
    if jax.process_index() == 0:
        logging.info("Done: %s", {k: v for k, v in result.items() if k != "eval"})


if __name__ == "__main__":
    app.run(main)
