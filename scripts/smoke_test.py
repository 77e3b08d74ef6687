r"""Smoke test of an installation: the package imports, trains, checkpoints, decodes, converts.

    python scripts/smoke_test.py [--check-floors]

.ci/run runs it in a second virtualenv made with `uv pip install --resolution lowest-direct -e .`
(every core dependency at its floor in pyproject.toml), so a floor that no longer works fails CI.
On CPU, in a temporary directory, ~1.5 min on 2 cores:

1. train configs/water_micro.py (water_tiny's smallest model) in bf16 compute for 3 steps of
   batch 4 as two processes (`python -m paligemma_seg.train --num_processes=2`, one CPU device
   each): generating 20 tiles of 32 px and converting them (the codec encodes masks), the tf.data
   pipeline, the jitted sharded train step (AdamW, soft targets), validation loss, orbax
   checkpoints written by both (step 2, inside the mesh, and 3), params.npz, then decoding +
   scoring the 2 test tiles (infer.decode under the grammar, VQ-VAE decoder, eval.json);
2. in this process: reload the orbax checkpoint (infer.segmenter.load_model) and decode an image;
3. convert params.npz to a Hugging Face directory (safetensors) and back, bit for bit.

--check-floors also checks that every core dependency is installed at exactly its floor (what a
lowest resolution must give; a higher version means a dependency's own requirement lifts the floor,
which pyproject.toml must then say). Prints `smoke: ok` last; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time
import tomllib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG = REPO / "configs" / "water_micro.py"  # the tiny model, as the tests use it
TINY = {  # a short run of it
    "total_steps": 3,
    "batch_size": 4,
    "seq_len": 32,
    "log_steps": 1,
    "val_steps": 3,
    "val_max_examples": 4,
    "ckpt_steps": 2,  # a checkpoint during training (inside the mesh) and one at the end
    "eval_steps": 3,
    "eval.batch_size": 4,
    "eval.contact_sheet_rows": 2,
    "model.overrides.dtype": "bfloat16",  # the real configs' compute dtype
    "data.synthetic.num_images": 20,
    "data.synthetic.size": 32,
    "data.num_parallel_calls": 1,
    "data.shuffle_buffer": 16,
    "optim.warmup_steps": 1,
    "ckpt.async_save": False,
}


def floors() -> dict[str, str]:
    """Core dependency name -> its `>=` floor, for this platform's lines of pyproject.toml."""
    from packaging.markers import Marker  # packaging: a dependency of tensorflow and others

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    result = {}
    for line in project["dependencies"]:
        requirement, _, marker = line.partition(";")
        if marker and not Marker(marker.strip()).evaluate():
            continue
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([^,\s]+)\s*", requirement)
        if not match:
            raise ValueError(f"pyproject.toml: {line!r} is not NAME>=FLOOR")
        result[match.group(1)] = match.group(3)
    return result


def check_floors() -> None:
    """Every core dependency installed at exactly its floor (2.0 == 2.0.0, as PEP 440 says)."""
    from packaging.version import Version

    wrong = {}
    for name, floor in floors().items():
        installed = importlib.metadata.version(name)
        if Version(installed) != Version(floor):
            wrong[name] = f"floor {floor}, installed {installed}"
    if wrong:
        raise SystemExit(f"smoke: FAILED: not installed at their floors: {wrong}")
    print("smoke: floors:", ", ".join(f"{n}=={importlib.metadata.version(n)}" for n in floors()))


def overrides(root: pathlib.Path) -> dict[str, object]:
    """TINY plus data paths under `root` (dotted config keys)."""
    data = root / "tiles"
    return {
        **TINY,
        "tokenizer": str(REPO / "checkpoints" / "tokenizer_small.model"),
        "codec.vqvae": str(REPO / "checkpoints" / "vqvae_small.npz"),
        "data.images": str(data / "images"),
        "data.masks": str(data / "masks"),
        "data.splits.train": str(data / "train_images.txt"),
        "data.splits.test": str(data / "test_images.txt"),
        "data.jsonl_dir": str(root / "jsonl"),
    }


def tiny_config(root: pathlib.Path):
    """configs/water_micro.py with `overrides(root)`, locked like the CLI's."""
    from paligemma_seg import config_files

    return config_files.apply_overrides(config_files.load(CONFIG), overrides(root))


def train_two_processes(root: pathlib.Path, workdir: pathlib.Path) -> None:
    """The training CLI as two cooperating processes on localhost (as on two hosts)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    args = [
        sys.executable,
        "-m",
        "paligemma_seg.train",
        "--config",
        str(CONFIG),
    ]
    args += [f"--workdir={workdir}", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    args += [f"--config.{key}={value}" for key, value in overrides(root).items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    processes = [
        subprocess.Popen(
            [*args, f"--process_id={i}"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=600)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for i, (p, log) in enumerate(zip(processes, logs, strict=True)):
        if p.returncode != 0:
            raise RuntimeError(f"training process {i} exited {p.returncode}:\n{log[-4000:]}")


def smoke(root: pathlib.Path) -> None:
    import jax
    import numpy as np

    from paligemma_seg import weights
    from paligemma_seg.infer import segmenter

    workdir = root / "run"
    tick = time.perf_counter()
    train_two_processes(root, workdir)
    print(f"smoke: 2 processes trained 3 steps and evaluated in {time.perf_counter() - tick:.0f} s")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), records
    assert any(math.isfinite(r.get("val_loss", math.nan)) for r in records), records
    result = json.loads((workdir / "eval.json").read_text())
    assert result["num_images"] == 2 and 0.0 <= result["miou"] <= 1.0, result
    for name in ("params.npz", "contact_sheet.png", "checkpoints"):
        assert (workdir / name).exists(), f"{name} missing in {sorted(os.listdir(workdir))}"

    cfg = tiny_config(root)
    model, params, mesh = segmenter.load_model(cfg, workdir=str(workdir))
    with jax.set_mesh(mesh):
        segment = segmenter.Segmenter(cfg, model, params)
        (prediction,) = segment.predict_images([np.zeros((40, 30, 3), np.uint8)], "segment water")
    assert prediction.mask.shape == (40, 30), prediction.mask.shape

    hf_dir = weights.convert(workdir / "params.npz", root / "hf")
    back, _ = weights.load_params(hf_dir)
    npz, _ = weights.load_params(workdir / "params.npz")
    flat_back, flat_npz = weights.spec.flatten(back), weights.spec.flatten(npz)
    assert flat_back.keys() == flat_npz.keys()
    for key, value in flat_npz.items():
        np.testing.assert_array_equal(flat_back[key], value, err_msg=key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-floors", action="store_true", help="dependencies at their floors")
    args = parser.parse_args()
    import paligemma_seg  # noqa: F401  (the package imports)

    if args.check_floors:
        check_floors()
    with tempfile.TemporaryDirectory() as tmp:
        smoke(pathlib.Path(tmp))
    print("smoke: ok")


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # A one-line verdict after the traceback.
        import traceback

        traceback.print_exc()
        print(f"smoke: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
