r"""One device check of a lent GPU: training speed, MFU, memory, decoding speed, parity, attention.

    python scripts/device_check.py [--out /tmp/device_check.json]   # full size (a CUDA GPU)
    python scripts/device_check.py --tiny                       # tiny model, batch 2 (any CPU)

Run by scripts/device_check.sh (fresh venv with `.[gpu]`, under a timeout). Sections, in order;
each one's figures are written to --out as soon as it ends, so a timeout keeps what was done:

  env        jax version, devices, GPU name (nvidia-smi), peak dense bf16 FLOP/s assumed.
  parity     the tiny PaliGemma in float32 on the GPU vs on the CPU, same weights and batch, at
             jax.default_matmul_precision("highest"): max abs logit difference.
  attention  one full-size Gemma block (PG1 sizes, bf16, 509 tokens) with a prefix-LM mask and
             padding: the default kernel (cuDNN flash attention on a CUDA GPU) vs XLA's, output
             and input-gradient differences on real tokens; then at 4096 + 128 tokens
             (pg1-3b-896) the compiled temporaries of forward + backward under each kernel.
  train      PG1-3B-224 (configs/water_224.py: attn-only, SGD, bf16 frozen, remat, 128 text
             tokens), random weights from the model's own init in the release tree, at batch 8
             and 16: step time, examples/s, XLA's flops of the compiled step, MFU (flops / step
             time / peak; remat's recomputation counts as flops), device peak_bytes_in_use vs
             XLA's GPU memory analysis vs scripts/memory_plan.py's CPU plan (run alongside).
  decode     greedy decoding (infer.decode.make_decode_fn) on the trained weights, 16 prompt
             tokens, a fixed number of new tokens (no EOS), batch 8 and 64: tokens/s.
  gpu_plans  compile only: the batch-8 train step of pg1-3b-448, pg1-3b-896 and pg2-3b-448 and
             XLA's memory analysis of it on this GPU (with its attention kernels), to set
             against scripts/memory_plan.py --table (XLA:CPU).

A section that would not fit in the rest of --budget seconds is skipped (and says so); a failed
one records its error and the next runs. --tiny: the tiny presets, batch 2, 3 steps, 8 new
tokens; on a CPU the GPU-vs-CPU parity compares the CPU with itself and MFU is null (no known
peak). Logs go to stderr; stdout gets one JSON object at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from paligemma_seg import config_files, experiment, sharding  # noqa: E402
from paligemma_seg.infer import decode  # noqa: E402
from paligemma_seg.model import config as model_config  # noqa: E402
from paligemma_seg.model import gemma, init_params, layers  # noqa: E402
from paligemma_seg.model.paligemma import PaliGemma, make_attn_mask  # noqa: E402
from paligemma_seg.train import optim  # noqa: E402
from paligemma_seg.train.setup import make_plan  # noqa: E402
from paligemma_seg.train.step import TrainState  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIB = 2**30
# Dense bf16 peak FLOP/s by GPU name (no sparsity); H200 is the H100 SXM chip with more memory.
PEAK_BF16 = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("H100 80GB HBM3").
    ("A100", 312e12),
    ("L40S", 362e12),
)


def log(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Results:
    """The JSON object, rewritten to `path` after every section."""

    def __init__(self, path: str) -> None:
        self.path, self.data = path, {"complete": False}

    def put(self, section: str, value: Any) -> None:
        self.data[section] = value
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def peak_flops(name: str | None) -> float | None:
    upper = (name or "").upper()
    return next((peak for key, peak in PEAK_BF16 if key in upper), None)


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def flops_of(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


def memory_of(compiled: Any) -> dict[str, float]:
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {"temp_gib": m.temp_size_in_bytes / GIB, "peak_gib": peak / GIB}


def uses_cudnn_attention(compiled: Any) -> bool:
    return "cudnn$fmha" in compiled.as_text()


def env_section(tiny: bool) -> dict[str, Any]:
    name = gpu_name()
    device = jax.devices()[0]
    return {
        "tiny": tiny,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "gpu_name": name,
        "peak_bf16_flops": peak_flops(name) if device.platform == "gpu" else None,
        "compute_capability": getattr(device, "compute_capability", None),
        "attention_env": os.environ.get(layers.ATTENTION_ENV, "auto"),
    }


# --- parity: the tiny model in float32, accelerator vs CPU ---


def parity_section() -> dict[str, Any]:
    config = model_config.tiny_config(1)
    model = PaliGemma(config)
    cpu = jax.devices("cpu")[0]
    accelerator = jax.devices()[0]
    rng = np.random.default_rng(0)
    side, length = config.vision.image_size, 12
    batch = {
        "image": rng.uniform(-1, 1, (2, side, side, 3)).astype(np.float32),
        "text": rng.integers(2, config.llm.vocab_size, (2, length)).astype(np.int32),
        "mask_ar": np.array([[0] * 5 + [1] * 7] * 2, np.int32),
        "mask_input": np.array([[1] * 12, [1] * 9 + [0] * 3], np.int32),
    }
    with jax.default_device(cpu):
        params = init_params(config, jax.random.PRNGKey(0))
    forward = lambda p, b: model.apply({"params": p}, b["image"], b["text"], b["mask_ar"],
                                       b["mask_input"])  # fmt: skip
    out = {}
    with jax.default_matmul_precision("highest"):
        for name, device in (("cpu", cpu), ("accelerator", accelerator)):
            placed = jax.device_put((params, batch), device)
            out[name] = np.asarray(jax.jit(forward)(*placed))
    real = batch["mask_input"].astype(bool)
    diff = np.abs(out["cpu"] - out["accelerator"])[real]
    return {
        "model": "tiny pg1, float32",
        "accelerator": accelerator.device_kind,
        "max_abs_diff": float(diff.max()),
        "max_abs_logit": float(np.abs(out["cpu"][real]).max()),
    }


# --- attention: default kernel vs XLA on one full-size Gemma block ---


def _block_fns(llm: model_config.GemmaConfig, batch: int, length: int) -> tuple[Any, ...]:
    block = gemma.Block(llm, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    # Prefix-LM: 64 "image" + 8 prefix tokens full, the rest causal; example 1 padded at the end.
    mask_ar = np.zeros((batch, length), np.int32)
    mask_ar[:, 72:] = 1
    mask_input = np.ones((batch, length), np.int32)
    mask_input[1:, length - length // 4 :] = 0
    positions = np.cumsum(mask_input, axis=1).astype(np.int32) - 1
    mask = np.asarray(make_attn_mask(jnp.asarray(mask_ar), jnp.asarray(mask_input)))
    inputs = gemma.AttentionInputs(positions=jnp.asarray(positions), mask=jnp.asarray(mask))
    layer = (jnp.int32(1), None)

    def forward(params, x, inputs):
        return block.apply(params, x, layer, inputs)[0]

    real = jnp.asarray(mask_input, jnp.float32)[:, :, None]  # Padding queries' rows are noise.

    def loss(params, x, inputs):
        return jnp.sum((forward(params, x, inputs).astype(jnp.float32) * real) ** 2)

    init_x = jnp.zeros((1, 4, llm.width), jnp.bfloat16)
    init_inputs = gemma.AttentionInputs(
        positions=jnp.zeros((1, 4), jnp.int32), mask=jnp.ones((1, 4, 4), bool)
    )
    init = lambda key: nn.meta.unbox(block.init(key, init_x, layer, init_inputs))
    return forward, jax.grad(loss, argnums=1), init, inputs, mask_input


def _with_kernel(kernel: str, fn: Any, *args: Any) -> Any:
    """jit(fn) compiled for `args`, traced with $PALIGEMMA_SEG_ATTENTION=kernel."""
    before = os.environ.get(layers.ATTENTION_ENV)
    os.environ[layers.ATTENTION_ENV] = kernel
    try:
        # A fresh function each time: jit's trace cache does not know about the variable.
        compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    finally:
        if before is None:
            os.environ.pop(layers.ATTENTION_ENV)
        else:
            os.environ[layers.ATTENTION_ENV] = before
    return compiled


def attention_section(tiny: bool) -> dict[str, Any]:
    llm = model_config.get_preset("tiny" if tiny else "pg1-3b-224").llm
    length = 125 if tiny else 509  # Not a multiple of 8: cuDNN's padded path runs too.
    forward, grad_x, init, inputs, mask_input = _block_fns(llm, 2, length)
    params = jax.jit(init)(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, length, llm.width), jnp.bfloat16)
    real = mask_input.astype(bool)
    out: dict[str, Any] = {
        "block": f"{'tiny' if tiny else 'pg1'} Gemma block, bf16, B=2, L={length}"
    }
    results = {}
    for kernel in ("auto", "xla"):
        fwd = _with_kernel(kernel, forward, params, x, inputs)
        bwd = _with_kernel(kernel, grad_x, params, x, inputs)
        results[kernel] = (np.asarray(fwd(params, x, inputs), np.float32)[real],
                           np.asarray(bwd(params, x, inputs), np.float32)[real])  # fmt: skip
        out[f"{kernel}_uses_cudnn"] = uses_cudnn_attention(fwd) and uses_cudnn_attention(bwd)
    for i, name in enumerate(("output", "grad_x")):
        reference = results["xla"][i]
        out[f"{name}_max_abs_diff"] = float(np.abs(results["auto"][i] - reference).max())
        out[f"{name}_max_abs"] = float(np.abs(reference).max())
    # Long sequence: compiled temporaries only (abstract arrays, nothing runs).
    long_cfg = model_config.get_preset("tiny" if tiny else "pg1-3b-896")
    long_len = long_cfg.num_image_tokens + 128
    fwd_long, grad_long, init_long, _, _ = _block_fns(long_cfg.llm, 1, long_len)
    abstract = (
        jax.eval_shape(init_long, jax.random.PRNGKey(0)),
        jax.ShapeDtypeStruct((1, long_len, long_cfg.llm.width), jnp.bfloat16),
        gemma.AttentionInputs(
            positions=jax.ShapeDtypeStruct((1, long_len), jnp.int32),
            mask=jax.ShapeDtypeStruct((1, long_len, long_len), jnp.bool_),
        ),
    )
    long = {"tokens": long_len}
    for kernel in ("auto", "xla"):
        compiled = _with_kernel(kernel, grad_long, *abstract)
        long[f"{kernel}_fwd_bwd_temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / GIB
        long[f"{kernel}_uses_cudnn"] = uses_cudnn_attention(compiled)
    out["long_sequence_one_layer"] = long
    return out


# --- train: the real train step of configs/water_224.py on random weights ---


def train_config(tiny: bool, batch_size: int) -> Any:
    cfg = config_files.load(ROOT / "configs" / "water_224.py")
    cfg.init = ""  # Random init: the model's own initialisers, the release tree.
    cfg.batch_size = batch_size
    if tiny:
        cfg.model.preset = "tiny"
        cfg.seq_len = 16
    return cfg


def random_batch(plan: Any, batch_size: int, seq_len: int, vocab: int) -> dict[str, jax.Array]:
    """Images in [-1, 1], 10 prefix tokens (full attention) then suffix tokens (causal, in loss)."""
    rng = np.random.default_rng(0)
    side = plan.model.config.vision.image_size
    prefix = min(10, seq_len // 2)
    mask_ar = np.zeros((batch_size, seq_len), np.int32)
    mask_ar[:, prefix:] = 1
    host = {
        "image": rng.uniform(-1, 1, (batch_size, side, side, 3)).astype(np.float32),
        "text": rng.integers(2, vocab, (batch_size, seq_len)).astype(np.int32),
        "mask_ar": mask_ar,
        "mask_loss": mask_ar.copy(),
        "mask_input": np.ones((batch_size, seq_len), np.int32),
    }
    return {k: jax.device_put(v, plan.batch_shardings[k]) for k, v in host.items()}


def start_memory_plans(tiny: bool, batch_sizes: tuple[int, ...]) -> dict[int, Any]:
    """scripts/memory_plan.py (XLA:CPU, abstract arrays) for each batch size, in the background."""
    procs = {}
    for b in batch_sizes:
        config = ROOT / "configs" / "water_224.py"
        command = [sys.executable, str(ROOT / "scripts" / "memory_plan.py"), f"--config={config}",
                   f"--config.batch_size={b}"]  # fmt: skip
        if tiny:
            command += ["--config.model.preset=tiny", "--config.seq_len=16"]
        procs[b] = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    return procs


def collect_memory_plan(proc: Any, timeout: float) -> float | None:
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    if proc.returncode:
        return None
    return json.loads(stdout.strip().splitlines()[-1])["peak_bytes"] / GIB


def _gib(value: int | None) -> float | None:
    return None if value is None else value / GIB


def train_section(
    tiny: bool,
    batch_sizes: tuple[int, ...],
    steps: int,
    peak: float | None,
    plans: dict[int, Any],
    record: Any,
) -> tuple[dict[str, Any], Any, Any]:
    """Rows per batch size (an error ends the section after recording it); the last params."""
    mesh = sharding.make_mesh(1, -1)
    state, out = None, {"peak_bytes_before_init_gib": _gib(peak_bytes())}
    model = None
    for b in batch_sizes:
        try:
            model, state = _train_row(tiny, b, steps, peak, plans, mesh, state, out)
        except Exception as error:
            out[f"batch_{b}"] = {"error": f"{type(error).__name__}: {error}"}
            record(out)
            raise
        record(out)
    return out, model, state.params


def _train_row(
    tiny: bool,
    b: int,
    steps: int,
    peak: float | None,
    plans: dict[int, Any],
    mesh: Any,
    state: TrainState | None,
    out: dict[str, Any],
) -> tuple[Any, TrainState]:
    cfg = train_config(tiny, b)
    plan = make_plan(cfg, mesh)
    row: dict[str, Any] = {"config": cfg.model.preset, "seq_len": cfg.seq_len}
    if state is None:  # Same shardings for every batch size: init once.
        started = time.perf_counter()
        init_key = jax.random.PRNGKey(cfg.seed)
        params = experiment.initial_params(cfg, plan.model, init_key, plan.abstract_state.params)
        opt = jax.jit(lambda p, plan=plan: plan.tx.init(optim.split_params(p, plan.mask)[0]),
                      out_shardings=plan.state_shardings.opt_state)(params)  # fmt: skip
        step0 = jax.device_put(np.zeros((), np.int32), plan.state_shardings.step)
        state = TrainState(step=step0, params=params, opt_state=opt)
        jax.block_until_ready(state)
        out["init_seconds"] = round(time.perf_counter() - started, 1)
        out["params_total"] = optim.count_params(params)
        out["peak_bytes_after_init_gib"] = _gib(peak_bytes())
    batch = random_batch(plan, b, cfg.seq_len, plan.model.config.llm.vocab_size)
    rng = jax.device_put(np.asarray(jax.random.PRNGKey(0)), sharding.replicated(mesh))
    started = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = plan.train_step.lower(state, batch, rng).compile()
    row["compile_seconds"] = round(time.perf_counter() - started, 1)
    row["attention_uses_cudnn"] = uses_cudnn_attention(compiled)
    flops = flops_of(compiled)
    row["xla_flops_per_step"] = flops
    row.update({f"compiled_{k}": v for k, v in memory_of(compiled).items()})
    with jax.set_mesh(mesh):
        state, metrics = compiled(state, batch, rng)  # Warm-up.
        jax.block_until_ready(metrics)
        started = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch, rng)
        loss = float(jax.device_get(metrics["loss"]))
        seconds = (time.perf_counter() - started) / steps
    device_peak = peak_bytes()
    row.update(
        steps=steps,
        step_seconds=seconds,
        examples_per_s=b / seconds,
        loss=loss,
        loss_finite=bool(np.isfinite(loss)),
        mfu=(flops / seconds / peak) if (flops and peak) else None,
        device_peak_bytes_gib=_gib(device_peak),
        memory_plan_cpu_peak_gib=collect_memory_plan(plans[b], timeout=60),
    )
    out[f"batch_{b}"] = row
    log(f"train batch {b}: {json.dumps(row)}")
    return plan.model, state


def decode_section(model: Any, params: Any, batches: tuple[int, ...], new_tokens: int) -> Any:
    cfg = decode.DecodeConfig(max_new_tokens=new_tokens, eos_id=-1)  # No EOS: fixed length.
    fn = decode.make_decode_fn(model, cfg)
    side, vocab = model.config.vision.image_size, model.config.llm.vocab_size
    prompt_len = 16
    out: dict[str, Any] = {"new_tokens": new_tokens, "prompt_tokens": prompt_len}
    for b in batches:
        rng = np.random.default_rng(b)
        batch = {
            "image": rng.uniform(-1, 1, (b, side, side, 3)).astype(np.float32),
            "text": rng.integers(2, vocab, (b, prompt_len)).astype(np.int32),
            "mask_ar": np.zeros((b, prompt_len), np.int32),
            "mask_input": np.ones((b, prompt_len), np.int32),
        }
        batch = jax.device_put(batch)
        started = time.perf_counter()
        result = fn(params, batch)
        jax.block_until_ready(result.tokens)
        first = time.perf_counter() - started
        started = time.perf_counter()
        result = fn(params, batch)
        jax.block_until_ready(result.tokens)
        seconds = time.perf_counter() - started
        tokens = int(np.asarray(result.lengths).sum())
        out[f"batch_{b}"] = {
            "seconds": seconds,
            "first_call_seconds": round(first, 1),
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
        }
        log(f"decode batch {b}: {json.dumps(out[f'batch_{b}'])}")
    return out


def gpu_plans_section(tiny: bool, deadline: float, record: Any) -> dict[str, Any]:
    """Compile-only train steps (batch 8, attn-only, remat) at larger sizes: the GPU's own plan."""
    mesh = sharding.make_mesh(1, -1)
    out: dict[str, Any] = {}
    for preset in ("tiny-pg2",) if tiny else ("pg1-3b-448", "pg1-3b-896", "pg2-3b-448"):
        if deadline - time.monotonic() < 45:
            out[preset] = {"skipped": "out of time"}
            continue
        cfg = train_config(tiny, 2 if tiny else 8)
        cfg.model.preset = preset
        plan = make_plan(cfg, mesh)
        batch = plan.abstract_batch(cfg.batch_size, cfg.seq_len)
        rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
        started = time.perf_counter()
        try:
            with jax.set_mesh(mesh):
                compiled = plan.train_step.lower(plan.abstract_state, batch, rng).compile()
            row = {"batch_size": cfg.batch_size, **memory_of(compiled)}
            row["attention_uses_cudnn"] = uses_cudnn_attention(compiled)
        except Exception as error:  # E.g. a kernel that does not apply: report, go on.
            row = {"error": f"{type(error).__name__}: {error}"}
        row["compile_seconds"] = round(time.perf_counter() - started, 1)
        out[preset] = row
        record(out)
        log(f"plan {preset}: {json.dumps(row)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, batch 2 (CPU test)")
    parser.add_argument(
        "--out", default="/tmp/device_check.json", help="JSON, rewritten per section"
    )
    parser.add_argument("--steps", type=int, default=0, help="timed train steps (default 10/3)")
    parser.add_argument(
        "--budget", type=float, default=420, help="seconds; sections that would not fit are skipped"
    )
    args = parser.parse_args()
    tiny, started = args.tiny, time.perf_counter()
    deadline = time.monotonic() + args.budget
    results = Results(args.out)
    train_batches = (2,) if tiny else (8, 16)
    plans = start_memory_plans(tiny, train_batches)
    env = env_section(tiny)
    results.put("env", env)
    log(f"env: {json.dumps(env)}")
    trained: dict[str, Any] = {}

    def train() -> dict[str, Any]:
        steps = args.steps or (3 if tiny else 10)
        record = lambda out: results.put("train", out)
        out, trained["model"], trained["params"] = train_section(
            tiny, train_batches, steps, env["peak_bf16_flops"], plans, record
        )
        return out

    def decode_() -> dict[str, Any]:
        if "params" not in trained:
            raise RuntimeError("no weights: the train section failed")
        batches, new_tokens = ((2,), 8) if tiny else ((8, 64), 64)
        return decode_section(trained["model"], trained["params"], batches, new_tokens)

    sections = (  # (name, function, seconds it needs at least)
        ("parity", parity_section, 15),
        ("attention", lambda: attention_section(tiny), 30),
        ("train", train, 90),
        ("decode", decode_, 40),
        (
            "gpu_plans",
            lambda: gpu_plans_section(tiny, deadline, lambda o: results.put("gpu_plans", o)),
            45,
        ),
    )
    for name, fn, needs in sections:
        left = deadline - time.monotonic()
        if left < needs:
            results.put(name, {"skipped": f"{left:.0f} s left of --budget, needs ~{needs} s"})
            continue
        t = time.perf_counter()
        try:
            results.put(name, fn())
        except Exception as error:  # A failed section must not hide the others.
            results.put(
                name, {**results.data.get(name, {}), "error": f"{type(error).__name__}: {error}"}
            )
        log(f"{name} ({time.perf_counter() - t:.0f} s): {json.dumps(results.data[name])}")
    for proc in plans.values():
        if proc.poll() is None:
            proc.kill()
    results.data["complete"] = True
    results.put("seconds", round(time.perf_counter() - started, 1))
    print(json.dumps(results.data))


if __name__ == "__main__":
    main()
