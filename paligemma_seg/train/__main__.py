"""`python -m paligemma_seg.train --config configs/X.py [--config.a.b=v ...] [--workdir DIR]`.

The command line of training: flags, multi-host start-up, logging set-up; the run itself is
`train.loop.run`. Multi-host: run the same command on every host. TPU pods and SLURM/Open MPI GPU
clusters are detected automatically (--distributed=auto); elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I on each host.
Running the same command again in the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from paligemma_seg import cli

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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/water_tiny.py")
    # Nothing may touch a device before this.
    cli.start_up(
        mode=_DISTRIBUTED.value,
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    import jax

    workdir = _WORKDIR.value or cfg.workdir
    if not workdir:
        raise app.UsageError("No workdir: pass --workdir DIR or set the config's `workdir`.")
    from paligemma_seg.train import loop

    try:
        result = loop.run(cfg, workdir)
    except ValueError as error:
        if not cli.raised_by_us(error):
            raise
        logging.error("%s", error)  # Our config/file checks: one clear line, no traceback.
        sys.exit(1)
    if jax.process_index() == 0:
        logging.info("Done: %s", {k: v for k, v in result.items() if k != "eval"})


if __name__ == "__main__":
    app.run(main)
