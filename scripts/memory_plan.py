r"""Bytes per device of a config's train step from XLA's compiled memory analysis (no weights).

    python scripts/memory_plan.py --config configs/water_224.py --devices 1
    python scripts/memory_plan.py --config configs/water_224.py --devices 8 \
        --config.optim.trainable=all
    python scripts/memory_plan.py --table      # every row of TABLE, one subprocess each

Compiles the real jitted, sharded train step on abstract arrays for N fake CPU devices
(--xla_force_host_platform_device_count) and prints, per device: parameters, optimizer state and
batch (from the shardings), and XLA's argument / output / temporary sizes. Last line: one JSON
object.

XLA:CPU has no bfloat16 matmul: it converts bf16 weights to f32, and its loop-invariant code motion
then hoists those converts of whole stacked layer weights out of the layer loop (for PG1-3B ~10 GiB
of f32 copies that no GPU/TPU compilation makes). By default that pass is disabled here
(--xla_disable_hlo_passes=while-loop-invariant-code-motion); --cpu_licm keeps it. XLA:CPU still
fuses and schedules differently from XLA:GPU/TPU: read temporaries as an estimate, not a promise.
Attention compiles to XLA's kernel here (materialised float32 logits); on a CUDA GPU in bf16,
Gemma 1 and SigLIP attention run cuDNN flash attention instead (`model/layers.py`), which keeps
no [B, N, T, S] logits: at 448/896 px the GPU needs less than this plan says.

--table compiles each row of TABLE in its own process (the fake device count is per process),
prints one line per row and a last JSON line: the list of every row's figures.
"""

from __future__ import annotations

import os
import sys

_NO_CPU_LICM = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def _devices_from_argv(argv: list[str]) -> int:
    """--devices N (read before JAX starts: the fake device count is fixed at start-up)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 1


os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        f"--xla_force_host_platform_device_count={_devices_from_argv(sys.argv)}",
        "" if "--cpu_licm" in sys.argv else _NO_CPU_LICM,
    ]
)

import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from paligemma_seg import sharding  # noqa: E402
from paligemma_seg.train import optim  # noqa: E402
from paligemma_seg.train.setup import make_plan  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_integer("devices", 1, "Number of (fake CPU) devices of the mesh.")
flags.DEFINE_bool(
    "cpu_licm", False, "Keep XLA:CPU's loop-invariant code motion (see the docstring)."
)
flags.DEFINE_bool("table", False, "Compile every row of TABLE (no --config needed).")

GIB = 2**30
_ROOT = pathlib.Path(__file__).resolve().parent.parent
# (label, config file, devices, overrides); the first two are the README's rows. water_224.py:
# attn-only, SGD, batch 8 x 128 text tokens, bf16 compute, frozen weights in bf16, remat.
TABLE: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("pg1-3b-224 attn-only, remat, 1 device", "configs/water_224.py", 1, ()),
    (
        "pg1-3b-224 all params AdamW, remat, 8 devices",
        "configs/water_224.py",
        8,
        ("--config.optim.trainable=all", "--config.optim.name=adamw"),
    ),
    *(
        (f"{preset} attn-only, remat, 1 device", "configs/water_224.py", 1,
         (f"--config.model.preset={preset}",))
        for preset in ("pg1-3b-448", "pg1-3b-896", "pg2-3b-448")
    ),
    # water_pg2_{3b,10b}_lora.py: LoRA r=16 on the LLM's projections, AdamW, int8 frozen
    # projections (the rest bf16), bf16 compute, remat, batch 8 x 128 (10B/28B: 2 micro-batches).
    ("pg2-3b-224 LoRA r=16 + int8, remat, 1 device", "configs/water_pg2_3b_lora.py", 1, ()),
    *(
        (f"{preset} LoRA r=16 + int8, remat, accum 2, 1 device", "configs/water_pg2_10b_lora.py",
         1, (f"--config.model.preset={preset}",))
        for preset in ("pg2-10b-224", "pg2-28b-224")
    ),
)  # fmt: skip


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def run_table() -> None:
    """Each TABLE row in a fresh process; one line per row, then all figures as one JSON list."""
    rows = []
    licm = ["--cpu_licm"] if flags.FLAGS.cpu_licm else []
    for label, config, devices, overrides in TABLE:
        command = [
            sys.executable, str(pathlib.Path(__file__).resolve()), f"--config={_ROOT / config}",
            f"--devices={devices}", *licm, *overrides,
        ]  # fmt: skip
        done = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"row {label!r} failed ({done.returncode}): {' '.join(command)}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        figures["label"] = label
        rows.append(figures)
        print(
            f"{label:<47} batch {figures['batch_size']} x {figures['seq_len']}: peak "
            f"{figures['peak_bytes'] / GIB:6.2f} GiB per device (temporaries "
            f"{figures['xla_temp_bytes'] / GIB:.2f}; compiled in {figures['compile_seconds']} s)",
            flush=True,
        )
    print(json.dumps(rows))


def main(argv: list[str]) -> None:
    del argv
    if flags.FLAGS.table:
        run_table()
        return
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (or --table).")
    cfg = _CONFIG.value
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    plan = make_plan(cfg, mesh)
    state = plan.abstract_state
    batch = plan.abstract_batch(cfg.batch_size, cfg.seq_len)
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = plan.train_step.lower(state, batch, rng).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    trainable, _ = optim.split_params(state.params, plan.mask)
    figures = {
        "config": cfg.model.preset,
        "trainable": cfg.optim.trainable,
        "optimizer": cfg.optim.name,
        "devices": len(mesh.devices.flat),
        "mesh": dict(mesh.shape),
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "params_total": optim.count_params(state.params),
        "params_trainable": optim.count_params(trainable),
        "params_bytes": per_device_bytes(state.params),
        "opt_state_bytes": per_device_bytes(state.opt_state),
        "batch_bytes": per_device_bytes(batch),
        "xla_argument_bytes": memory.argument_size_in_bytes,
        "xla_output_bytes": memory.output_size_in_bytes,
        "xla_alias_bytes": memory.alias_size_in_bytes,
        "xla_temp_bytes": memory.temp_size_in_bytes,
        "compile_seconds": round(seconds, 1),
        "cpu_licm": flags.FLAGS.cpu_licm,
    }
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    figures["peak_bytes"] = peak
    print(f"{cfg.model.preset}, trainable={cfg.optim.trainable!r}, {cfg.optim.name}, ", end="")
    print(f"batch {cfg.batch_size} x {cfg.seq_len} tokens, mesh {dict(mesh.shape)}")
    print(
        f"  parameters      {figures['params_total']:>15,} "
        f"({figures['params_trainable']:,} trainable)"
    )
    for name, key in (
        ("params", "params_bytes"),
        ("optimizer state", "opt_state_bytes"),
        ("batch", "batch_bytes"),
        ("XLA arguments", "xla_argument_bytes"),
        ("XLA outputs", "xla_output_bytes"),
        ("XLA aliased", "xla_alias_bytes"),
        ("XLA temporaries", "xla_temp_bytes"),
        ("peak (args+out-alias+temp)", "peak_bytes"),
    ):
        print(f"  {name:<27} {figures[key] / GIB:8.2f} GiB per device")
    print(json.dumps(figures))


if __name__ == "__main__":
    app.run(main)
