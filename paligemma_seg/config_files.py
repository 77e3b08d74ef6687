"""Loading experiment config files (configs/*.py) by path; configs/ is not a Python package."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import ml_collections


def load(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path` (e.g. configs/base.py from an experiment)."""
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} is not a Python config file (expected configs/NAME.py).")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """`cfg` with dotted keys set (`{"optim.lr": 0.1}`), as `--config.optim.lr=0.1` would; locked.

    A key that the config does not have raises a KeyError naming it.
    """
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = cfg
        for parent in parents:
            node = node[parent]
        if last not in node:
            raise KeyError(f"config key {key!r} does not exist (see configs/base.py)")
        node[last] = value
    cfg.lock()
    return cfg
