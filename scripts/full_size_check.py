r"""The main job at real size on CPU: `configs/water_224.py` with a full-size PaliGemma 3B model.

    python scripts/full_size_check.py [--init PATH] [--work DIR] [--steps 2] [--batch 2]

Builds (once, cached in --work) a full-size checkpoint in the released format: big_vision's exact
keys and shapes of PaliGemma 1 3B pt-224 (2,923,335,408 parameters), random values, float16 like
Kaggle's `paligemma-3b-pt-224.f16.npz` (5.85 GB, stored uncompressed), and a 257,152-id
SentencePiece stand-in with `<loc0000>`..`<loc1023>` at ids 256000.. and `<seg000>`..`<seg127>`
at 257024.. (pad 0, eos 1, bos 2, "\n" one piece), built from the shipped small tokenizer padded
with `<unusedN>` pieces. `--init PATH` uses a real checkpoint instead.

Then, in a fresh child process (so its peak memory is the job's alone), runs the code path of
`python -m paligemma_seg.train --config configs/water_224.py` for --steps steps at batch --batch
on the shared water images: setup (data conversion with the shipped VQ-VAE, weights loaded leaf by
leaf), the compiled train step, the final checkpoint and the params.npz export. It prints the peak
RSS (the kernel's high-water mark, VmHWM) after setup (load), after the steps and over the whole
job (with the checkpoint: orbax copies the state to host memory to write it, which on CPU, where
the device arrays already are host memory, adds a second copy), the load, compile, per-step,
checkpoint and export times, the machine's CPU, and ends with one JSON line.

On CPU every device array lives in host RAM, so the peak RSS bounds the whole job (goal: <= 12
GiB, a Colab T4 host has 12.7 GB). XLA:CPU's loop-invariant code motion is disabled, as in
scripts/memory_plan.py: on CPU it hoists f32 copies of the stacked bf16 weights out of the layer
loop (~10 GiB that no GPU/TPU compilation makes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
from bench_common import cpu_model  # noqa: E402

GIB = 2**30
_NO_CPU_LICM = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
GEMMA_VOCAB = 256_000


def high_water_mark() -> int:
    """This process's peak resident set size so far, in bytes (VmHWM)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------ building the inputs


def write_random_checkpoint(path: pathlib.Path, preset: str, seed: int = 0) -> pathlib.Path:
    """A float16 .npz of the preset's big_vision tree, one leaf generated and written at a time."""
    import numpy as np

    from paligemma_seg import weights
    from paligemma_seg.model import get_preset, param_shapes
    from paligemma_seg.weights.spec import flatten

    shapes = flatten(param_shapes(get_preset(preset)))
    rng = np.random.default_rng(seed)

    def leaf(key: str, shape: tuple[int, ...]):
        def make() -> np.ndarray:
            if key.endswith(("scale", "bias")):
                return np.zeros(shape, np.float16)
            fan_in = shape[-2] if len(shape) >= 2 else 1
            value = rng.standard_normal(shape, dtype=np.float32)
            value *= 1.0 / np.sqrt(fan_in)
            return value.astype(np.float16)

        return make

    lazy = {key: leaf(key, tuple(s.shape)) for key, s in shapes.items()}
    started = time.perf_counter()
    weights.save_npz(lazy, path)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    return path


def write_tokenizer_standin(path: pathlib.Path) -> pathlib.Path:
    """257,152 ids: the small tokenizer's pieces, `<unusedN>` up to 256,000, then loc and seg."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from paligemma_seg.segtokens.layout import NUM_CODES, NUM_LOC_BINS, loc_token, seg_token

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((REPO / "checkpoints" / "tokenizer_small.model").read_bytes())
    special = {loc_token(i) for i in range(NUM_LOC_BINS)} | {seg_token(i) for i in range(NUM_CODES)}
    kept = [p for p in proto.pieces if p.piece not in special]
    del proto.pieces[:]
    proto.pieces.extend(kept)
    for i in range(GEMMA_VOCAB - len(kept)):
        proto.pieces.add(piece=f"<unused{i}>", score=0.0, type=4)  # USER_DEFINED
    for piece in [loc_token(i) for i in range(NUM_LOC_BINS)] + [
        seg_token(i) for i in range(NUM_CODES)
    ]:
        proto.pieces.add(piece=piece, score=0.0, type=4)
    data = proto.SerializeToString()
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(data)
    assert processor.get_piece_size() == GEMMA_VOCAB + NUM_LOC_BINS + NUM_CODES
    assert processor.piece_to_id(loc_token(0)) == GEMMA_VOCAB
    assert processor.piece_to_id(seg_token(0)) == GEMMA_VOCAB + NUM_LOC_BINS
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------ the job (child process)


def run_job(args: argparse.Namespace) -> dict:
    """The training code path, timed phase by phase; runs in its own process."""
    import jax
    import numpy as np

    from paligemma_seg import config_files

    try:
        from paligemma_seg.train import loop, setup
    except ImportError:  # --repo: a checkout from before the layout by stage (issue 12)
        from paligemma_seg import train_loop as loop
        from paligemma_seg import train_setup as setup

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = config_files.load(args.repo / "configs" / "water_224.py")
    with cfg.unlocked():
        cfg.init = str(args.init)
        cfg.tokenizer = str(args.tokenizer)
        cfg.codec.vqvae = str(REPO / "checkpoints" / "vqvae_small.npz")  # vae-oid's architecture
        cfg.data.jsonl_dir = str(args.work / f"water_jsonl-{args.repo.resolve().name}")
        cfg.total_steps = args.steps
        cfg.batch_size = args.batch
        cfg.val_steps = 0
        cfg.eval_steps = 0
        cfg.ckpt.async_save = False  # timed as its own phase
    workdir = str(args.work / f"run-{args.repo.resolve().name}")
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resume of the last check
    times: dict[str, float] = {}
    started = time.perf_counter()
    s = setup.setup(cfg, workdir)
    jax.block_until_ready(s.state)
    times["setup_seconds"] = time.perf_counter() - started
    load_peak = high_water_mark()
    batches = loop._batches(cfg, s)
    batch = next(batches)
    with jax.set_mesh(s.plan.mesh):
        started = time.perf_counter()
        compiled = s.plan.train_step.lower(s.state, batch, s.rng).compile()
        times["compile_seconds"] = time.perf_counter() - started
        state, steps = s.state, []
        for step in range(cfg.total_steps):
            started = time.perf_counter()
            state, metrics = compiled(state, batch, s.rng)
            loss = float(jax.device_get(metrics["loss"]))
            steps.append(time.perf_counter() - started)
            print(f"step {step + 1}: loss {loss:.4f} in {steps[-1]:.1f} s", flush=True)
            if step + 1 < cfg.total_steps:
                batch = next(batches)
    batches.close()
    steps_peak = high_water_mark()
    started = time.perf_counter()
    s.checkpointer.save(cfg.total_steps, setup.checkpoint_tree(state, s.rng),
                        setup.checkpoint_meta(cfg, cfg.total_steps))  # fmt: skip
    s.checkpointer.close()
    times["checkpoint_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    loop._export(state.params, workdir)
    times["export_seconds"] = time.perf_counter() - started
    return {
        "peak_rss_load_gib": round(load_peak / GIB, 2),
        "peak_rss_steps_gib": round(steps_peak / GIB, 2),  # load + compile + steps
        "peak_rss_gib": round(high_water_mark() / GIB, 2),
        **{k: round(v, 1) for k, v in times.items()},
        "step_seconds": [round(t, 1) for t in steps],
        "loss_finite": bool(np.isfinite(loss)),
        "devices": str(jax.devices()[0].platform),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=pathlib.Path, help="a real checkpoint (default: random)")
    parser.add_argument("--work", type=pathlib.Path, default=REPO / "runs" / "full_size_check")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--repo", type=pathlib.Path, default=REPO,
        help="run the job with the code and configs of another checkout (a before/after peer)",
    )  # fmt: skip
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # the child
    parser.add_argument("--tokenizer", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print("RESULT " + json.dumps(run_job(args)), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    init = args.init or args.work / "paligemma-3b-pt-224.random.f16.npz"
    if not init.exists():
        write_random_checkpoint(init, "pg1-3b-224")
    tokenizer = args.work / "tokenizer_257152.model"
    if not tokenizer.exists():
        write_tokenizer_standin(tokenizer)
    build_seconds = time.perf_counter() - started
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_NO_CPU_LICM}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(args.repo.resolve()), env.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--job", f"--init={init}", f"--tokenizer={tokenizer}",
               f"--work={args.work}", f"--steps={args.steps}", f"--batch={args.batch}",
               f"--repo={args.repo.resolve()}"]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    sys.stderr.write(child.stderr[-4000:])
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    print("\n".join(line for line in child.stdout.splitlines() if not line.startswith("RESULT ")))
    if child.returncode or not lines:
        print(f"the job failed (exit {child.returncode})", file=sys.stderr)
        sys.exit(1)
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result.update(
        code=str(args.repo.resolve()), init=str(init), checkpoint_bytes=init.stat().st_size,
        build_seconds=round(build_seconds, 1),
        job_wall_seconds=round(wall, 1), cpu=cpu_model(), cores=os.cpu_count(),
        goal_peak_rss_gib=12, goal_met=result["peak_rss_gib"] <= 12,
    )  # fmt: skip
    print(
        f"peak RSS: load {result['peak_rss_load_gib']} GiB, whole job {result['peak_rss_gib']} "
        f"GiB (goal <= 12); setup {result['setup_seconds']} s, compile "
        f"{result['compile_seconds']} s, steps {result['step_seconds']} s on {result['cpu']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
