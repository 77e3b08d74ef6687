"""What every command line shares: `--config` flags, logging, joining a multi-host run.

`start_up()` first (it joins a multi-process run before anything touches a device, then sets up
logging), then `parse_flags(argv, extra)` for CLIs with `--config` (+ `--config.a.b=v` overrides),
`--checkpoint` and their own string flags.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import jax

NOISY_LOGGERS = ("absl", "tensorflow", "jax._src", "orbax")


def _cloud_tpu_vm() -> bool:
    """Whether this is a Cloud TPU VM (JAX's own check; private API, so failures mean no)."""
    try:
        from jax._src.clusters.cloud_tpu_cluster import running_in_cloud_tpu_vm
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def cluster_detected() -> bool:
    """Whether the environment shows a multi-process launch that JAX can configure by itself."""
    env = os.environ
    return (
        _cloud_tpu_vm()  # TPU pod slices: every host runs the same command.
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def initialize_distributed(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-process run; returns whether `jax.distributed` was initialised.

    mode 'auto': explicit arguments win (e.g. 'localhost:1234', 2, i for processes on one machine);
    otherwise JAX's cluster auto-detection runs when `cluster_detected()` (Cloud TPU VM, SLURM with
    several tasks, Open MPI). 'on': always initialise (JAX detects the rest, e.g. from
    JAX_COORDINATOR_ADDRESS or a Kubernetes/mpi4py environment); 'off': never. Must run before
    anything touches a JAX device.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed={mode!r}; use auto, on or off.")
    if mode == "off":
        return False
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if mode == "on" or cluster_detected():
        jax.distributed.initialize()
        return True
    return False


def quiet_libraries() -> None:
    """Library chatter (JAX, orbax, TF, absl) down to warnings; call before JAX starts backends."""
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def configure_logging(process_index: int) -> None:
    """INFO on process 0, warnings only elsewhere; library chatter muted."""
    logging.basicConfig(
        level=logging.INFO if process_index == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    quiet_libraries()


def start_up(**distributed: Any) -> None:
    """Joins a multi-host run if there is one (before anything touches a device), then logging.

    `distributed`: keyword arguments of `initialize_distributed` (default: auto-detection).
    """
    quiet_libraries()
    initialize_distributed(**distributed)
    configure_logging(jax.process_index())


def raised_by_us(error: BaseException) -> bool:
    """Whether `error` was raised in this package (our checks word their messages)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}paligemma_seg{os.sep}" in frames[-1].filename


def parse_flags(
    argv: Sequence[str], extra: Sequence[tuple[str, str]] = (), config_required: bool = True
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
    if values.config is None and config_required:
        raise ValueError("--config is required, e.g. --config configs/water_tiny.py")
    return values, positional
