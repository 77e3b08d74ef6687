"""Helpers for the training tests: a tiny JSONL data set, a tiny config (in-process or as CLI flags),
running the CLI in a subprocess, and one cached reference run per test session.

The tiny model is configs/water_micro.py: SigLIP 28 px / patch 14 (4 image tokens), width 32, 1
layer; Gemma width 32, 2 layers, 2 heads, 1 KV head; the project's small tokenizer. Six steps of batch 8 take a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from paligemma_seg import config_files

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "checkpoints" / "tokenizer_small.model"
TINY_CONFIG = REPO / "configs" / "water_micro.py"  # the tiny model; `overrides` add the tiny run
PREFIX = "segment water"


def write_dataset(root: pathlib.Path, num: int = 12, size: int = 32, seed: int = 0) -> pathlib.Path:
    """`num` random PNGs (varied widths) with random one-object suffixes: train.jsonl (num - 4), test.jsonl."""
    root = pathlib.Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num):
        pixels = rng.integers(0, 255, (size, size + 3 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        locs = "".join(f"<loc{v:04d}>" for v in sorted(rng.integers(0, 1024, 4)))
        segs = "".join(f"<seg{v:03d}>" for v in rng.integers(0, 128, 16))
        rows.append({"image": f"images/{i}.png", "prefix": PREFIX, "suffix": f"{locs}{segs} water"})
    for split, part in (("train", rows[: num - 4]), ("test", rows[num - 4 :])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def overrides(jsonl_dir: pathlib.Path, **extra: Any) -> dict[str, Any]:
    """Dotted config keys -> values of the tiny test run (6 steps, checkpoints every 3)."""
    tiny = {
        "total_steps": 6,
        "batch_size": 8,
        "seq_len": 32,
        "log_steps": 1,
        "val_steps": 0,
        "ckpt_steps": 3,
        "eval_steps": 0,
        "tokenizer": str(TOKENIZER),
        # Per-object masks, as the tests were written for, whatever water_tiny's tuned codec is.
        "codec.whole_mask": False,
        "codec.max_objects": 4,
        "decode.max_objects": 4,
        "data.jsonl_dir": str(jsonl_dir),
        "data.synthetic.num_images": 0,
        "data.num_parallel_calls": 1,
        "optim.warmup_steps": 2,
        # SGD: Adam would turn gradients that are pure rounding noise (e.g. SigLIP's key bias, which
        # softmax ignores) into full-size steps, and 8-device vs 1-device runs could not be compared.
        "optim.name": "sgd",
        "optim.lr": 0.1,
    }
    return {**tiny, **extra}


def load_config(name: str = "water_tiny") -> ml_collections.ConfigDict:
    """configs/NAME.py's get_config()."""
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(jsonl_dir: pathlib.Path, **extra: Any) -> ml_collections.ConfigDict:
    """configs/water_micro.py with the tiny run's overrides, locked like the CLI's."""
    return config_files.apply_overrides(load_config("water_micro"), overrides(jsonl_dir, **extra))


def cli_args(jsonl_dir: pathlib.Path, workdir: pathlib.Path, **extra: Any) -> list[str]:
    """`python -m paligemma_seg.train ...` arguments for the tiny run."""
    flags = [f"--config.{k}={v}" for k, v in overrides(jsonl_dir, **extra).items()]
    config = str(TINY_CONFIG)
    return [
        sys.executable,
        "-m",
        "paligemma_seg.train",
        "--config",
        config,
        "--workdir",
        str(workdir),
        *flags,
    ]


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """Environment of a CPU-only child with `devices` fake devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs the CLI to completion; a failure shows its stderr."""
    result = subprocess.run(
        args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_metrics(workdir: pathlib.Path) -> list[dict[str, Any]]:
    """metrics.jsonl's training records (those with a loss)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def read_params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    """params.npz exported at the end of a run, as flat numpy arrays."""
    with np.load(workdir / "params.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def reference_data(base: pathlib.Path) -> pathlib.Path:
    """The tiny data set under `base` (written once)."""
    root = base / "reference_data"
    return root if (root / "test.jsonl").exists() else write_dataset(root)


def reference_run(base: pathlib.Path) -> pathlib.Path:
    """The uninterrupted 6-step single-device run (in this process), computed once per `base`."""
    workdir = base / "reference_run"
    if not (workdir / "params.npz").exists():
        from paligemma_seg.train import loop as train_loop

        train_loop.run(tiny_config(reference_data(base)), str(workdir))
    return workdir
