"""Loading experiment config files (configs/*.py) by path; configs/ is not a Python package."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path` (e.g. configs/base.py from an experiment)."""
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} is not a Python config file (expected configs/NAME.py).")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
